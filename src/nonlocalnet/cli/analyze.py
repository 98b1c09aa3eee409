"""``nonlocalnet analyze``: GCNet's query-independence analysis of a trained model's blocks.

Loads the checkpoint's model (:func:`nonlocalnet.engine.checkpoint.load_model`) and runs
:func:`nonlocalnet.viz.analyze.analyze_model` on its attention blocks (all, or those named with
``--block``). Samples come from the checkpoint's own validation set (``--data val``, the default;
``train`` for the training set), built from its stored config, or from video/image files and
folders given as ``--data PATH ...`` (prepared as ``nonlocalnet visualize`` prepares its input).
Prints the table and writes ``query_independence.csv``, ``query_independence.json`` and
``query_independence.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nonlocalnet.engine.build import build_datasets
from nonlocalnet.engine.checkpoint import load_model
from nonlocalnet.engine.config import config_from_dict
from nonlocalnet.viz.analyze import (
    analyze_model,
    dataset_samples,
    format_table,
    wrap_title,
    write_report,
)
from nonlocalnet.viz.visualize import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    detection_view,
    is_detection_model,
    load_image_file,
    load_input,
    model_is_video,
    select_blocks,
)

HELP = "GCNet's query-independence analysis of every attention block of a checkpoint"


def _split_samples(config: Mapping[str, Any], split: str, video: bool) -> Iterator[Tensor]:
    """The samples of the checkpoint's ``train`` or ``val`` set, built from its config."""
    train_set, val_set = build_datasets(
        config_from_dict(config), train=split == "train", val=split == "val"
    )
    return dataset_samples(train_set if split == "train" else val_set, video=video)


def _files(paths: Sequence[Path], suffixes: Sequence[str]) -> list[Path]:
    """The files given, folders searched recursively for ``suffixes``."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--data: {str(p)!r} does not exist")
    if not files:
        raise ValueError(f"--data: no video or image files in {', '.join(map(str, paths))}")
    return files


def _file_samples(paths: Sequence[Path], data: Mapping[str, Any], video: bool) -> Iterator[Tensor]:
    """The video and image files given (folders searched recursively), prepared as at test time."""
    files = _files(paths, VIDEO_SUFFIXES + IMAGE_SUFFIXES)
    return (load_input(f, data, video=video)[0] for f in files)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet analyze``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint (.pt) to load")
    parser.add_argument(
        "--data",
        nargs="+",
        default=["val"],
        metavar="SPLIT_OR_PATH",
        help="'val' (default) or 'train': the checkpoint's own dataset; or video/image files "
        "and folders",
    )
    parser.add_argument("--samples", type=int, default=8, help="samples to analyse (default 8)")
    parser.add_argument(
        "--pairs", type=int, default=1000, help="query pairs per block and sample (default 1000)"
    )
    parser.add_argument(
        "--block", action="append", default=None, help="only this block (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    parser.add_argument("--out", type=Path, default=Path("analysis"), help="output folder")


def run(args: argparse.Namespace) -> int:
    """Analyse the checkpoint's blocks over the samples; print and write the report."""
    for name in ("samples", "pairs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    model, config = load_model(args.checkpoint)
    detector = model if is_detection_model(model) else None
    names = args.block
    if detector is not None:
        # the blocks live in the backbone, which sees the detector's resized images
        names = [n.removeprefix("backbone.body.") for n in names] if names else None
        model = detection_view(detector, torch.zeros(8, 8, 3, dtype=torch.uint8))[0]
    select_blocks(model, names)  # fail before reading any data
    video = model_is_video(model)
    if len(args.data) == 1 and args.data[0] in ("val", "train"):
        samples = _split_samples(config, args.data[0], video)
        data_name = f"{args.data[0]} set ({(config.get('data') or {}).get('format', '?')})"
    elif detector is not None:
        samples = (load_image_file(f) for f in _files([Path(p) for p in args.data], IMAGE_SUFFIXES))
        data_name = ", ".join(Path(p).name for p in args.data)
    else:
        samples = _file_samples([Path(p) for p in args.data], config.get("data") or {}, video)
        data_name = ", ".join(Path(p).name for p in args.data)
    if detector is not None:
        samples = (detection_view(detector, x)[1] for x in samples)
    rows = analyze_model(
        model,
        itertools.islice(samples, args.samples),
        num_pairs=args.pairs,
        seed=args.seed,
        block_names=names,
    )
    model_name = (config.get("model") or {}).get("name", type(model).__name__)
    count = rows[0]["samples"]
    title = (
        f"query independence of {model_name} ({Path(args.checkpoint).name}) on {data_name}: "
        f"{count} samples, {args.pairs} pairs each; bars = mean ± std over samples"
    )
    meta = {
        "checkpoint": str(args.checkpoint),
        "model": model_name,
        "data": data_name,
        "samples": count,
        "pairs": args.pairs,
        "seed": args.seed,
    }
    print(title)
    print(format_table(rows))
    paths = write_report(rows, args.out, meta, wrap_title(title))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
