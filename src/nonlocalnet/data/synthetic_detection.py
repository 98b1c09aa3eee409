"""A built-in COCO-format detection set whose labels need long-range context.

Every image holds a few identical grey squares (or discs) in its central region, and one small
coloured *cue* disc in one of its four corners (the other three corners hold grey discs of the
same size). The cue's colour sets the class of *every* object of the image: red → ``class_a``
(category 1), blue → ``class_b`` (category 2). An object's own pixels, and everything near it,
look the same under both classes; only the distant cue tells them apart.

How the data are drawn, so that nothing but the cue carries the class:

- the two classes are exactly balanced over the images of each split, in random order;
- the cue's corner, the number, size, places and grey level of the objects, the grey levels of
  the corner discs, the background level and its noise are drawn independently of the class;
- objects stay at least ``gap`` pixels inside the band the corner discs occupy, so a detector
  must carry the cue's colour across about half the image to name an object.

A detector whose features at an object do not reach the cue can localise the objects but can
do no better than a coin flip on their class: its best scores put both classes on each box,
and its box AP is about half of what a detector that sees the cue reaches. A GC block (one
global context vector per image added to every position) or an NL block can bring the cue's
colour to the objects.

Files on disk
-------------
``generate_detection_dataset(root, spec)`` writes ``root/<key>/`` with
``images/{train,val}/*.png``, ``instances_train.json`` / ``instances_val.json`` (COCO format:
squares as polygons, discs as compressed RLE), ``spec.json`` and ``metadata.json`` (per image:
class, cue corner and colour, object boxes; written last, as the completion marker). ``<key>``
is a hash of the parameters and seed, so a second call with the same spec reuses the files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic import (
    PALETTE,
    disc_mask,
    finish_folder,
    prepare_folder,
    sample_rng,
    spec_key,
    split_labels,
)

__all__ = [
    "CUE_COLOURS",
    "DETECTION_CLASSES",
    "SyntheticDetectionSpec",
    "detection_split_paths",
    "generate_detection_dataset",
    "make_detection_sample",
]

log = logging.getLogger(__name__)

#: category names; category id k + 1 for class k.
DETECTION_CLASSES = ("class_a", "class_b")
#: the cue's colour per class: red for class_a, blue for class_b.
CUE_COLOURS: tuple[tuple[int, int, int], ...] = (PALETTE[0], PALETTE[2])
SHAPES = ("square", "disc")


@dataclass(frozen=True)
class SyntheticDetectionSpec:
    """Parameters of the detection set (all of them enter the cache key).

    Attributes:
        num_train: training images (even: balanced classes).
        num_val: validation images (even).
        height: image height in pixels.
        width: image width in pixels.
        min_objects: fewest objects per image.
        max_objects: most objects per image.
        min_size: smallest object side (or diameter) in pixels.
        max_size: largest object side (or diameter).
        shape: ``"square"`` (polygon annotations) or ``"disc"`` (RLE annotations).
        cue_radius: radius of the corner discs.
        cue_margin: distance from the borders to the corner discs.
        gap: extra distance between the corner discs' band and the objects.
        noise: standard deviation of the background's Gaussian noise (grey levels).
        seed: seed of everything.
    """

    num_train: int = 256
    num_val: int = 64
    height: int = 128
    width: int = 160
    min_objects: int = 1
    max_objects: int = 3
    min_size: int = 16
    max_size: int = 28
    shape: str = "square"
    cue_radius: int = 6
    cue_margin: int = 4
    gap: int = 4
    noise: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, n in (("num_train", self.num_train), ("num_val", self.num_val)):
            if n < 2 or n % 2:
                raise ValueError(f"{name} must be an even number >= 2 (balanced classes), got {n}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 2 <= self.min_size <= self.max_size:
            raise ValueError(
                f"need 2 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )
        if self.cue_radius < 1 or self.cue_margin < 0 or self.gap < 0 or self.noise < 0:
            raise ValueError(
                "cue_radius must be >= 1 and cue_margin, gap, noise >= 0, got "
                f"{self.cue_radius}, {self.cue_margin}, {self.gap}, {self.noise}"
            )
        free = min(self.height, self.width) - 2 * self.inner
        if free < self.max_size:
            raise ValueError(
                f"a {self.height}x{self.width} image leaves a central region of {free} pixels "
                f"inside the corner discs' band ({self.inner} pixels), smaller than max_size "
                f"{self.max_size}"
            )

    @property
    def inner(self) -> int:
        """Distance from the borders to the region where objects lie."""
        return self.cue_margin + 2 * self.cue_radius + self.gap

    def key(self) -> str:
        """Short hash of all parameters: the cache folder name."""
        return spec_key("detection", self)


def _place(
    rng: np.random.Generator, spec: SyntheticDetectionSpec, n: int
) -> list[tuple[int, int, int]]:
    """Up to n non-overlapping (x, y, size) in the central region (2 pixels apart), drawn at
    random (100 tries per object); at least ``spec.min_objects`` of them.

    Raises:
        ValueError: fewer than ``spec.min_objects`` objects found room (a central region too
            small for that many objects of these sizes).
    """
    lo = spec.inner
    placed: list[tuple[int, int, int]] = []
    for _ in range(100 * n):
        if len(placed) == n:
            break
        s = int(rng.integers(spec.min_size, spec.max_size + 1))
        x = int(rng.integers(lo, spec.width - lo - s + 1))
        y = int(rng.integers(lo, spec.height - lo - s + 1))
        if all(
            x + s + 2 <= px or px + ps + 2 <= x or y + s + 2 <= py or py + ps + 2 <= y
            for px, py, ps in placed
        ):
            placed.append((x, y, s))
    if len(placed) < spec.min_objects:
        raise ValueError(
            f"only {len(placed)} of min_objects={spec.min_objects} non-overlapping objects of "
            f"size {spec.min_size}..{spec.max_size} found room in the "
            f"{spec.height - 2 * lo}x{spec.width - 2 * lo} central region of a "
            f"{spec.height}x{spec.width} image after {100 * n} tries; lower min_objects or "
            "max_size, or enlarge the image"
        )
    return placed


def make_detection_sample(
    spec: SyntheticDetectionSpec, label: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Draw one image.

    Args:
        spec: generator parameters.
        label: 0 (red cue, ``class_a``) or 1 (blue cue, ``class_b``).
        rng: the image's random generator.

    Returns:
        ``(image, objects, meta)``: uint8 ``(H, W, 3)``; per object a COCO annotation without
        ids (``category_id``, ``bbox`` x y w h, ``area``, ``segmentation``, ``iscrowd``); the
        drawn parameters.
    """
    from pycocotools import mask as mask_utils

    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    h, w = spec.height, spec.width
    background = int(rng.integers(10, 50))
    noise = rng.normal(0.0, spec.noise, size=(h, w, 1)) if spec.noise else np.zeros((h, w, 1))
    image = np.clip(background + noise, 0, 255).repeat(3, axis=2).astype(np.uint8)  # (H, W, 3)

    cue_corner = int(rng.integers(4))
    c = spec.cue_margin + spec.cue_radius
    centres = [(c, c), (c, w - 1 - c), (h - 1 - c, c), (h - 1 - c, w - 1 - c)]  # (y, x)
    greys = [int(rng.integers(90, 200)) for _ in range(4)]
    for k, (cy, cx) in enumerate(centres):
        colour = CUE_COLOURS[label] if k == cue_corner else (greys[k],) * 3
        image[disc_mask((h, w), (cy, cx), spec.cue_radius)] = colour

    grey = int(rng.integers(120, 220))
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    objects = []
    for x, y, s in _place(rng, spec, n):
        if spec.shape == "square":
            image[y : y + s, x : x + s] = grey
            segmentation: Any = [[x, y, x + s, y, x + s, y + s, x, y + s]]
            bbox, area = [x, y, s, s], s * s
        else:
            r = (s - 1) / 2
            mask = disc_mask((h, w), (y + r, x + r), r)  # (H, W)
            image[mask] = grey
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            ys, xs = np.nonzero(mask)
            bbox = [
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            ]
            area = int(mask.sum())
        objects.append(
            {
                "category_id": label + 1,
                "bbox": bbox,
                "area": area,
                "segmentation": segmentation,
                "iscrowd": 0,
            }
        )
    meta = {
        "label": label,
        "cue_corner": cue_corner,
        "cue_colour": list(CUE_COLOURS[label]),
        "background": background,
        "object_grey": grey,
        "boxes": [o["bbox"] for o in objects],
    }
    return image, objects, meta


