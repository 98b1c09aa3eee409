"""COCO-format instance data (``instances_*.json`` + an image folder), read with pycocotools.

:class:`COCODetection` yields what torchvision's detectors take::

    {"image": float (3, H, W) in [0, 1],
     "target": {"boxes": float (N, 4) x1 y1 x2 y2 in pixels, "labels": int64 (N,),
                "masks": uint8 (N, H, W) (with ``masks=True``), "image_id": int (COCO id),
                "area": float (N,) (COCO's segment area), "iscrowd": int64 (N,)},
     "index": int, "path": str, "skipped": int, "unreadable": list[str],
     "unreadable_index": list[int]}

Images are not resized or normalised here: torchvision's ``GeneralizedRCNNTransform`` inside
the model resizes (short side 800, long side at most 1333) and normalises. Training adds a
horizontal flip of image, boxes and masks. :func:`collate_detection` batches images of
different sizes as lists.

Labels are COCO's category ids (torchvision's convention: ``num_classes=91`` for COCO, 0 the
background), or with ``contiguous_labels=True`` 1..K in the order of the sorted category ids;
:attr:`COCODetection.label_to_category` maps them back for evaluation.

Masks are decoded from polygons, uncompressed RLE (``counts`` a list, COCO's crowd regions) and
compressed RLE with ``pycocotools.mask``. Crowd annotations (``iscrowd=1``) are kept out of the
training targets, as torchvision's references do (COCOeval treats them as regions to ignore, from
the annotation file); ``keep_crowd=True`` passes them with ``iscrowd`` 1.

Bad input is found when the data set is built, never in the middle of an epoch: an image file
that does not exist, an annotation of an image that is not listed, an annotation whose category
is not in the ``categories`` list (or not an integer) or whose label is out of range
(``num_classes``), a degenerate box (width or height ≤ 0, or nothing left inside the image), a
malformed segmentation: each is skipped and counted in :attr:`COCODetection.skipped` (with
examples in :attr:`COCODetection.skipped_examples`), and one log line sums them up. Images left
without annotations are dropped in training (torchvision's references) and kept for evaluation.
An image that cannot be decoded, or whose size differs from the annotation file's, is replaced
by the next one in training and dropped from the batch in evaluation, by the policy of
:mod:`nonlocalnet.data.samples` that every data set follows (``"skipped"``, ``"unreadable"``,
``"unreadable_index"`` of the sample).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import check_choice
from ._seeding import SampleSeeder
from .image import load_image
from .samples import read_or_skip, unreadable_lists

__all__ = [
    "SKIP_REASONS",
    "COCODetection",
    "COCORecord",
    "RandomHorizontalFlip",
    "collate_detection",
    "decode_segmentation",
    "load_coco_json",
]

log = logging.getLogger(__name__)

MODES = ("train", "test")

#: what :class:`COCODetection` skips and counts (annotations unless said otherwise).
SKIP_REASONS = (
    "missing_image",  # image: the file does not exist
    "unknown_image",  # image_id not in the images list
    "no_annotations",  # image: no usable annotation left (training only)
    "unknown_category",  # category id not in the categories list
    "category_out_of_range",  # label >= num_classes
    "degenerate_box",  # w or h <= 0, not 4 finite numbers, or nothing inside the image
    "bad_segmentation",  # not a polygon list / RLE of the image's size (with masks=True)
    "crowd",  # iscrowd=1, kept out of the targets (unless keep_crowd)
)

_EXAMPLES = 5


def load_coco_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the top level of a COCO instances file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or no ``images`` / ``categories`` lists (the message names the
            file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not a JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object with images/annotations/categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"{p}: expected a list under {key!r}, got {type(data.get(key)).__name__}"
            )
    if not isinstance(data.setdefault("annotations", []), list):
        raise ValueError(f"{p}: 'annotations' must be a list")
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or cat["id"] < 1:
            raise ValueError(
                f"{p}: every category needs an integer id >= 1 (0 is the background), got {cat!r}"
            )
    ids = [c["id"] for c in data["categories"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{p}: repeated category ids in {sorted(ids)}")
    return data


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(values: object, n: int) -> bool:
    return (
        isinstance(values, (list, tuple))
        and len(values) == n
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    )


def _valid_segmentation(segm: object, height: int, width: int) -> bool:
    if isinstance(segm, list):  # polygons: [[x1, y1, x2, y2, ...], ...], each >= 3 points
        return bool(segm) and all(
            isinstance(poly, list)
            and len(poly) >= 6
            and len(poly) % 2 == 0
            and _finite(poly, len(poly))
            for poly in segm
        )
    if isinstance(segm, dict):  # RLE: {"size": [h, w], "counts": str | list[int]}
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
            return False
        if isinstance(counts, list):
            return all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == height * width
        return isinstance(counts, (str, bytes)) and len(counts) > 0
    return False


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a uint8 (H, W) mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons of one object: merged into one mask
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)  # (H, W) uint8


@dataclass
class COCORecord:
    """One image and its usable annotations.

    Attributes:
        image_id: COCO image id.
        path: image file.
        height: height from the annotation file.
        width: width from the annotation file.
        boxes: x1 y1 x2 y2 per annotation, clipped to the image.
        labels: label per annotation.
        iscrowd: 0/1 per annotation.
        areas: COCO ``area`` per annotation.
        segmentations: COCO ``segmentation`` per annotation (None without masks).
    """

    image_id: int
    path: str
    height: int
    width: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)
    segmentations: list[Any] = field(default_factory=list)


class RandomHorizontalFlip:
    """Flip image, boxes and masks left-right with probability ``p``.

    A box ``[x1, y1, x2, y2]`` of an image ``W`` pixels wide becomes ``[W - x2, y1, W - x1, y2]``
    (pixel edges, as COCO's boxes), so it still bounds its flipped mask.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must lie in [0, 1], got {p}")
        self.p = p

    def __call__(
        self,
        image: Tensor,
        target: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        if self.p == 0.0 or float(torch.rand((), generator=generator)) >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
        )  # (N, 4)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target


class COCODetection(Dataset):
    """COCO-format instance detection / segmentation data (see the module docstring).

    Args:
        image_dir: folder the ``file_name`` of each image is relative to.
        ann_file: the ``instances_*.json`` file.
        mode: ``"train"`` (flip, images without annotations dropped, unreadable images replaced)
            or ``"test"``.
        masks: decode instance masks (Mask R-CNN); False for box-only targets (Faster R-CNN).
        contiguous_labels: labels 1..K in sorted category order instead of the category ids.
        num_classes: classes of the model, background included; annotations whose label is
            not below it are skipped (default: max label + 1).
        keep_crowd: pass crowd annotations with ``iscrowd`` 1 instead of leaving them out.
        drop_empty: drop images without usable annotations (default: in training only).
        flip_p: training flip probability.
        transform: replaces the training flip: ``transform(image, target, generator=g)``
            returning ``(image, target)``, in both modes.
        seed: sample randomness (see :mod:`nonlocalnet.data._seeding`).
        max_attempts: consecutive unreadable images a training sample may replace before
            raising (default: ``min(len(self), 100)``).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        mode: str = "train",
        masks: bool = True,
        contiguous_labels: bool = False,
        num_classes: int | None = None,
        keep_crowd: bool = False,
        drop_empty: bool | None = None,
        flip_p: float = 0.5,
        transform: Callable[..., tuple[Tensor, dict[str, Any]]] | None = None,
        seed: int | None = None,
        max_attempts: int | None = None,
    ) -> None:
        check_choice("mode", mode, MODES)
        image_root = Path(image_dir)
        if not image_root.is_dir():
            raise FileNotFoundError(
                f"COCO image folder not found (or not a directory): {image_root}"
            )
        self.image_dir = str(image_root)
        self.ann_file = str(ann_file)
        self.mode = mode
        self.masks = masks
        self.keep_crowd = keep_crowd
        self.drop_empty = mode == "train" if drop_empty is None else drop_empty
        data = load_coco_json(ann_file)
        self.dataset = data
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories = {c["id"]: str(c.get("name", c["id"])) for c in cats}
        if contiguous_labels:
            self.category_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        else:
            self.category_to_label = {c["id"]: c["id"] for c in cats}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        top = max(self.category_to_label.values(), default=0) + 1
        if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
            raise ValueError(
                f"num_classes must be an int >= 2 (background included), got {num_classes!r}"
            )
        self.num_classes = top if num_classes is None else num_classes
        self.classes = ["__background__"] + [
            self.categories.get(self.label_to_category.get(i, -1), "")
            for i in range(1, self.num_classes)
        ]
        self.skipped: Counter[str] = Counter()
        self.skipped_examples: dict[str, list[str]] = {}
        self._gt_annotations: list[dict[str, Any]] = []
        self.records = self._scan(data)
        self._log_summary()
        if not self.records:
            raise ValueError(
                f"{self.ann_file}: no usable images under {self.image_dir} ({self._skip_text()})"
            )
        self.transform = transform
        if transform is None and mode == "train":
            self.transform = RandomHorizontalFlip(flip_p)
        self.seeder = SampleSeeder(seed)
        self.max_attempts = max_attempts or min(len(self.records), 100)

    # -- building ----------------------------------------------------------------------------

    def _skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.skipped_examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES:
            shown.append(example)

    def _scan(self, data: dict[str, Any]) -> list[COCORecord]:
        for img in data["images"]:
            if not (
                isinstance(img, dict)
                and _is_int(img.get("id"))
                and isinstance(img.get("file_name"), str)
                and _is_int(img.get("height"))
                and _is_int(img.get("width"))
                and img["height"] > 0
                and img["width"] > 0
            ):
                raise ValueError(
                    f"{self.ann_file}: every image needs an int id, a file_name and positive int "
                    f"height/width, got {img!r}"
                )
        counts = Counter(img["id"] for img in data["images"])
        repeated = sorted(i for i, n in counts.items() if n > 1)
        if repeated:
            raise ValueError(f"{self.ann_file}: repeated image ids {repeated[:10]}")
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if not _is_int(image_id) or image_id not in counts:
                self._skip("unknown_image", f"annotation {str(ann)[:60]}")
                continue
            by_image.setdefault(image_id, []).append(ann)
        records = []
        for img in sorted(data["images"], key=lambda i: i["id"]):
            path = os.path.join(self.image_dir, img["file_name"])
            if not os.path.isfile(path):
                self._skip("missing_image", path)
                continue
            rec = COCORecord(img["id"], path, img["height"], img["width"])
            for ann in by_image.get(img["id"], []):
                self._add_annotation(rec, ann)
            if not rec.labels and self.drop_empty:
                self._skip("no_annotations", path)
                continue
            records.append(rec)
        return records

    def _add_annotation(self, rec: COCORecord, ann: dict[str, Any]) -> None:
        where = f"annotation {ann.get('id')} of image {rec.image_id} ({os.path.basename(rec.path)})"
        cat = ann.get("category_id")
        if not _is_int(cat) or cat not in self.category_to_label:
            self._skip("unknown_category", f"{where}: category_id {cat!r}")
            return
        label = self.category_to_label[cat]
        if label >= self.num_classes:
            self._skip(
                "category_out_of_range", f"{where}: label {label} >= num_classes {self.num_classes}"
            )
            return
        bbox = ann.get("bbox")
        if not _finite(bbox, 4) or bbox[2] <= 0 or bbox[3] <= 0:
            self._skip("degenerate_box", f"{where}: bbox {bbox!r}")
            return
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = min(max(x, 0.0), rec.width), min(max(y, 0.0), rec.height)
        x2, y2 = min(max(x + w, 0.0), rec.width), min(max(y + h, 0.0), rec.height)
        if x2 <= x1 or y2 <= y1:
            self._skip("degenerate_box", f"{where}: bbox {bbox!r} outside the image")
            return
        segm = ann.get("segmentation")
        if self.masks and not _valid_segmentation(segm, rec.height, rec.width):
            self._skip("bad_segmentation", f"{where}: {str(segm)[:60]}")
            return
        crowd = int(bool(ann.get("iscrowd", 0)))
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) else w * h
        self._gt_annotations.append({**ann, "area": area, "iscrowd": crowd})
        if crowd and not self.keep_crowd:
            self._skip("crowd", where)
            return
        rec.boxes.append([x1, y1, x2, y2])
        rec.labels.append(label)
        rec.iscrowd.append(crowd)
        rec.areas.append(area)
        rec.segmentations.append(segm if self.masks else None)

    def _skip_text(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        return ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())

    def _log_summary(self) -> None:
        num_anns = sum(len(r.labels) for r in self.records)
        line = (
            f"COCO {os.path.basename(self.ann_file)} ({self.mode}): {len(self.records)} images, "
            f"{num_anns} annotations; skipped: {self._skip_text()}"
        )
        errors = {k: v for k, v in self.skipped.items() if k != "crowd"}
        if errors:
            examples = "; ".join(
                f"{k}: {self.skipped_examples[k][0]}" for k in SKIP_REASONS if k in errors
            )
            log.warning("%s (e.g. %s)", line, examples)
        else:
            log.info("%s", line)

    # -- reading -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Change the random flips of the next epoch (with ``seed`` set)."""
        self.seeder.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        """Read and transform image ``index`` (no skipping).

        Raises:
            OSError: the image cannot be decoded.
            ValueError: its size differs from the annotation file's.
        """
        rec = self.records[index]
        image = load_image(rec.path)  # (3, H, W) uint8
        if tuple(image.shape[-2:]) != (rec.height, rec.width):
            raise ValueError(
                f"image {rec.path} is {tuple(image.shape[-2:])} (H, W) but {self.ann_file} says "
                f"({rec.height}, {rec.width})"
            )
        n = len(rec.labels)
        target: dict[str, Any] = {
            "boxes": torch.tensor(rec.boxes, dtype=torch.float32).reshape(n, 4),  # (N, 4)
            "labels": torch.tensor(rec.labels, dtype=torch.int64),
            "image_id": rec.image_id,
            "area": torch.tensor(rec.areas, dtype=torch.float32),
            "iscrowd": torch.tensor(rec.iscrowd, dtype=torch.int64),
        }
        if self.masks:
            masks = np.zeros((n, rec.height, rec.width), dtype=np.uint8)  # (N, H, W)
            for k, segm in enumerate(rec.segmentations):
                masks[k] = decode_segmentation(segm, rec.height, rec.width)
            target["masks"] = torch.from_numpy(masks)
        image_f = image.float().div_(255.0)
        if self.transform is not None:
            g = self.seeder.generator(index) if self.mode == "train" else None
            image_f, target = self.transform(image_f, target, generator=g)
        return image_f, target

    def _read(self, index: int) -> dict[str, Any]:
        image, target = self.load(index)
        return {"image": image, "target": target, "index": index, "path": self.records[index].path}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample dict; an unreadable image is skipped (see :mod:`nonlocalnet.data.samples`)."""
        if not 0 <= index < len(self.records):
            raise IndexError(
                f"index {index} out of range for a data set of {len(self.records)} images"
            )
        return read_or_skip(
            index, len(self.records), self._read, lambda j: self.records[j].path,
            train=self.mode == "train", input_key="image", max_attempts=self.max_attempts,
            what="images",
        )  # fmt: skip

    def coco(self) -> Any:
        """The ground truth of the images of this data set as a ``pycocotools.coco.COCO``.

        The annotations that passed the checks, crowd regions included (COCOeval ignores
        detections matched to them), renumbered 1..N, with ``area`` / ``iscrowd`` filled in
        where the file lacks them; images skipped here are left out.
        """
        from pycocotools.coco import COCO

        kept = {r.image_id for r in self.records}
        gt = COCO()
        gt.dataset = {
            **{k: v for k, v in self.dataset.items() if k not in ("images", "annotations")},
            "images": [img for img in self.dataset["images"] if img["id"] in kept],
            "annotations": [
                {**ann, "id": k + 1}
                for k, ann in enumerate(a for a in self._gt_annotations if a["image_id"] in kept)
            ],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt.createIndex()
        return gt


def collate_detection(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch detection samples of different sizes: images and targets as lists.

    Samples whose ``"image"`` is None (unreadable images in evaluation) are dropped; every
    sample's replaced or dropped images are listed in ``"unreadable"`` (paths) and
    ``"unreadable_index"`` (data set indices), as :func:`~nonlocalnet.data.samples.collate_samples`
    does, so that :class:`~nonlocalnet.data.samples.SkipTracker` counts each entry once.

    Returns:
        ``{"image": list[(3, H_i, W_i)], "target": list[dict], "index": int64 (B,),
        "path": list[str], "skipped": int64 (B,), "unreadable": list[str],
        "unreadable_index": list[int]}``.
    """
    kept = [s for s in samples if s.get("image") is not None]
    return {
        "image": [s["image"] for s in kept],
        "target": [s["target"] for s in kept],
        "index": torch.tensor([int(s["index"]) for s in kept], dtype=torch.int64),
        "path": [s["path"] for s in kept],
        "skipped": torch.tensor([int(s.get("skipped", 0)) for s in kept], dtype=torch.int64),
        **unreadable_lists(samples),
    }
