"""``nonlocalnet visualize``: attention figures of a trained model on one video or image.

Loads the checkpoint's model (:func:`nonlocalnet.engine.checkpoint.load_model`), prepares the
input from the checkpoint's ``config["data"]`` (:func:`nonlocalnet.viz.visualize.load_input`)
and draws, for each attention block (or the one named with ``--block``) and each query, the
arrows and heat map of :func:`nonlocalnet.viz.visualize.draw_model_attention` (``--exclude-self``
leaves each query's own key out); prints one line per query and writes the figures and
``summary.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nonlocalnet.engine.checkpoint import load_model
from nonlocalnet.viz.attention import MIN_WEIGHT, format_weight
from nonlocalnet.viz.visualize import (
    detection_view,
    draw_model_attention,
    is_detection_model,
    load_image_file,
    load_input,
    model_is_video,
    select_blocks,
)

HELP = "draw attention maps of a checkpoint's blocks on a video or image (arrows + heat maps)"


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
    parser.add_argument(
        "--exclude-self",
        action="store_true",
        help="leave each query's own key out of the arrows and the heat map (its weight, often "
        "the largest, is still written; nothing is renormalised); not for APNB/AFNB blocks",
    )
    parser.add_argument(
        "--min-weight",
        type=float,
        default=MIN_WEIGHT,
        help=f"keys of weight at or below it get no arrow (default {MIN_WEIGHT:g})",
    )
    parser.add_argument("--out", type=Path, default=Path("attention"), help="output folder")


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, prepare the input, draw every asked block's figures."""
    for name in ("k", "num_queries", "max_frames"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not 0 <= args.min_weight < 1:
        raise ValueError(f"--min-weight must be in [0, 1), got {args.min_weight}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    model, config = load_model(args.checkpoint)
    block_names = None if args.block is None else [args.block]
    if is_detection_model(model):
        # the blocks live in the backbone, which sees the detector's resized image
        prefix = "backbone.body."
        block_names = [n.removeprefix(prefix) for n in block_names] if block_names else None
        net, x, frames = detection_view(model, load_image_file(args.input))
    else:
        net = model
        x, frames = load_input(args.input, config.get("data") or {}, video=model_is_video(model))
    blocks = select_blocks(net, block_names)
    summary = draw_model_attention(
        net,
        x,
        frames,
        blocks=block_names,
        queries=args.queries,
        num_queries=args.num_queries,
        k=args.k,
        out_dir=args.out,
        model_name=config.get("model", {}).get("name", type(model).__name__),
        input_name=str(args.input),
        max_frames=args.max_frames,
        exclude_self=args.exclude_self,
        min_weight=args.min_weight,
        meta={"checkpoint": str(args.checkpoint)},
    )
    for entry in summary["blocks"]:
        for q in entry["queries"]:
            own = q["self_weight"]
            own_text = "" if own is None else f"own key weight {format_weight(own)}, "
            top = q["topk_weights"][0] if q["topk_weights"] else float("nan")
            label = "top other weight" if entry["exclude_self"] else "top weight"
            print(
                f"{entry['block']} ({entry['type']}) query {q['feature_position']} -> pixel "
                f"{[round(p, 1) for p in q['pixel']]}: {own_text}{label} {format_weight(top)}; "
                f"{', '.join(Path(f).name for f in q['files'])}"
            )
    print(f"wrote {len(blocks)} block(s) of figures and summary.json to {args.out}")
    return 0
