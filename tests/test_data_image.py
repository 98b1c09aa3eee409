"""Image folders, Cityscapes and folder-pair segmentation data with tiny PNGs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nonlocalnet.data import (
    ImageFolderDataset,
    SegmentationDataset,
    cityscapes_pairs,
    collate_samples,
    folder_pairs,
    load_image,
    load_mask,
)


def save_rgb(path: Path, value: int, h: int = 20, w: int = 30, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = value
    rgb[..., 1] = np.arange(w, dtype=np.uint8)[None, :]  # green = column index
    rgb[..., 2] = np.arange(h, dtype=np.uint8)[:, None]  # blue = row index
    Image.fromarray(rgb).save(path, format=fmt)
    return path


def save_mask(path: Path, h: int = 20, w: int = 30) -> Path:
    """Label = column index // 4, except the top-left 2x2 block which is ignore (255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.tile((np.arange(w) // 4).astype(np.uint8), (h, 1))
    mask[:2, :2] = 255
    Image.fromarray(mask, mode="L").save(path)
    return path


def test_load_image_and_mask(tmp_path: Path) -> None:
    img = load_image(save_rgb(tmp_path / "a.png", 9))
    assert img.shape == (3, 20, 30) and img.dtype == torch.uint8
    assert img[0].unique().tolist() == [9] and img[1, 5, 7] == 7 and img[2, 5, 7] == 5
    mask = load_mask(save_mask(tmp_path / "m.png"))
    assert mask.dtype == torch.int64 and mask[5, 13] == 3 and mask[0, 0] == 255
    with pytest.raises(ValueError, match="must be a single-channel image"):
        load_mask(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(OSError, match=r"cannot read image .*broken\.png"):
        load_image(tmp_path / "broken.png")


def test_image_folder_dataset(tmp_path: Path) -> None:
    save_rgb(tmp_path / "dog" / "1.png", 200)
    save_rgb(tmp_path / "dog" / "2.JPG", 200, fmt="JPEG")
    save_rgb(tmp_path / "cat" / "x.bmp", 50)
    save_rgb(tmp_path / "cat" / "y.webp", 50, fmt="WEBP")
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    test = ImageFolderDataset(
        tmp_path, mode="test", short_side=20, crop_size=16, mean=(0, 0, 0), std=(1, 1, 1)
    )
    assert test.classes == ["cat", "dog"] and len(test) == 4
    sample = test[0]
    assert (sample["label"], sample["index"], Path(sample["path"]).name) == (0, 0, "x.bmp")
    image = sample["image"]
    assert image.shape == (3, 16, 16)
    # 20x30 resized to short side 20 is unchanged; centre 16x16 starts at row 2, column 7
    assert image[2, 0, 0] * 255 == pytest.approx(2, abs=1e-4)
    assert image[1, 0, 0] * 255 == pytest.approx(7, abs=1e-4)
    assert [test[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    train = ImageFolderDataset(tmp_path, crop_size=8, seed=3)
    a, b = train[3]["image"], train[3]["image"]
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    assert torch.equal(pickle.loads(pickle.dumps(train))[3]["image"], a)  # spawn-safe
    batch = collate_samples([train[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].tolist() == [0, 0, 1, 1]
    assert isinstance(batch["path"], list) and len(batch["path"]) == 4 and batch["unreadable"] == []
    with pytest.raises(FileNotFoundError, match="image data root not found"):
        ImageFolderDataset(tmp_path / "missing")


def _cityscapes(root: Path, split: str = "val") -> None:
    for city, names in {"aachen": ["aachen_000000_000019"], "bonn": ["bonn_000001_000019"]}.items():
        for name in names:
            save_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 1)
            save_mask(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png")


def test_cityscapes_layout(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    pairs = cityscapes_pairs(tmp_path, "val")
    assert [(Path(i).name, Path(m).relative_to(tmp_path).as_posix()) for i, m in pairs] == [
        ("aachen_000000_000019_leftImg8bit.png", "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"),
        ("bonn_000001_000019_leftImg8bit.png", "gtFine/val/bonn/bonn_000001_000019_gtFine_labelTrainIds.png"),
    ]  # fmt: skip
    ds = SegmentationDataset.cityscapes(tmp_path, "val", mean=(0, 0, 0), std=(1, 1, 1))
    assert ds.mode == "test" and ds.num_classes == 19
    sample = ds[1]
    assert sample["image"].shape == (3, 20, 30) and sample["mask"].shape == (20, 30)
    assert sample["mask"][7, 29] == 7 and sample["mask"][1, 1] == 255
    assert sample["image"][1, 3, 12] * 255 == pytest.approx(12, abs=1e-4)
    # a missing label file is an error naming it, with a hint when only labelIds exist
    extra = tmp_path / "leftImg8bit" / "val" / "bonn" / "bonn_000002_000019_leftImg8bit.png"
    save_rgb(extra, 1)
    save_mask(tmp_path / "gtFine" / "val" / "bonn" / "bonn_000002_000019_gtFine_labelIds.png")
    with pytest.raises(
        FileNotFoundError,
        match=r"expected .*bonn_000002_000019_gtFine_labelTrainIds\.png.*createTrainIdLabelImgs",
    ):
        cityscapes_pairs(tmp_path, "val")
    with pytest.raises(
        FileNotFoundError, match=r"Cityscapes images not found: .*leftImg8bit/train"
    ):
        cityscapes_pairs(tmp_path, "train")


def test_cityscapes_train_transform_and_label_range(tmp_path: Path) -> None:
    _cityscapes(tmp_path, "train")
    ds = SegmentationDataset.cityscapes(
        tmp_path,
        "train",
        crop_size=24,
        scale_range=(1.0, 1.0),
        seed=0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    sample = ds[0]
    again = pickle.loads(pickle.dumps(ds))[0]  # spawn-safe, and the same given the seed
    assert torch.equal(again["image"], sample["image"]) and torch.equal(
        again["mask"], sample["mask"]
    )
    image, mask = sample["image"], sample["mask"]
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24)
    assert bool((mask[20:] == 255).all())  # 20 rows padded to 24 with the ignore index
    # image and mask stay aligned (green = column, label = column // 4), flipped or not
    cols = (image[1, :20] * 255).round().long()
    valid = mask[:20] != 255
    assert torch.equal((cols // 4)[valid], mask[:20][valid])
    strict = SegmentationDataset.cityscapes(tmp_path, "train", num_classes=5, crop_size=8)
    with pytest.raises(
        ValueError, match=r"values \[5, 6, 7\] outside \[0, 5\) and ignore_index 255"
    ):
        strict._read(0)  # the check of one sample; the dataset skips such samples
    with pytest.raises(RuntimeError, match=r"10 consecutive unreadable samples"):
        strict[0]  # every entry (the only one, ten times) is unreadable


def test_folder_pairs(tmp_path: Path) -> None:
    save_rgb(tmp_path / "img" / "b.jpg", 3, fmt="JPEG")
    save_rgb(tmp_path / "img" / "a.png", 3)
    save_mask(tmp_path / "ann" / "a.png")
    save_mask(tmp_path / "ann" / "b.png")
    pairs = folder_pairs(tmp_path / "img", tmp_path / "ann")
    assert [(Path(i).name, Path(m).name) for i, m in pairs] == [
        ("a.png", "a.png"),
        ("b.jpg", "b.png"),
    ]
    ds = SegmentationDataset.from_folders(tmp_path / "img", tmp_path / "ann", mode="test")
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples)
    (batch,) = list(loader)
    assert batch["image"].shape == (2, 3, 20, 30) and batch["mask"].shape == (2, 20, 30)
    assert batch["mask"][:, 7, 29].tolist() == [7, 7]
    save_rgb(tmp_path / "img" / "c.png", 3)
    with pytest.raises(FileNotFoundError, match=r"mask not found for .*c\.png: expected .*ann/c"):
        folder_pairs(tmp_path / "img", tmp_path / "ann")
    with pytest.raises(FileNotFoundError, match="mask folder not found"):
        folder_pairs(tmp_path / "img", tmp_path / "nope")
