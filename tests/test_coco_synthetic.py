"""The built-in detection set that needs context: deterministic, cached, labelled by the distant
cue only; read back by the COCO reader and evaluated end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nonlocalnet.data.coco import COCODetection, collate_detection, decode_segmentation
from nonlocalnet.data.synthetic_detection import (
    CUE_COLOURS,
    SyntheticDetectionSpec,
    detection_split_paths,
    generate_detection_dataset,
)
from nonlocalnet.engine.coco_eval import COCOEvaluator, evaluate_detector

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # pycocotools decodes masks with numpy 2 deprecated array copies
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

SPEC = SyntheticDetectionSpec(num_train=6, num_val=4, seed=5)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_same_files_and_a_second_call_reuses_them(tmp_path: Path) -> None:
    a = generate_detection_dataset(tmp_path / "a", SPEC)
    b = generate_detection_dataset(tmp_path / "b", SPEC)
    assert a.name == b.name == SPEC.key()
    assert _files(a) == _files(b)
    stamp = (a / "metadata.json").stat().st_mtime_ns
    assert generate_detection_dataset(tmp_path / "a", SPEC) == a
    assert (a / "metadata.json").stat().st_mtime_ns == stamp
    other = SyntheticDetectionSpec(num_train=6, num_val=4, seed=6)
    assert other.key() != SPEC.key()
    assert _files(generate_detection_dataset(tmp_path / "a", other)) != _files(a)


@pytest.mark.parametrize("shape", ["square", "disc"])
def test_every_object_takes_its_class_from_the_distant_cue(tmp_path: Path, shape: str) -> None:
    spec = SyntheticDetectionSpec(num_train=8, num_val=4, shape=shape, seed=1)
    folder = generate_detection_dataset(tmp_path, spec)
    meta = json.loads((folder / "metadata.json").read_text())
    for split in ("train", "val"):
        image_dir, ann_file = detection_split_paths(folder, split)
        data = json.loads(ann_file.read_text())
        labels = [m["label"] for m in meta[split]]
        assert labels.count(0) == labels.count(1) == len(labels) // 2  # balanced
        by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for m in meta[split]:
            image = np.asarray(Image.open(image_dir / m["file_name"]))  # (H, W, 3)
            c = spec.cue_margin + spec.cue_radius
            corners = [(c, c), (c, spec.width - 1 - c), (spec.height - 1 - c, c),
                       (spec.height - 1 - c, spec.width - 1 - c)]  # fmt: skip
            for k, (y, x) in enumerate(corners):
                pixel = tuple(int(v) for v in image[y, x])
                if k == m["cue_corner"]:
                    assert pixel == CUE_COLOURS[m["label"]]
                else:
                    assert pixel[0] == pixel[1] == pixel[2]  # grey decoy
            anns = by_image[m["image_id"]]
            assert 1 <= len(anns) <= spec.max_objects
            for a in anns:
                assert a["category_id"] == m["label"] + 1
                x, y, w, h = a["bbox"]
                assert x >= spec.inner and y >= spec.inner
                assert x + w <= spec.width - spec.inner and y + h <= spec.height - spec.inner
                mask = decode_segmentation(a["segmentation"], spec.height, spec.width)
                assert mask.sum() == a["area"]
                assert (image[mask.astype(bool)] == m["object_grey"]).all()  # the drawn pixels
                ys, xs = np.nonzero(mask)
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a[
                    "bbox"
                ]


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        SyntheticDetectionSpec(num_train=5)
    with pytest.raises(ValueError, match="central region"):
        SyntheticDetectionSpec(height=48, width=48)
    with pytest.raises(ValueError, match="shape"):
        SyntheticDetectionSpec(shape="star")


def test_reader_and_evaluator_end_to_end(tmp_path: Path) -> None:
    folder = generate_detection_dataset(tmp_path, SPEC)
    image_dir, ann_file = detection_split_paths(folder, "val")
    val = COCODetection(image_dir, ann_file, mode="test")
    assert len(val) == 4 and not val.skipped and val.num_classes == 3

    # the ground truth as predictions: AP 1 through the data set's ids and categories
    ev = COCOEvaluator(val.coco(), label_to_category=val.label_to_category)
    for i in range(len(val)):
        t = val[i]["target"]
        pred = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                "masks": t["masks"][:, None].float()}  # fmt: skip
        ev.update([pred], [t["image_id"]])
    metrics = ev.evaluate(log_tables=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(
        1.0
    )

    # a fresh Mask R-CNN through the loader: the metrics exist and are fractions
    from nonlocalnet.models.detection import create_detection_model

    model = create_detection_model(
        num_classes=val.num_classes, min_size=128, max_size=160, box_detections_per_img=10,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_score_thresh=0.0,
    )  # fmt: skip
    loader = DataLoader(val, batch_size=2, collate_fn=collate_detection)
    ev = COCOEvaluator(val.coco(), label_to_category=val.label_to_category)
    done: list[int] = []
    metrics = evaluate_detector(model, loader, ev, progress=done.append)
    assert done == [2, 4] and metrics["num_images"] == 4 and model.training
    for t in ("bbox", "segm"):
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in metrics[t].values())
    assert len(ev.results()["bbox"]) == 4 * 10


def test_too_crowded_a_spec_raises_instead_of_drawing_fewer_than_min_objects() -> None:
    """Three 20-pixel squares cannot lie 2 pixels apart in a 24x24 central region: drawing an
    image says so instead of returning one object under min_objects=3."""
    from nonlocalnet.data.synthetic import sample_rng
    from nonlocalnet.data.synthetic_detection import make_detection_sample

    spec = SyntheticDetectionSpec(
        height=64, width=64, min_objects=3, max_objects=3, min_size=20, max_size=20
    )
    with pytest.raises(ValueError, match=r"only 1 of min_objects=3 .* 24x24 central region"):
        make_detection_sample(spec, 0, sample_rng(0, "train", 0))
    fits = SyntheticDetectionSpec(
        height=64, width=64, min_objects=1, max_objects=1, min_size=16, max_size=20
    )
    _, objects, _ = make_detection_sample(fits, 1, sample_rng(0, "train", 0))
    assert len(objects) == 1 and objects[0]["category_id"] == 2
