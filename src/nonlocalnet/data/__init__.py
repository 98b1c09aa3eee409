"""Data: video / image / segmentation datasets, clip samplers and transforms.

Datasets yield dicts (``{"video" | "image", "label" | "mask", "index", "path", ...}``); see
:mod:`nonlocalnet.data.video` for the video list-file / Kinetics CSV / class-folder formats and the
handling of unreadable videos. PyAV and Pillow are imported only when a file is decoded.
"""

from .image import IMAGE_EXTENSIONS, ImageFolderDataset, load_image, load_mask
from .samplers import RandomClipSampler, UniformClipSampler, clip_indices, clip_span
from .samples import SkipTracker, check_skip_fraction, collate_samples, read_or_skip
from .segmentation import (
    CITYSCAPES_CLASSES,
    SegmentationDataset,
    cityscapes_pairs,
    folder_pairs,
)
from .video import (
    VideoDataset,
    VideoDecodeError,
    VideoReader,
    VideoRecord,
    collate_videos,
    parse_kinetics_csv,
    parse_list_file,
    read_clips,
    scan_class_folders,
)

__all__ = [
    "CITYSCAPES_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "RandomClipSampler",
    "SegmentationDataset",
    "SkipTracker",
    "UniformClipSampler",
    "VideoDataset",
    "VideoDecodeError",
    "VideoReader",
    "VideoRecord",
    "check_skip_fraction",
    "cityscapes_pairs",
    "clip_indices",
    "clip_span",
    "collate_samples",
    "collate_videos",
    "folder_pairs",
    "load_image",
    "load_mask",
    "parse_kinetics_csv",
    "parse_list_file",
    "read_clips",
    "read_or_skip",
    "scan_class_folders",
]
