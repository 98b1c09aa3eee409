"""Data: video / image / segmentation datasets, clip samplers and transforms.

Datasets yield dicts (``{"video" | "image", "label" | "mask", "index", "path", ...}``); see
:mod:`nonlocalnet.data.video` for the video list-file / Kinetics CSV / class-folder formats and the
handling of unreadable videos. PyAV and Pillow are imported only when a file is decoded.
"""

from .samplers import RandomClipSampler, UniformClipSampler, clip_indices, clip_span
from .video import (
    SkipTracker,
    VideoDataset,
    VideoDecodeError,
    VideoReader,
    VideoRecord,
    check_skip_fraction,
    collate_videos,
    parse_kinetics_csv,
    parse_list_file,
    read_clips,
    scan_class_folders,
    worker_init_fn,
)

__all__ = [
    "RandomClipSampler",
    "SkipTracker",
    "UniformClipSampler",
    "VideoDataset",
    "VideoDecodeError",
    "VideoReader",
    "VideoRecord",
    "check_skip_fraction",
    "clip_indices",
    "clip_span",
    "collate_videos",
    "parse_kinetics_csv",
    "parse_list_file",
    "read_clips",
    "scan_class_folders",
    "worker_init_fn",
]
