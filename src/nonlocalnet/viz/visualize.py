"""``nonlocalnet visualize``: attention figures of a trained model on one video or image.

For each attention block (or the one named with ``--block``) and each query (given in input
pixels with ``--queries``, or picked where the block's input features have the largest norm), it
writes two PNGs: arrows from the query to its k most attended positions on the frames (NL paper,
Fig. 3) and the query's attention as a heat map over the frames (GCNet, Fig. 1); for a video,
each is a grid of frames. ``summary.json`` lists the queries and their top-k keys (feature index,
weight and pixel centre).

The input is prepared as at test time, from the checkpoint's ``config["data"]``: for a video, a
clip of ``num_frames`` frames every ``sampling_rate`` frames taken from the middle of the video;
short side resized to ``test_short_side``, centre crop of ``test_crop``, normalised with
``mean``/``std``. An image given to a video model is repeated over ``num_frames`` frames.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nonlocalnet.data.transforms import CenterCrop, Normalize, ShortSideScale
from nonlocalnet.viz.attention import (
    attention_blocks,
    attention_figure,
    resolve_block,
    sample_dims,
)

__all__ = [
    "HELP",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "add_arguments",
    "load_input",
    "model_is_video",
    "parse_query",
    "run",
]

logger = logging.getLogger(__name__)

HELP = "draw attention maps of a checkpoint's blocks on a video or image (arrows + heat maps)"

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def model_is_video(model: torch.nn.Module) -> bool:
    """True when the model takes clips ``(B, C, T, H, W)`` (its first convolution is 3d)."""
    return sample_dims(model) == 4


def _decode_video(path: Path, num_frames: int, rate: int) -> torch.Tensor:
    from nonlocalnet.data.video import VideoReader

    with VideoReader(path) as reader:
        n = reader.num_frames
        span = (num_frames - 1) * rate + 1
        start = max(0, (n - span) // 2)
        idx = [min(start + i * rate, n - 1) for i in range(num_frames)]
        return reader.get_frames(idx)  # (T, H, W, 3) uint8


def load_input(
    path: str | Path, data: Mapping[str, Any], *, video: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """Read a video or image and prepare it as at test time.

    Args:
        path: a video (``VIDEO_SUFFIXES``) or image (``IMAGE_SUFFIXES``) file.
        data: the checkpoint's ``config["data"]`` (num_frames, sampling_rate, test_short_side,
            test_crop, mean, std; missing keys take the engine's defaults).
        video: the model takes clips ``(C, T, H, W)`` (else images ``(C, H, W)``).

    Returns:
        ``(x, frames)``: the normalised model input ``(C, T, H, W)`` / ``(C, H, W)`` and the same
        pixels as uint8 ``(T, H, W, 3)`` for drawing.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown file type, or a video given to an image model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    num_frames = int(data.get("num_frames", 8))
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if not video:
            raise ValueError(
                f"input {path.name} is a video but the model takes images; give an image "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        frames = _decode_video(path, num_frames, int(data.get("sampling_rate", 8)))
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            frames = torch.from_numpy(np.asarray(im.convert("RGB")).copy())[None]  # (1, H, W, 3)
        if video:
            frames = frames.expand(num_frames, -1, -1, -1)  # (T, H, W, 3): a still clip
    else:
        raise ValueError(
            f"unknown input type {suffix!r} of {path.name}; expected a video "
            f"({', '.join(VIDEO_SUFFIXES)}) or an image ({', '.join(IMAGE_SUFFIXES)})"
        )
    x = frames.permute(3, 0, 1, 2)  # (C, T, H, W) uint8
    x = ShortSideScale(int(data.get("test_short_side", 256)))(x)
    x = CenterCrop(int(data.get("test_crop", 256)))(x)
    shown = x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3) uint8
    x = Normalize(data.get("mean", (0.45,) * 3), data.get("std", (0.225,) * 3))(x)
    if not video:
        x = x[:, 0]  # (C, H, W)
    return x, shown


def parse_query(text: str) -> tuple[float, ...]:
    """``"t,y,x"`` or ``"y,x"`` (input pixels) -> a tuple of floats.

    Raises:
        ValueError: not 2 or 3 comma-separated numbers.
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3):
        raise ValueError(f"--queries: expected t,y,x or y,x in input pixels, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet visualize``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint (.pt) to load")
    parser.add_argument("--input", type=Path, required=True, help="a video or image file")
    parser.add_argument(
        "--block",
        default=None,
        help="qualified name of one attention block (default: every attention block)",
    )
    parser.add_argument(
        "--queries",
        nargs="+",
        type=parse_query,
        default=None,
        metavar="T,Y,X",
        help="query positions in pixels of the prepared input (after the test resize and "
        "crop; t = frame of the clip): t,y,x for video, y,x for images; default: the "
        "positions of largest input-feature norm",
    )
    parser.add_argument(
        "--num-queries", type=int, default=3, help="queries picked when --queries is not given"
    )
    parser.add_argument("--k", type=int, default=20, help="arrows per query (default 20)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames per figure (default 8)")
    parser.add_argument("--out", type=Path, default=Path("attention"), help="output folder")


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, prepare the input, draw every asked block's figures."""
    from nonlocalnet.engine.checkpoint import load_model

    for name in ("k", "num_queries", "max_frames"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    model, config = load_model(args.checkpoint)
    model_name = config.get("model", {}).get("name", type(model).__name__)
    if args.block is not None:
        blocks = [resolve_block(model, args.block)]
    else:
        resolve_block(model)  # raises, naming the model's modules, when there is none
        blocks = attention_blocks(model)
    x, frames = load_input(args.input, config.get("data") or {}, video=model_is_video(model))
    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "model": model_name,
        "input": str(args.input),
        "input_shape": list(x.shape),
        "blocks": [],
    }
    for name, block in blocks:
        res = attention_figure(
            model,
            x,
            frames=frames,
            block_name=name,
            queries=args.queries,
            num_queries=args.num_queries,
            k=args.k,
            out_dir=args.out,
            model_name=model_name,
            input_name=Path(args.input).name,
            max_frames=args.max_frames,
        )
        entry: dict[str, Any] = {
            "block": name,
            "type": type(block).__name__,
            "kind": res.attention.kind,
            "queries": [],
        }
        for pos, pix, (idx, w, centres), paths in zip(
            res.attention.positions,
            res.attention.pixels,
            res.topk,
            res.paths,
            strict=True,
        ):
            entry["queries"].append(
                {
                    "feature_position": list(pos),
                    "pixel": list(pix),
                    "topk_keys": idx.tolist(),
                    "topk_weights": w.tolist(),
                    "topk_pixels": centres.tolist(),
                    "files": [str(p) for p in paths],
                }
            )
            print(
                f"{name} ({type(block).__name__}) query {list(pos)} -> pixel "
                f"{[round(p, 1) for p in pix]}: top weight {float(w[0]):.4f}; "
                f"{', '.join(p.name for p in paths)}"
            )
        summary["blocks"].append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(blocks)} block(s) of figures and summary.json to {args.out}")
    return 0
