"""Image classification data: one folder per class, loaded with Pillow.

:class:`ImageFolderDataset` yields ``{"image": float (3, H, W), "label": int, "index": int,
"path": str}``. Training: random resized crop → flip → normalise; test: resize the short side →
centre crop → normalise (sizes configurable, ImageNet defaults 224 / 256).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .._checks import check_choice
from ._seeding import SampleSeeder
from .samples import read_or_skip
from .transforms import IMAGENET_MEAN, IMAGENET_STD, image_test_transform, image_train_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an image file as RGB ``uint8`` ``(3, H, W)``.

    Raises:
        OSError: the file cannot be read as an image (the message names it).
    """
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W)


def load_mask(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read a single-channel label image (``L``, ``P`` or ``I`` mode) as ``int64`` ``(H, W)``.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file has several channels (an RGB colour mask, not class indices).
    """
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(
                    f"mask {path} must be a single-channel image of class indices "
                    f"(mode L, P or I), got mode {img.mode}"
                )
            array = np.asarray(img).astype(np.int64)
    except OSError as e:
        raise OSError(f"cannot read mask {path}: {e}") from e
    return torch.from_numpy(array)  # (H, W)


def scan_image_folders(
    root: str | os.PathLike[str],
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    classes: Sequence[str] | None = None,
) -> tuple[list[tuple[str, int]], list[str]]:
    """``[(path, label)]`` and class names from one sub-folder per class (sorted names).

    Raises:
        FileNotFoundError: ``root`` or a named class folder is missing.
        ValueError: no class folders or no image files.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image data root not found (or not a directory): {root_path}")
    names = (
        sorted(d.name for d in root_path.iterdir() if d.is_dir())
        if classes is None
        else list(classes)
    )
    if not names:
        raise ValueError(f"image data root {root_path} has no class sub-folders")
    exts = tuple(e.lower() for e in extensions)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(names):
        folder = root_path / name
        if not folder.is_dir():
            raise FileNotFoundError(f"class folder {name!r} not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        samples += [(str(p), label) for p in files]
    if not samples:
        raise ValueError(
            f"image data root {root_path} has no files with extensions {', '.join(exts)}"
        )
    return samples, names


class ImageFolderDataset(Dataset):
    """Image classification from one sub-folder per class.

    Args:
        root: the data root.
        mode: ``"train"`` or ``"test"``.
        crop_size: output size (train and test).
        short_side: test resize of the short side before the centre crop.
        scale: training random-resized-crop area range.
        flip_p: training flip probability.
        mean: normalisation mean per channel (on [0, 1] values).
        std: normalisation std per channel.
        transform: replaces the default: ``transform(image_uint8_chw, generator=g)``.
        classes: class folder names in index order (default: sorted sub-folders).
        extensions: accepted file extensions.
        seed: sample randomness (see :mod:`nonlocalnet.data._seeding`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        mode: str = "train",
        crop_size: int = 224,
        short_side: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        flip_p: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Callable[..., torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        seed: int | None = None,
    ) -> None:
        check_choice("mode", mode, ("train", "test"))
        self.samples, self.classes = scan_image_folders(
            root, extensions=extensions, classes=classes
        )
        self.num_classes = len(self.classes)
        self.mode = mode
        if transform is None:
            if mode == "train":
                transform = image_train_transform(
                    crop_size=crop_size, scale=scale, flip_p=flip_p, mean=mean, std=std
                )
            else:
                transform = image_test_transform(
                    short_side=short_side, crop_size=crop_size, mean=mean, std=std
                )
        self.transform = transform
        self.seeder = SampleSeeder(seed)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops of the next epoch (with ``seed`` set)."""
        self.seeder.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        g = self.seeder.generator(index) if self.mode == "train" else None
        image = self.transform(load_image(path), generator=g)
        return {"image": image, "label": label, "index": index, "path": path}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample dict; an unreadable image is skipped (see :mod:`nonlocalnet.data.samples`)."""
        return read_or_skip(
            index, len(self.samples), self._read, lambda j: self.samples[j][0],
            train=self.mode == "train", input_key="image",
        )  # fmt: skip
