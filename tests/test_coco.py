"""COCO-format data (masks from polygons / RLE, crowd, bad input) and COCO box / mask AP."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from nonlocalnet.data.coco import (
    COCODetection,
    collate_detection,
    decode_segmentation,
    load_coco_json,
)
from nonlocalnet.engine.coco_eval import (
    STATS,
    COCOEvaluator,
    coco_stats,
    format_metrics,
    predictions_to_coco,
)

#: pycocotools decodes masks with numpy 2 deprecated array copies
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# -- a hand-written COCO file ---------------------------------------------------------------------

H, W = 10, 12


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _rle_mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[6:9, 8:11] = 1  # rows 6..8, columns 8..10
    return m


def _ann(i: int, cat: int, bbox: list, segm, crowd: int = 0, area: float | None = None) -> dict:
    area = bbox[2] * bbox[3] if area is None else area
    return {"id": i, "image_id": 1, "category_id": cat, "bbox": bbox, "segmentation": segm,
            "area": area, "iscrowd": crowd}  # fmt: skip


def _write(tmp_path: Path, annotations: list | None = None, images: list | None = None) -> Path:
    """Images a.png (10x12, annotated), b.png (8x8, no annotations), c.png (listed, missing)."""
    pixels = (np.arange(H * W * 3).reshape(H, W, 3) % 251).astype(np.uint8)  # (H, W, 3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "b.png")
    if annotations is None:
        annotations = [
            _ann(1, 1, [2, 3, 4, 5], [[2, 3, 6, 3, 6, 8, 2, 8]]),  # polygon: rows 3..7, cols 2..5
            _ann(2, 1, [0, 0, 1, 5], {"size": [H, W], "counts": [0, 5, 115]}, crowd=1),
            _ann(3, 3, [8, 6, 3, 3], _compressed_rle(_rle_mask())),
            _ann(4, 7, [1, 1, 2, 2], [[1, 1, 3, 1, 3, 3, 1, 3]]),  # category 7 is not listed
            _ann(5, 1, [1, 1, 0, 4], [[1, 1, 1, 1, 1, 5, 1, 5]]),  # zero width
            _ann(6, 1, [20, 2, 3, 3], [[20, 2, 23, 2, 23, 5, 20, 5]]),  # right of the image
            _ann(7, 1, [1, 1, 2, 2], [[1, 2, 3]]),  # a polygon needs 3 points
            {**_ann(8, 1, [1, 1, 2, 2], [[1, 1, 3, 1, 3, 3, 1, 3]]), "image_id": 99},  # no image 99
        ]
    if images is None:
        images = [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": 8, "width": 8},
            {"id": 3, "file_name": "c.png", "height": 8, "width": 8},
        ]
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
    }
    path = tmp_path / "instances_test.json"
    path.write_text(json.dumps(data))
    return path


def test_masks_decode_from_polygons_and_both_rles(tmp_path: Path) -> None:
    ann = _write(tmp_path)
    ds = COCODetection(tmp_path, ann, mode="train", flip_p=0.0, keep_crowd=True)
    sample = ds[0]
    t = sample["target"]
    assert sample["path"] == str(tmp_path / "a.png") and t["image_id"] == 1
    assert torch.equal(t["labels"], torch.tensor([1, 1, 3]))
    assert torch.equal(t["iscrowd"], torch.tensor([0, 1, 0]))
    assert torch.equal(t["boxes"], torch.tensor([[2.0, 3, 6, 8], [0, 0, 1, 5], [8, 6, 11, 9]]))
    assert torch.equal(t["area"], torch.tensor([20.0, 5.0, 9.0]))
    masks = t["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, H, W)
    polygon = torch.zeros(H, W, dtype=torch.uint8)
    polygon[3:8, 2:6] = 1
    crowd = torch.zeros(H, W, dtype=torch.uint8)
    crowd[0:5, 0] = 1  # uncompressed RLE [0, 5, 115]: column-major, 5 ones from the top left
    assert torch.equal(masks[0], polygon)
    assert torch.equal(masks[1], crowd)
    assert torch.equal(masks[2], torch.from_numpy(_rle_mask()))
    image = sample["image"]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert image[0, 0, 0] == 0.0 and image[2, 0, 1] == pytest.approx(5 / 255)  # pixel (0,1) = 3..5


def test_bad_annotations_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    ann = _write(tmp_path)
    with caplog.at_level(logging.INFO, logger="nonlocalnet.data.coco"):
        ds = COCODetection(tmp_path, ann, mode="train")
    assert len(ds) == 1  # b.png has no annotations (dropped in training), c.png is missing
    assert dict(ds.skipped) == {
        "missing_image": 1,
        "unknown_image": 1,
        "no_annotations": 1,
        "unknown_category": 1,
        "degenerate_box": 2,
        "bad_segmentation": 1,
        "crowd": 1,
    }
    assert ds.skipped_examples["missing_image"] == [str(tmp_path / "c.png")]
    assert "category_id 7" in ds.skipped_examples["unknown_category"][0]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "1 images, 2 annotations" in lines[0] and "2 degenerate_box" in lines[0]
    assert caplog.records[0].levelno == logging.WARNING
    t = ds[0]["target"]
    assert torch.equal(t["labels"], torch.tensor([1, 3]))  # crowd kept out, as torchvision does
    assert torch.equal(t["iscrowd"], torch.tensor([0, 0]))


def test_evaluation_mode_keeps_images_without_annotations(tmp_path: Path) -> None:
    ds = COCODetection(tmp_path, _write(tmp_path), mode="test")
    assert len(ds) == 2 and "no_annotations" not in ds.skipped
    empty = ds[1]["target"]
    assert empty["image_id"] == 2
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["masks"].shape == (0, 8, 8)
    gt = ds.coco()  # the ground truth: checked annotations, crowd included, missing image left out
    assert sorted(gt.getImgIds()) == [1, 2]
    assert sorted(a["iscrowd"] for a in gt.dataset["annotations"]) == [0, 0, 1]


def test_labels_ids_or_contiguous_and_range(tmp_path: Path) -> None:
    ann = _write(tmp_path)
    ds = COCODetection(tmp_path, ann, contiguous_labels=True, flip_p=0.0)
    assert ds.label_to_category == {1: 1, 2: 3} and ds.num_classes == 3
    assert ds.classes == ["__background__", "one", "three"]
    assert torch.equal(ds[0]["target"]["labels"], torch.tensor([1, 2]))
    ds = COCODetection(tmp_path, ann, num_classes=3, flip_p=0.0)  # ids as labels: 3 is too large
    assert ds.skipped["category_out_of_range"] == 1
    assert torch.equal(ds[0]["target"]["labels"], torch.tensor([1]))
    assert COCODetection(tmp_path, ann).num_classes == 4


def test_horizontal_flip_moves_image_boxes_and_masks_together(tmp_path: Path) -> None:
    ann = _write(tmp_path)
    plain = COCODetection(tmp_path, ann, flip_p=0.0)[0]
    flipped = COCODetection(tmp_path, ann, flip_p=1.0)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["target"]["masks"], plain["target"]["masks"].flip(-1))
    assert torch.equal(flipped["target"]["boxes"], torch.tensor([[6.0, 3, 10, 8], [1, 6, 4, 9]]))
    for box, mask in zip(flipped["target"]["boxes"], flipped["target"]["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max() + 1.0, ys.max() + 1.0]


def test_seeded_flips_repeat_and_change_with_the_epoch(tmp_path: Path) -> None:
    ann = _write(tmp_path)
    a, b = (COCODetection(tmp_path, ann, seed=3) for _ in range(2))
    draws = []
    for epoch in range(12):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        x, y = a[0]["target"]["boxes"], b[0]["target"]["boxes"]
        assert torch.equal(x, y)
        draws.append(x[0, 0].item())
    assert set(draws) == {2.0, 6.0}  # both flipped and unflipped over 12 epochs


def test_unreadable_images_are_replaced_in_training_and_dropped_in_evaluation(
    tmp_path: Path,
) -> None:
    annotations = [
        {**_ann(k + 1, 1, [2, 3, 4, 5], [[2, 3, 6, 3, 6, 8, 2, 8]]), "image_id": k + 1}
        for k in range(3)
    ]
    images = [
        {"id": k + 1, "file_name": name, "height": H, "width": W}
        for k, name in enumerate(["a.png", "bad.png", "small.png"])
    ]
    ann = _write(tmp_path, annotations, images)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((H, W - 2, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    train = COCODetection(tmp_path, ann, mode="train")
    assert len(train) == 3 and not train.skipped  # found when read, not when listed
    sample = train[1]
    assert sample["index"] == 0 and sample["skipped"] == 2  # bad.png, small.png, then a.png
    assert sample["unreadable"] == [str(tmp_path / "bad.png"), str(tmp_path / "small.png")]
    test = COCODetection(tmp_path, ann, mode="test")
    batch = collate_detection([test[i] for i in range(3)])
    assert len(batch["image"]) == 1 and batch["target"][0]["image_id"] == 1
    assert batch["unreadable"] == [str(tmp_path / "bad.png"), str(tmp_path / "small.png")]
    with pytest.raises(ValueError, match=r"small.png is \(10, 10\).*says \(10, 12\)"):
        test.load(2)


def _set_with_one_bad_image(tmp_path: Path, n: int = 10, bad: int = 3) -> Path:
    """n annotated 10x12 images; image ``bad`` (0-based) is not a PNG."""
    images, annotations = [], []
    for k in range(n):
        name = f"{k}.png"
        if k == bad:
            (tmp_path / name).write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((H, W, 3), 10 * k, dtype=np.uint8)).save(tmp_path / name)
        images.append({"id": k + 1, "file_name": name, "height": H, "width": W})
        annotations.append(
            {**_ann(k + 1, 1, [2, 3, 4, 5], [[2, 3, 6, 3, 6, 8, 2, 8]]), "image_id": k + 1}
        )
    return _write(tmp_path, annotations, images)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_an_unreadable_image_counts_once_over_epochs(tmp_path: Path, mode: str) -> None:
    """The batches name the unreadable entries (``unreadable_index``), so the engine's
    SkipTracker(num_entries=len) counts each bad image once however many epochs read it: 1 bad
    image of 10 stays 10%, under a 15% limit, for 12 epochs."""
    from nonlocalnet.data.samples import SkipTracker

    ds = COCODetection(tmp_path, _set_with_one_bad_image(tmp_path), mode=mode, seed=0)
    tracker = SkipTracker(0.15, min_reads=10, num_entries=len(ds))
    for epoch in range(12):
        ds.set_epoch(epoch)
        for start in (0, 5):
            batch = collate_detection([ds[i] for i in range(start, start + 5)])
            if start == 0:
                assert batch["unreadable_index"] == [3]
                assert batch["unreadable"] == [str(tmp_path / "3.png")]
            tracker.update(batch)
    assert (tracker.num_skipped, tracker.num_reads) == (1, 10)
    assert tracker.anonymous.tolist() == [0.0, 0.0]
    sample = ds[3]
    if mode == "train":  # replaced by the next image, which the sample names
        assert (sample["index"], sample["skipped"], sample["unreadable_index"]) == (4, 1, [3])
    else:  # dropped from the batch
        assert sample["image"] is None and sample["unreadable_index"] == [3]


def test_malformed_rle_size_and_category_id_are_skipped_not_raised(tmp_path: Path) -> None:
    """An RLE whose ``size`` is not a list and a ``category_id`` that is not an int (a list,
    unhashable) are bad annotations, counted as such, not a TypeError."""
    annotations = [
        _ann(1, 1, [2, 3, 4, 5], [[2, 3, 6, 3, 6, 8, 2, 8]]),
        _ann(2, 1, [8, 6, 3, 3], {"size": 10, "counts": "abc"}),
        _ann(3, [1], [8, 6, 3, 3], [[8, 6, 11, 6, 11, 9, 8, 9]]),
    ]
    ds = COCODetection(tmp_path, _write(tmp_path, annotations), mode="test")
    assert ds.skipped["bad_segmentation"] == 1 and ds.skipped["unknown_category"] == 1
    assert "category_id [1]" in ds.skipped_examples["unknown_category"][0]
    assert len(ds[0]["target"]["labels"]) == 1


def test_empty_annotation_list(tmp_path: Path) -> None:
    ann = _write(tmp_path, annotations=[])
    with pytest.raises(ValueError, match=r"instances_test.json: no usable images.*no_annotations"):
        COCODetection(tmp_path, ann, mode="train")
    test = COCODetection(tmp_path, ann, mode="test")
    assert len(test) == 2 and all(len(test[i]["target"]["labels"]) == 0 for i in range(2))


def test_broken_files_are_refused_with_the_file_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_coco_json(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"x.json is not a JSON file"):
        load_coco_json(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"images": [], "categories": [{"id": 0}]}))
    with pytest.raises(ValueError, match=r"y.json: every category needs an integer id >= 1"):
        load_coco_json(tmp_path / "y.json")
    (tmp_path / "z.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"z.json: expected a list under 'images'"):
        load_coco_json(tmp_path / "z.json")
    twice = [{"id": 1, "file_name": "a.png", "height": H, "width": W}] * 2
    with pytest.raises(ValueError, match=r"repeated image ids \[1\]"):
        COCODetection(tmp_path, _write(tmp_path, images=twice))
    with pytest.raises(ValueError, match="positive int height/width"):
        COCODetection(tmp_path, _write(tmp_path, images=[{"id": 1, "file_name": "a.png"}]))
    with pytest.raises(FileNotFoundError, match="image folder"):
        COCODetection(tmp_path / "none", _write(tmp_path))


def test_collate_keeps_sizes_apart(tmp_path: Path) -> None:
    ds = COCODetection(tmp_path, _write(tmp_path), mode="test")
    batch = collate_detection([ds[0], ds[1]])
    assert [im.shape for im in batch["image"]] == [(3, H, W), (3, 8, 8)]
    assert [t["image_id"] for t in batch["target"]] == [1, 2]
    assert torch.equal(batch["index"], torch.tensor([0, 1])) and batch["unreadable"] == []


def test_decode_segmentation_matches_pycocotools_ann_to_mask(tmp_path: Path) -> None:
    ds = COCODetection(tmp_path, _write(tmp_path), mode="test", keep_crowd=True)
    gt = ds.coco()
    for a in gt.dataset["annotations"]:
        ours = decode_segmentation(a["segmentation"], H, W)
        assert np.array_equal(ours, gt.annToMask(a))


# -- COCO AP on hand-made cases --------------------------------------------------------------------

SIZE = 200
ONE = pytest.approx(1.0, abs=1e-12)


def _box_mask(box: list[float]) -> torch.Tensor:
    m = torch.zeros(1, SIZE, SIZE)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[0, y1:y2, x1:x2] = 0.9
    return m


def _gt(boxes: list[list[float]], crowd: list[int] | None = None, cats: list[int] | None = None):
    crowd = crowd or [0] * len(boxes)
    cats = cats or [1] * len(boxes)
    anns = []
    for k, (b, c, cat) in enumerate(zip(boxes, crowd, cats, strict=True)):
        x1, y1, x2, y2 = b
        poly = [[x1, y1, x2, y1, x2, y2, x1, y2]]
        anns.append({"id": k + 1, "image_id": 1, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": (x2 - x1) * (y2 - y1), "iscrowd": c, "segmentation": poly})  # fmt: skip
    return {
        "images": [{"id": 1, "height": SIZE, "width": SIZE, "file_name": "x.png"}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
    }


def _pred(boxes: list[list[float]], scores: list[float], labels: list[int] | None = None) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels or [1] * len(boxes)),
        "masks": torch.cat([_box_mask(b) for b in boxes]).unsqueeze(1),  # (N, 1, H, W)
    }


def _evaluate(gt: dict, pred: dict, backend: str = "pycocotools") -> dict:
    ev = COCOEvaluator(gt, backend=backend)
    ev.update([pred], [1])
    metrics = ev.evaluate(log_tables=False)
    json.dumps(metrics)  # JSON-safe
    return metrics


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_perfect_predictions_give_ap_one(backend: str) -> None:
    boxes = [[10.0, 10, 60, 40], [100, 80, 190, 190]]  # a medium and a large object
    metrics = _evaluate(_gt(boxes), _pred(boxes, [0.9, 0.8]), backend)
    for t in ("bbox", "segm"):
        assert set(metrics[t]) == set(STATS)
        assert metrics[t]["APs"] == metrics[t]["ARs"] == -1.0  # no small object
        assert metrics[t]["AR1"] == 0.5  # one detection per image counted, two objects
        # precision is tp / (tp + fp + eps) in COCOeval: 1 up to rounding
        assert all(v == ONE for k, v in metrics[t].items() if k not in ("APs", "ARs", "AR1"))
    assert metrics["num_images"] == 1


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_a_shifted_box_matches_at_the_thresholds_below_its_iou(backend: str) -> None:
    # 100x100 box shifted by 20: IoU = 80·100 / (120·100) = 2/3, so it matches at the IoU
    # thresholds 0.50, 0.55, 0.60, 0.65 and misses at 0.70 ... 0.95: AP = 4/10.
    gt = _gt([[0.0, 0, 100, 100]])
    metrics = _evaluate(gt, _pred([[20.0, 0, 120, 100]], [0.9]), backend)
    for t in ("bbox", "segm"):  # the rectangle masks overlap the same way
        m = metrics[t]
        assert m["AP"] == pytest.approx(0.4, abs=1e-12)
        assert (m["AP50"], m["AP75"]) == (ONE, 0.0)
        assert m["APl"] == pytest.approx(0.4, abs=1e-12)  # area 10000 > 96²
        assert m["AR100"] == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ap_of_a_true_and_a_shifted_detection_by_hand(backend: str) -> None:
    # An exact detection (score 0.9) and one at IoU 2/3 (score 0.8) on two objects. At the 4
    # thresholds <= 0.65 both match: precision 1 up to recall 1, AP 1. At the 6 others the second
    # is a false positive: precision 1 up to recall 1/2, i.e. at 51 of the 101 recall points.
    # AP = (4 + 6 · 51/101) / 10.
    gt = _gt([[0.0, 0, 100, 100], [100, 100, 200, 200]])
    metrics = _evaluate(gt, _pred([[0.0, 0, 100, 100], [80, 100, 180, 200]], [0.9, 0.8]), backend)
    for t in ("bbox", "segm"):
        assert metrics[t]["AP"] == pytest.approx((4 + 6 * 51 / 101) / 10, abs=1e-12)
        assert metrics[t]["AP50"] == ONE
        assert metrics[t]["AP75"] == pytest.approx(51 / 101, abs=1e-12)


def test_a_detection_on_a_crowd_region_is_ignored() -> None:
    boxes = [[0.0, 0, 50, 50], [100, 100, 200, 200]]
    dets = [[0.0, 0, 50, 50], [110, 110, 150, 150]]  # the second lies inside the second region
    pred = _pred(dets, [0.9, 0.95])
    assert _evaluate(_gt(boxes, crowd=[0, 1]), pred)["bbox"]["AP"] == ONE
    plain = _evaluate(_gt(boxes, crowd=[0, 0]), pred)["bbox"]["AP"]
    assert plain < 0.5  # as an object, the region is missed and the detection on it is false


def test_labels_map_to_category_ids_and_results_are_json() -> None:
    gt = _gt([[10.0, 10, 60, 40]], cats=[2])
    pred = _pred([[10.0, 10, 60, 40]], [0.7], labels=[5])
    ev = COCOEvaluator(gt, label_to_category={5: 2})
    ev.update([pred], [1])
    assert ev.evaluate(log_tables=False)["bbox"]["AP"] == ONE
    res = json.loads(json.dumps(ev.results()))
    assert res["bbox"] == [
        {
            "image_id": 1,
            "category_id": 2,
            "bbox": [10.0, 10.0, 50.0, 30.0],
            "score": pytest.approx(0.7),
        }
    ]
    rle = res["segm"][0]["segmentation"]
    assert mask_utils.decode(rle)[10:40, 10:60].all() and mask_utils.area(rle) == 1500
    assert "AP50" in ev.tables["bbox"] or "IoU=0.50 " in ev.tables["bbox"]
    table = format_metrics(ev.evaluate(log_tables=False))
    assert table.splitlines()[1].split()[:2] == ["bbox", "100.0"]


def test_masks_are_thresholded_at_one_half() -> None:
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 0, :] = torch.tensor([0.2, 0.5, 0.51, 0.9])
    pred = {"boxes": torch.tensor([[0.0, 0, 4, 1]]), "scores": torch.tensor([1.0]),
            "labels": torch.tensor([1]), "masks": masks}  # fmt: skip
    rle = predictions_to_coco(pred, 1)["segm"][0]["segmentation"]
    assert mask_utils.decode(rle)[0].tolist() == [0, 0, 1, 1]


def test_evaluator_refuses_bad_input() -> None:
    gt = _gt([[10.0, 10, 60, 40]])
    ev = COCOEvaluator(gt)
    with pytest.raises(ValueError, match="no predictions"):
        ev.evaluate()
    with pytest.raises(ValueError, match="image id 9 is not in the ground truth"):
        ev.update([_pred([[0.0, 0, 1, 1]], [0.5])], [9])
    with pytest.raises(ValueError, match="needs 'masks'"):
        ev.update([{k: v for k, v in _pred([[0.0, 0, 1, 1]], [0.5]).items() if k != "masks"}], [1])
    with pytest.raises(ValueError, match="2 predictions for 1 image ids"):
        ev.update([_pred([[0.0, 0, 1, 1]], [0.5])] * 2, [1])
    with pytest.raises(ValueError, match="unknown backend"):
        COCOEvaluator(gt, backend="detectron")
    with pytest.raises(ValueError, match="label 4 has no category id"):
        predictions_to_coco(_pred([[0.0, 0, 1, 1]], [0.5], labels=[4]), 1, label_to_category={1: 1})


def test_no_detection_at_all_gives_ap_zero() -> None:
    ev = COCOEvaluator(_gt([[10.0, 10, 60, 40]]), iou_types=("bbox",))
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.long),
    }
    ev.update([empty], [1])
    assert ev.evaluate(log_tables=False)["bbox"]["AP"] == 0.0


def _random_case(seed: int = 0) -> tuple[dict, list[dict]]:
    """Several images, categories, sizes and a crowd region; jittered and spurious detections."""
    rng = np.random.default_rng(seed)
    images, anns, preds = [], [], []
    for i in range(1, 7):
        images.append({"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.png"})
        boxes, labels, scores = [], [], []
        for k in range(int(rng.integers(2, 5))):
            w, h = (int(v) for v in rng.integers(8, 90, size=2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            cat = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(i == 3 and k == 0),
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})  # fmt: skip
            dx, dy = (int(v) for v in rng.integers(-8, 9, size=2))
            x1, y1 = min(max(x + dx, 0), SIZE - 2), min(max(y + dy, 0), SIZE - 2)
            boxes.append([x1, y1, min(x1 + w, SIZE), min(y1 + h, SIZE)])
            labels.append(cat if rng.random() < 0.8 else 3 - cat)
            scores.append(float(rng.random()))
        x, y = (int(v) for v in rng.integers(0, SIZE - 30, size=2))
        boxes.append([x, y, x + 30, y + 30])  # spurious
        labels.append(1)
        scores.append(float(rng.random()))
        preds.append(_pred([[float(v) for v in b] for b in boxes], scores, labels))
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}  # fmt: skip
    return gt, preds


def test_faster_coco_eval_equals_pycocotools() -> None:
    gt, preds = _random_case()
    out = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        ev = COCOEvaluator(gt, backend=backend)
        ev.update(preds, [1, 2, 3, 4, 5, 6])
        out[backend] = ev.evaluate(log_tables=False)
    for t in ("bbox", "segm"):
        a, b = out["pycocotools"][t], out["faster_coco_eval"][t]
        assert 0.1 < a["AP"] < 0.9  # a case with partial matches
        for k in STATS:
            assert a[k] == pytest.approx(b[k], abs=1e-9), (t, k)


def test_coco_stats_on_a_subset_of_images() -> None:
    gt, preds = _random_case()
    results = predictions_to_coco(preds[0], 1)["bbox"]
    one, _ = coco_stats(gt, results, "bbox", img_ids=[1])
    every, table = coco_stats(gt, results, "bbox")
    assert one["AP"] > every["AP"]  # the other images' objects are all missed
    assert table.count("Average Precision") == 6 and table.count("Average Recall") == 6


_DDP_SCRIPT = """
import json, sys, torch
from nonlocalnet.engine.distributed import init_distributed, cleanup_distributed
from nonlocalnet.engine.coco_eval import COCOEvaluator
sys.path.insert(0, {tests!r})
from test_coco import _random_case
info = init_distributed("gloo")
gt, preds = _random_case()
ids = [[1, 2, 3, 4], [4, 5, 6, 1]][info.rank]  # padded shards: 4 and 1 on both processes
ev = COCOEvaluator(gt)
ev.update([preds[i - 1] for i in ids], ids)
ev.synchronize()
out = ev.evaluate(log_tables=False)
open({out!r} + f"/rank{{info.rank}}.json", "w").write(json.dumps(out))
cleanup_distributed()
"""


@pytest.mark.distributed
def test_predictions_are_gathered_across_processes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(_DDP_SCRIPT.format(tests=tests, out=str(tmp_path)))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    gt, preds = _random_case()
    ev = COCOEvaluator(gt)
    ev.update(preds, [1, 2, 3, 4, 5, 6])
    expected = ev.evaluate(log_tables=False)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