def detection_split_paths(folder: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """``(image folder, annotation file)`` of a split of a generated folder."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(folder)
    return root / "images" / split, root / f"instances_{split}.json"


def generate_detection_dataset(
    root: str | os.PathLike[str],
    spec: SyntheticDetectionSpec | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write (or reuse) the detection set under ``root/<spec.key()>``.

    Args:
        root: cache folder.
        spec: generator parameters (defaults: :class:`SyntheticDetectionSpec`).
        overwrite: regenerate even when a complete copy exists.

    Returns:
        The data folder (see :func:`detection_split_paths`).
    """
    from PIL import Image

    spec = spec or SyntheticDetectionSpec()
    out, cached = prepare_folder(root, spec.key(), overwrite)
    if cached:
        return out
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(DETECTION_CLASSES)]
    metadata: dict[str, list[dict[str, Any]]] = {}
    for split, n in (("train", spec.num_train), ("val", spec.num_val)):
        image_dir, ann_file = detection_split_paths(out, split)
        image_dir.mkdir(parents=True)
        images, annotations, metas = [], [], []
        for i, label in enumerate(split_labels(spec.seed, split, n)):
            image, objects, meta = make_detection_sample(
                spec, int(label), sample_rng(spec.seed, split, i)
            )
            name = f"{i:05d}.png"
            Image.fromarray(image).save(image_dir / name)
            image_id = i + 1
            images.append(
                {"id": image_id, "file_name": name, "height": spec.height, "width": spec.width}
            )
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
            metas.append({"image_id": image_id, "file_name": name, **meta})
        ann_file.write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
        metadata[split] = metas
    finish_folder(out, spec, metadata, classes=None)  # the classes are the JSON's categories
    log.info("wrote %d + %d synthetic detection images to %s", spec.num_train, spec.num_val, out)
    return out
