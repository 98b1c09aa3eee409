"""Semantic segmentation data: the Cityscapes layout and generic image-folder / mask-folder pairs.

Both datasets yield ``{"image": float (3, H, W), "mask": int64 (H, W), "index": int, "path": str}``
with ``ignore_index`` (255) marking pixels that do not count. Pairs are matched when the dataset is
built; a missing mask is an error naming the file that was expected.

Cityscapes: ``<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` is paired with
``<root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (19 train ids, 255 = ignore; create
those files with cityscapesscripts' ``createTrainIdLabelImgs.py``).

Training transforms (ANN / mmseg recipe): random scale in [0.5, 2] → random crop (769 for
Cityscapes), padded with the ignore index → horizontal flip → normalise; the mask is resized with
nearest-neighbour. Test: the full image, normalised.
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
from .image import IMAGE_EXTENSIONS, load_image, load_mask
from .samples import read_or_skip
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    segmentation_test_transform,
    segmentation_train_transform,
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


def cityscapes_pairs(
    root: str | os.PathLike[str], split: str, *, label_suffix: str = LABEL_SUFFIX
) -> list[tuple[str, str]]:
    """``[(image, mask)]`` of a Cityscapes split, sorted by image path.

    Raises:
        FileNotFoundError: the root or split folder, or the mask of some image, is missing.
        ValueError: the split has no images.
    """
    root_path = Path(root)
    image_dir = root_path / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"Cityscapes images not found: {image_dir} (expected <root>/leftImg8bit/<split>/<city>/)"
        )
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise ValueError(f"no *{IMAGE_SUFFIX} files under {image_dir}/<city>/")
    pairs = []
    for image in images:
        name = image.name[: -len(IMAGE_SUFFIX)]
        mask = root_path / "gtFine" / split / image.parent.name / f"{name}{label_suffix}"
        if not mask.is_file():
            hint = ""
            if mask.with_name(f"{name}_gtFine_labelIds.png").is_file():
                hint = " (labelIds exist: create train ids with cityscapesscripts' createTrainIdLabelImgs.py)"
            raise FileNotFoundError(f"label file not found for {image}: expected {mask}{hint}")
        pairs.append((str(image), str(mask)))
    return pairs


def folder_pairs(
    image_dir: str | os.PathLike[str],
    mask_dir: str | os.PathLike[str],
    *,
    image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
    mask_extensions: Sequence[str] = (".png", ".bmp"),
) -> list[tuple[str, str]]:
    """``[(image, mask)]`` matched by file stem (``a.jpg`` ↔ ``a.png``), sorted by image path.

    Raises:
        FileNotFoundError: a folder, or the mask of some image, is missing.
        ValueError: no images, or several masks with the same stem.
    """
    folders = []
    for name, d in (("image folder", image_dir), ("mask folder", mask_dir)):
        p = Path(d)
        if not p.is_dir():
            raise FileNotFoundError(f"{name} not found (or not a directory): {p}")
        folders.append(p)
    image_path, mask_path = folders
    iexts = tuple(e.lower() for e in image_extensions)
    mexts = tuple(e.lower() for e in mask_extensions)
    images = sorted(p for p in image_path.iterdir() if p.is_file() and p.suffix.lower() in iexts)
    if not images:
        raise ValueError(
            f"image folder {image_path} has no files with extensions {', '.join(iexts)}"
        )
    masks: dict[str, Path] = {}
    for p in sorted(mask_path.iterdir()):
        if p.is_file() and p.suffix.lower() in mexts:
            if p.stem in masks:
                raise ValueError(f"two masks with stem {p.stem!r}: {masks[p.stem]} and {p}")
            masks[p.stem] = p
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise FileNotFoundError(
                f"mask not found for {image}: expected {mask_path / image.stem}"
                f"{{{','.join(mexts)}}}"
            )
        pairs.append((str(image), str(masks[image.stem])))
    return pairs


class SegmentationDataset(Dataset):
    """Image + mask pairs with joint transforms (see the module docstring).

    Args:
        pairs: ``[(image_path, mask_path)]``.
        mode: ``"train"`` (random scale / crop / flip) or ``"test"`` (full image).
        crop_size: training crop, ``int`` or ``(H, W)``.
        scale_range: training random scale range.
        ignore_index: mask value of pixels that do not count (also used for crop padding).
        num_classes: if given, mask values outside ``[0, num_classes)`` and ``ignore_index`` raise.
        mean: normalisation mean per channel (on [0, 1] values).
        std: normalisation std per channel.
        transform: replaces the default: ``transform(image_uint8, mask, generator=g)`` returning
            ``(image, mask)``.
        seed: sample randomness (see :mod:`nonlocalnet.data._seeding`).
        flip_p: training flip probability.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        mode: str = "train",
        crop_size: int | Sequence[int] = 769,
        scale_range: tuple[float, float] = (0.5, 2.0),
        ignore_index: int = 255,
        num_classes: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        classes: Sequence[str] | None = None,
        seed: int | None = None,
        flip_p: float = 0.5,
    ) -> None:
        check_choice("mode", mode, ("train", "test"))
        if not pairs:
            raise ValueError("SegmentationDataset needs at least one (image, mask) pair, got none")
        self.pairs = list(pairs)
        self.mode = mode
        self.ignore_index = ignore_index
        self.classes = list(classes) if classes is not None else None
        if num_classes is None and self.classes is not None:
            num_classes = len(self.classes)
        self.num_classes = num_classes
        if transform is None:
            if mode == "train":
                transform = segmentation_train_transform(
                    crop_size=crop_size, scale_range=scale_range, ignore_index=ignore_index,
                    mean=mean, std=std, flip_p=flip_p,
                )  # fmt: skip
            else:
                transform = segmentation_test_transform(mean=mean, std=std)
        self.transform = transform
        self.seeder = SampleSeeder(seed)

    @classmethod
    def cityscapes(
        cls,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        mode: str | None = None,
        label_suffix: str = LABEL_SUFFIX,
        **kwargs: Any,
    ) -> SegmentationDataset:
        """Cityscapes fine annotations; ``mode`` defaults to ``"train"`` for the train split."""
        pairs = cityscapes_pairs(root, split, label_suffix=label_suffix)
        kwargs.setdefault("classes", CITYSCAPES_CLASSES)
        return cls(pairs, mode=mode or ("train" if split == "train" else "test"), **kwargs)

    @classmethod
    def from_folders(
        cls, image_dir: str | os.PathLike[str], mask_dir: str | os.PathLike[str], **kwargs: Any
    ) -> SegmentationDataset:
        """Images and masks in two folders, matched by file stem."""
        return cls(folder_pairs(image_dir, mask_dir), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Change the random scales / crops of the next epoch (with ``seed`` set)."""
        self.seeder.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample dict; an unreadable pair (a corrupt file, a mask of another size or with
        values outside the classes, an RGB mask) is skipped (see :mod:`nonlocalnet.data.samples`)."""
        return read_or_skip(
            index, len(self.pairs), self._read, lambda j: self.pairs[j][0],
            train=self.mode == "train", input_key="image",
        )  # fmt: skip

    def _read(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        image, mask = load_image(image_path), load_mask(mask_path)
        if image.shape[-2:] != mask.shape:
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[-2:])} but its mask {mask_path} is "
                f"{tuple(mask.shape)}"
            )
        if self.num_classes is not None:
            bad = ((mask >= self.num_classes) & (mask != self.ignore_index)) | (mask < 0)
            if bad.any():
                values = sorted(set(mask[bad].unique().tolist()))[:5]
                raise ValueError(
                    f"mask {mask_path} has values {values} outside [0, {self.num_classes}) and "
                    f"ignore_index {self.ignore_index}"
                )
        g = self.seeder.generator(index) if self.mode == "train" else None
        image, mask = self.transform(image, mask, generator=g)
        return {"image": image, "mask": mask.long(), "index": index, "path": image_path}
