"""Detection through the engine: a tiny Mask R-CNN trained on the generated COCO-format set
(each loss logged, COCOeval box/mask AP), exact resume, the optimiser over trainable parameters
only, bad COCO input skipped and counted, and DDP (2 processes, gloo)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from nonlocalnet.engine import config_from_dict, evaluate, train

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # pycocotools decodes masks with numpy 2 deprecated array copies
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

LOSSES = ["loss_box_reg", "loss_classifier", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]


def _cfg(root: Path, model: str = "gc_maskrcnn_tiny", **sections: dict[str, Any]) -> dict:
    cfg: dict[str, Any] = {
        # every score kept, so that a barely trained detector still has detections to evaluate
        "model": {"name": model, "kwargs": {"box_score_thresh": 0.0}},
        "data": {"task": "detection", "format": "synthetic_detection", "root": str(root),
                 "num_classes": 3, "num_workers": 0,
                 "kwargs": {"num_train": 6, "num_val": 4, "seed": 1}},
        "optim": {"lr": 0.01},
        "schedule": {"name": "step", "milestones": [3], "warmup_steps": 2, "warmup_factor": 0.001},
        "train": {"steps": 2, "batch_size": 2, "seed": 4, "log_every": 1, "checkpoint_every": 2,
                  "progress": False},
        "eval": {"batch_size": 3},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return cfg


def test_two_steps_log_each_loss_and_evaluate_with_cocoeval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_from_dict(_cfg(tmp_path / "data"))
    with caplog.at_level(logging.INFO):
        result = train(config, out_dir=tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    for r in train_records:  # the loss is the sum of the detector's losses, each logged
        assert all(r[k] > 0 for k in LOSSES)
        assert r["loss"] == pytest.approx(sum(r[k] for k in LOSSES), rel=1e-5)
    # COCOeval's 12 numbers for boxes and masks, in percent (-1: no object of that size)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
            value = result[f"val_{iou_type}_{name}"]
            assert value == -1.0 or 0.0 <= value <= 100.0, (iou_type, name, value)
    assert result["val_bbox_APm"] == -1.0  # every object of the set is small (< 32x32)
    assert result["val_num_images"] == 4 and result["val_skipped"] == 0
    assert result["skipped"] == 0 and "data_skipped" not in result
    assert "AP50" in caplog.text and "Average Precision" in caplog.text  # the tables
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["val_bbox_AP"] == result["val_bbox_AP"]
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    # the checkpoint evaluated again: the same numbers
    again = evaluate(config, tmp_path / "run")
    for key in ("bbox_AP", "bbox_AR100", "segm_AP", "num_images"):
        assert again[key] == pytest.approx(result[f"val_{key}"]), key
    with_predictions = evaluate(config, tmp_path / "run", predictions=True)
    boxes = with_predictions["predictions"]["bbox"]
    assert {r["image_id"] for r in boxes} == {1, 2, 3, 4}
    assert all(r["category_id"] in (1, 2) and len(r["bbox"]) == 4 for r in boxes)
    # the eval command writes them: one CSV row per box, the COCO results in the JSON
    from nonlocalnet.cli import main

    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "--csv", str(tmp_path / "d.csv"),
                 "--json", str(tmp_path / "d.json")])  # fmt: skip
    assert code == 0
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert rows[0] == "image_id,category_id,score,x,y,width,height" and len(rows) == len(boxes) + 1
    assert len(json.loads((tmp_path / "d.json").read_text())["predictions"]["bbox"]) == len(boxes)


def test_a_faster_rcnn_evaluates_boxes_only(tmp_path: Path) -> None:
    config = config_from_dict(
        _cfg(tmp_path / "data", model="faster_rcnn_tiny", train={"steps": 1, "checkpoint_every": 1})
    )
    result = train(config, out_dir=tmp_path / "run")
    assert "val_bbox_AP" in result and not any(k.startswith("val_segm") for k in result)
    assert "loss_mask" not in json.loads(
        (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    )


def test_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """RPN and RoI sampling draw from torch's global generator: the checkpoint's RNG states make
    the resumed steps the same; precise BN before each evaluation is covered as well."""
    cfg = _cfg(
        tmp_path / "data",
        train={"steps": 4, "checkpoint_every": 2, "eval_every": 2, "precise_bn_batches": 1},
    )
    train(config_from_dict(cfg), out_dir=tmp_path / "full")
    half = _cfg(tmp_path / "data", train={**cfg["train"], "steps": 2})
    train(config_from_dict(half), out_dir=tmp_path / "resumed")
    train(config_from_dict(cfg), out_dir=tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = config_from_dict(cfg)
    torch.manual_seed(4)
    from nonlocalnet.engine import build_model

    fresh = build_model(init).state_dict()
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(a[key], fresh[key])  # training moved the weights


def test_the_optimiser_holds_the_trainable_parameters_only() -> None:
    from nonlocalnet.engine.optim import build_optimizer
    from nonlocalnet.models import create_model

    model = create_model("gc_maskrcnn_r50_fpn", widths=(8, 16, 32, 64), stem_channels=8,
                         fpn_channels=16, representation_size=32, mask_channels=16)  # fmt: skip
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen  # stem and res2
    opt = build_optimizer(model, lr=0.02, weight_decay=1e-4, decay_norm_and_bias=True)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}


# -- bad input -----------------------------------------------------------------------------------


def _square(i: int, image_id: int, cat: int, bbox: list) -> dict:
    x, y, w, h = bbox
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0,
            "area": w * h, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}  # fmt: skip


def _write_coco(root: Path, split: str, n: int, *, corrupt: int | None = None) -> None:
    """``n`` 48x64 images with one good square each, plus every kind of bad entry."""
    folder = root / split
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n + 1):
        pixels = rng.integers(0, 60, (48, 64, 3)).astype(np.uint8)
        pixels[10:30, 20:40] = 200
        Image.fromarray(pixels).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 48, "width": 64})
        anns.append(_square(len(anns) + 1, i, 1 + i % 2, [20, 10, 20, 20]))
    if corrupt is not None:
        (folder / f"{corrupt}.png").write_bytes(b"not a png")  # unreadable when read
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "empty.png")
    images += [
        {"id": 100, "file_name": "missing.png", "height": 48, "width": 64},  # no such file
        {"id": 101, "file_name": "empty.png", "height": 48, "width": 64},  # no annotation
    ]
    anns += [
        _square(900, 1, 5, [1, 1, 5, 5]),  # category 5 exists but is out of range (num_classes 3)
        _square(901, 1, 9, [1, 1, 5, 5]),  # category 9 is not listed
        _square(902, 2, 1, [5, 5, 0, 7]),  # zero width
        _square(903, 2, 1, [70, 5, 5, 5]),  # right of the image
        _square(904, 100, 1, [5, 5, 5, 5]),  # of the missing image
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )


def test_bad_coco_input_is_skipped_and_counted_never_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _write_coco(root, "train2017", 6, corrupt=3)
    _write_coco(root, "val2017", 4, corrupt=2)
    cfg = _cfg(
        root,
        model="maskrcnn_tiny",
        data={"format": "coco", "train_split": "train2017", "val_split": "val2017",
              "max_skip_fraction": 0.5, "kwargs": {}},
        train={"steps": 4},
    )  # fmt: skip
    result = train(config_from_dict(cfg), out_dir=tmp_path / "run")
    # found when the data set was built: counted by reason
    assert result["data_skipped"] == {
        "category_out_of_range": 1,
        "degenerate_box": 2,
        "missing_image": 1,
        "no_annotations": 1,
        "unknown_category": 1,
    }
    # found when read: the corrupt image was replaced in training, left out of the evaluation
    assert result["skipped"] == 1
    assert result["val_skipped"] == 1 and result["val_num_images"] == 4  # 3 read + the empty one


def test_data_that_cannot_train_stops_before_training_with_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}],
                    "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    )  # fmt: skip
    cfg = _cfg(root, data={"format": "coco", "train_split": "train2017", "kwargs": {}})
    with pytest.raises(ValueError, match=r"no usable images.*1 missing_image"):
        train(config_from_dict(cfg), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = _cfg(root, data={"format": "coco", "train_split": "train2014", "kwargs": {}})
    with pytest.raises(FileNotFoundError, match="train2014"):
        train(config_from_dict(cfg), out_dir=tmp_path / "run")
    cfg = _cfg(root, data={"format": "folder"})
    with pytest.raises(ValueError, match="not a detection format; expected coco"):
        train(config_from_dict(cfg), out_dir=tmp_path / "run")
    with pytest.raises(TypeError, match="SyntheticDetectionSpec or keywords of COCODetection"):
        train(config_from_dict(_cfg(root, data={"kwargs": {"num_trian": 4}})),
              out_dir=tmp_path / "run")  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown data\.task .detect.*.detection."):
        config_from_dict(_cfg(root, data={"task": "detect"}))


def test_masks_are_read_for_mask_rcnn_only(tmp_path: Path) -> None:
    from nonlocalnet.engine import build_datasets

    mask_set, _ = build_datasets(config_from_dict(_cfg(tmp_path)), val=False)
    box_set, _ = build_datasets(config_from_dict(_cfg(tmp_path, model="faster_rcnn_tiny")),
                                val=False)  # fmt: skip
    assert "masks" in mask_set[0]["target"] and "masks" not in box_set[0]["target"]
    forced, _ = build_datasets(
        config_from_dict(_cfg(tmp_path, data={"kwargs": {"num_train": 6, "num_val": 4, "seed": 1,
                                                         "masks": False}})),
        val=False,
    )  # fmt: skip
    assert "masks" not in forced[0]["target"]


# -- DDP -----------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.distributed
def test_two_processes_train_and_gather_the_coco_evaluation(tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2 (gloo): each process trains on its shard and evaluates half
    of the images; the COCO results are gathered, so the final AP is that of the whole set."""
    cfg = _cfg(tmp_path / "data", train={"steps": 3, "batch_size": 1, "checkpoint_every": 3},
               eval={"batch_size": 2, "max_samples": 3})  # fmt: skip
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nonlocalnet.cli", "train", "--config", str(path), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "final_metrics.json").read_text())
    # 3 images over 2 processes (one padded repeat, counted once)
    assert metrics["val_num_images"] == 3
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == ["checkpoint_00000003.pt"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]
    # the gathered evaluation equals one process evaluating the saved weights
    again = evaluate(config_from_dict(cfg), out)
    for key in ("bbox_AP", "bbox_AR100", "segm_AP", "segm_AR100"):
        assert again[key] == pytest.approx(metrics[f"val_{key}"]), key
    assert again["num_images"] == 3
