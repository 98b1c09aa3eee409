"""train()/evaluate() on the real file formats: mp4 list files, image class folders,
Cityscapes layout and image/mask folder pairs, including unreadable videos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nonlocalnet.engine import config_from_dict, evaluate, train


def _cfg(model: str, data: dict[str, Any], **train_kw: Any) -> Any:
    return config_from_dict(
        {
            "model": {"name": model, "kwargs": {"width": 4} if model.startswith("toy:") else {}},
            "data": {"num_workers": 0, **data},
            "optim": {"lr": 0.05},
            "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2,
                      "progress": False, **train_kw},
            "eval": {"batch_size": 2, "num_clips": 2, "num_crops": 3},
        }
    )  # fmt: skip


@pytest.mark.video_io
def test_video_list_files_with_an_unreadable_video(tmp_path: Path) -> None:
    from nonlocalnet.data.synthetic import SyntheticVideoSpec, generate_video_dataset

    folder = generate_video_dataset(tmp_path / "syn", SyntheticVideoSpec(num_train=8, num_val=4))
    # Corrupt one validation video: evaluation must skip it and count it, not fail.
    val_lines = (folder / "val.txt").read_text().split()
    (folder / val_lines[0]).write_bytes(b"not an mp4")
    data = {"task": "video", "format": "list", "root": str(folder), "train_split": "train.txt",
            "val_split": "val.txt", "num_classes": 2, "num_frames": 4, "sampling_rate": 2,
            "train_jitter": [32, 36], "train_crop": 32, "test_short_side": 32, "test_crop": 32,
            "max_skip_fraction": 0.5}  # fmt: skip
    config = _cfg("nl_c2d_tiny", data)
    result = train(config, out_dir=tmp_path / "run")
    assert result["val_num_samples"] == 3 and result["val_skipped"] == 1
    again = evaluate(config, tmp_path / "run")
    assert again["top1"] == result["val_top1"]


def test_image_folders(tmp_path: Path) -> None:
    from nonlocalnet.data.synthetic import SyntheticImageSpec, generate_image_dataset

    folder = generate_image_dataset(tmp_path / "img", SyntheticImageSpec(num_train=6, num_val=4))
    data = {"task": "image", "format": "folder", "root": str(folder), "train_split": "train",
            "val_split": "val", "num_classes": 2, "train_crop": 32, "test_short_side": 32,
            "test_crop": 32}  # fmt: skip
    result = train(_cfg("resnet_tiny", data), out_dir=tmp_path / "run")
    assert result["val_num_samples"] == 4
    assert result["val_top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)


def _write_pairs(folder: Path, n: int, size: int = 16) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = rng.integers(0, 3, (size, size)).astype(np.uint8)
        mask[0] = 255
        image = np.stack([(mask == c) * 200 for c in range(3)], -1).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:03d}.png")


def test_segmentation_folder_pairs_and_cityscapes_layout(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "pairs" / "train", 4)
    _write_pairs(tmp_path / "pairs" / "val", 2)
    data = {"task": "segmentation", "format": "pairs", "root": str(tmp_path / "pairs"),
            "num_classes": 3, "seg_crop": [12, 12], "scale_range": [0.75, 1.25]}  # fmt: skip
    result = train(_cfg("seg_tiny", data), out_dir=tmp_path / "run")
    assert result["val_num_pixels"] == 2 * 15 * 16  # row 0 ignored
    assert len(result["val_per_class_iou"]) == 3

    # Cityscapes layout: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine labelTrainIds.
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        src = tmp_path / "pairs" / split
        for kind, suffix, sub in (("leftImg8bit", "_leftImg8bit.png", "images"),
                                  ("gtFine", "_gtFine_labelTrainIds.png", "masks")):  # fmt: skip
            out = root / kind / split / "aachen"
            out.mkdir(parents=True)
            for p in sorted((src / sub).iterdir()):
                (out / f"aachen_000000_{p.stem}{suffix}").write_bytes(p.read_bytes())
    data.update(format="cityscapes", root=str(root), train_split="train", val_split="val")
    config = _cfg("seg_tiny", data)
    result2 = train(config, out_dir=tmp_path / "run2")
    assert result2["val_num_pixels"] == result["val_num_pixels"]
    assert evaluate(config, tmp_path / "run2")["mean_iou"] == pytest.approx(result2["val_mean_iou"])


def test_missing_data_root_stops_before_training(tmp_path: Path) -> None:
    data = {"task": "video", "format": "list", "root": str(tmp_path / "nowhere"),
            "train_split": "train.txt", "num_classes": 2}  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"train\.txt"):
        train(_cfg("c2d_tiny", data), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
