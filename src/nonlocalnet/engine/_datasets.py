"""Datasets of the ``data`` section from the readers in :mod:`nonlocalnet.data`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from nonlocalnet.engine.config import Config

__all__ = ["collate_fn", "make_dataset"]


def _path(config: Config, name: str) -> Path:
    """A split (list file, CSV, folder) of the config: relative to ``data.root``."""
    path = Path(name)
    if not path.is_absolute() and config.data.root:
        path = Path(config.data.root) / path
    return path


def _check_kwargs(
    given: Iterable[str], engine: Iterable[str], functions: Iterable[Callable[..., Any]]
) -> None:
    """Every key of ``data.kwargs`` a keyword of the dataset's constructor that the config does
    not set already (``functions``: the constructor and the ones it forwards its keywords to;
    ``engine``: the arguments the engine passes from the config's own keys).

    Raises:
        TypeError: a key that is not a keyword, or one the config sets, naming the dataset
            class and the valid keywords.
    """
    functions = list(functions)
    engine = set(engine)
    names: set[str] = set()
    for function in functions:
        for param in inspect.signature(function).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.add(param.name)
    valid = sorted(names - engine - {"self", "cls"})
    where = functions[0].__qualname__
    for key in given:
        if key in engine:
            raise TypeError(
                f"data.kwargs: {key!r} is set from the config's own keys (data.*, eval.*, "
                f"train.seed) for {where}; set it there"
            )
        if key not in valid:
            raise TypeError(
                f"data.kwargs: {key!r} is not a keyword of {where}; expected one of "
                f"{', '.join(valid)}"
            )


def _synthetic_folder(config: Config) -> Path:
    """Generate the built-in benchmark once (main process first), return its folder.

    ``data.kwargs`` are the fields of :class:`nonlocalnet.data.synthetic.SyntheticVideoSpec`.
    """
    from nonlocalnet.data.synthetic import SyntheticVideoSpec, generate_video_dataset
    from nonlocalnet.engine.distributed import barrier

    if not config.data.root:
        raise ValueError("data.root: the synthetic format needs a cache folder, got ''")
    try:
        spec = SyntheticVideoSpec(**config.data.kwargs)
    except TypeError as err:
        raise TypeError(f"data.kwargs: expected fields of SyntheticVideoSpec: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        generate_video_dataset(config.data.root, spec)
    barrier()
    return generate_video_dataset(config.data.root, spec)


def _video(config: Config, split: str) -> Dataset:
    """``list`` / ``csv`` / ``folder`` / ``synthetic``: the split relative to ``data.root``."""
    from nonlocalnet.data import VideoDataset

    data = config.data
    kwargs: dict[str, Any] = dict(
        mode="train" if split == "train" else "test",
        num_frames=data.num_frames,
        stride=data.sampling_rate,
        num_clips=config.eval.num_clips,
        num_crops=config.eval.num_crops,
        short_side_range=tuple(data.train_jitter),
        crop_size=data.train_crop,
        test_short_side=data.test_short_side,
        test_crop_size=data.test_crop,
        mean=tuple(data.mean),
        std=tuple(data.std),
        flip_p=0.5 if data.flip else 0.0,
        # Clips and crops from (seed, epoch, index): the engine sets the epoch of each sample.
        seed=config.train.seed,
    )
    name = data.train_split if split == "train" else data.val_split
    if data.format == "synthetic":  # data.kwargs are the fields of SyntheticVideoSpec
        list_file = _synthetic_folder(config) / f"{'train' if split == 'train' else 'val'}.txt"
        return VideoDataset.from_list_file(list_file, num_classes=data.num_classes, **kwargs)
    if data.format == "list":
        constructor, fixed = VideoDataset.from_list_file, {"list_file", "root", "num_classes"}
    elif data.format == "csv":
        if not data.root:
            raise ValueError("data.root: the Kinetics CSV format needs the video root, got ''")
        constructor, fixed = VideoDataset.from_kinetics_csv, {"csv_file", "root"}
    elif data.format == "folder":
        constructor, fixed = VideoDataset.from_folder, {"root"}
    else:
        raise ValueError(
            f"data.format: {data.format!r} is not a video format; expected one of list, csv, "
            "folder, synthetic"
        )
    _check_kwargs(data.kwargs, {*kwargs, *fixed, "records"}, (constructor, VideoDataset.__init__))
    kwargs.update(data.kwargs)
    if data.format == "list":
        return constructor(
            _path(config, name), root=data.root or None, num_classes=data.num_classes, **kwargs
        )
    if data.format == "csv":
        # The CSV is relative to data.root and the videos lie under data.root (in per-label
        # folders or flat: nonlocalnet.data.video.parse_kinetics_csv).
        return constructor(_path(config, name), data.root, **kwargs)
    return constructor(_path(config, name), **kwargs)


def _image(config: Config, split: str) -> Dataset:
    """``folder``: ``<root>/<train_split or val_split>/<class>/*.jpg``."""
    from nonlocalnet.data.image import ImageFolderDataset

    data = config.data
    if data.format != "folder":
        raise ValueError(f"data.format: {data.format!r} is not an image format; expected folder")
    train = split == "train"
    kwargs: dict[str, Any] = dict(
        mode="train" if train else "test",
        crop_size=data.train_crop if train else data.test_crop,
        short_side=data.test_short_side,
        mean=tuple(data.mean),
        std=tuple(data.std),
        flip_p=0.5 if data.flip else 0.0,
        seed=config.train.seed,
    )
    _check_kwargs(data.kwargs, {*kwargs, "root"}, (ImageFolderDataset.__init__,))
    return ImageFolderDataset(
        _path(config, data.train_split if train else data.val_split), **kwargs, **data.kwargs
    )


def _segmentation(config: Config, split: str) -> Dataset:
    """``cityscapes``: ``<root>/leftImg8bit/<split>`` + ``<root>/gtFine/<split>``;
    ``pairs``: ``<root>/<split>/images`` + ``<root>/<split>/masks`` matched by file stem."""
    from nonlocalnet.data.segmentation import SegmentationDataset

    data = config.data
    train = split == "train"
    name = data.train_split if train else data.val_split
    kwargs: dict[str, Any] = dict(
        mode="train" if train else "test",
        crop_size=tuple(data.seg_crop),
        scale_range=tuple(data.scale_range),
        ignore_index=data.ignore_index,
        num_classes=data.num_classes,
        mean=tuple(data.mean),
        std=tuple(data.std),
        flip_p=0.5 if data.flip else 0.0,
        seed=config.train.seed,
    )
    if data.format == "cityscapes":
        constructor, fixed = SegmentationDataset.cityscapes, {"root", "split"}
    elif data.format == "pairs":
        constructor, fixed = SegmentationDataset.from_folders, {"image_dir", "mask_dir"}
    else:
        raise ValueError(
            f"data.format: {data.format!r} is not a segmentation format; expected cityscapes, pairs"
        )
    _check_kwargs(
        data.kwargs, {*kwargs, *fixed, "pairs"}, (constructor, SegmentationDataset.__init__)
    )
    kwargs.update(data.kwargs)
    if data.format == "cityscapes":
        return constructor(data.root, name, **kwargs)
    folder = _path(config, name)
    return constructor(folder / "images", folder / "masks", **kwargs)


def _masks_wanted(config: Config) -> bool:
    """Whether the detector predicts masks: ``data.kwargs.masks``, else the registered model's
    ``arch`` (Faster R-CNN: boxes only), else True."""
    if "masks" in config.data.kwargs:
        return bool(config.data.kwargs["masks"])
    from nonlocalnet.engine.config import is_import_path

    arch = config.model.kwargs.get("arch")
    if arch is None and not is_import_path(config.model.name):
        from nonlocalnet.models import model_info

        try:
            arch = model_info(config.model.name).defaults.get("arch")
        except ValueError:  # an unknown name fails when the model is built, with suggestions
            arch = None
    return arch != "faster_rcnn"


def _synthetic_detection_folder(config: Config, spec_kwargs: dict[str, Any]) -> Path:
    """Generate the built-in detection set once (main process first), return its folder."""
    from nonlocalnet.data.synthetic_detection import (
        SyntheticDetectionSpec,
        generate_detection_dataset,
    )
    from nonlocalnet.engine.distributed import barrier

    if not config.data.root:
        raise ValueError("data.root: the synthetic_detection format needs a cache folder, got ''")
    spec = SyntheticDetectionSpec(**spec_kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        generate_detection_dataset(config.data.root, spec)
    barrier()
    return generate_detection_dataset(config.data.root, spec)


def _detection(config: Config, split: str) -> Dataset:
    """``coco``: ``<root>/<split>/`` images + ``<root>/annotations/instances_<split>.json``;
    ``synthetic_detection``: the generated set's ``train`` / ``val``."""
    import dataclasses

    from nonlocalnet.data.coco import COCODetection

    data = config.data
    train = split == "train"
    extra = dict(data.kwargs)
    extra.pop("masks", None)
    if data.format == "synthetic_detection":
        from nonlocalnet.data.synthetic_detection import (
            SyntheticDetectionSpec,
            detection_split_paths,
        )

        fields = {f.name for f in dataclasses.fields(SyntheticDetectionSpec)}
        spec_kwargs = {k: v for k, v in extra.items() if k in fields}
        extra = {k: v for k, v in extra.items() if k not in fields}
        folder = _synthetic_detection_folder(config, spec_kwargs)
        image_dir, ann_file = detection_split_paths(folder, "train" if train else "val")
    elif data.format == "coco":
        if not data.root:
            raise ValueError("data.root: the coco format needs the COCO folder, got ''")
        name = data.train_split if train else data.val_split
        image_dir = _path(config, name)
        ann_file = Path(data.root) / "annotations" / f"instances_{Path(name).name}.json"
    else:
        raise ValueError(
            f"data.format: {data.format!r} is not a detection format; expected coco, "
            "synthetic_detection"
        )
    try:
        return COCODetection(
            image_dir,
            ann_file,
            mode="train" if train else "test",
            masks=_masks_wanted(config),
            num_classes=data.num_classes,
            flip_p=0.5 if data.flip and train else 0.0,
            seed=config.train.seed,
            **extra,
        )
    except TypeError as err:
        what = "keywords of COCODetection"
        if data.format == "synthetic_detection":
            what = f"fields of SyntheticDetectionSpec or {what}"
        raise TypeError(f"data.kwargs: expected {what}: {err}") from None


_BUILDERS: dict[str, Callable[[Config, str], Dataset]] = {
    "video": _video,
    "image": _image,
    "segmentation": _segmentation,
    "detection": _detection,
}


def make_dataset(config: Config, split: str) -> Dataset:
    """The ``train`` or ``val`` dataset of ``config`` (validated when built: bad files stop here)."""
    return _BUILDERS[config.data.task](config, split)


def collate_fn(config: Config) -> Callable[[list[dict[str, Any]]], Any]:
    """Batches drop unreadable test samples and list them (:mod:`nonlocalnet.data.samples`);
    detection batches keep images of different sizes as lists
    (:func:`~nonlocalnet.data.coco.collate_detection`)."""
    if config.data.task == "detection":
        from nonlocalnet.data.coco import collate_detection

        return collate_detection
    from nonlocalnet.data.samples import collate_samples

    return collate_samples
