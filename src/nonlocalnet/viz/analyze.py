"""``nonlocalnet analyze``: GCNet's query-independence analysis of a trained model's blocks.

For every attention block of the checkpoint's model (NL, SNL, GC with attention pooling, APNB,
AFNB) and every sample, :func:`nonlocalnet.analysis.query_independence` averages over random pairs
of query positions the cosine distance 1 − cos of (a) the block's input features, (b) its output
before the residual/fusion and (c) the two queries' attention maps. The report gives, per block,
the mean and the standard deviation over samples of each distance (GCNet, Table 1: trained NL
blocks have input distances far from 0 and attention distances close to 0).

Samples come from the checkpoint's own validation set (``--data val``, the default; ``train`` for
the training set), built from its stored config, or from video/image files and folders given as
``--data PATH ...`` (prepared as ``nonlocalnet visualize`` prepares its input). Writes
``query_independence.csv``, ``query_independence.json`` and ``query_independence.png`` to
``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet.viz.attention import attention_blocks, resolve_block

__all__ = [
    "COLUMNS",
    "HELP",
    "add_arguments",
    "analyze_model",
    "format_table",
    "plot_report",
    "run",
    "write_report",
]

logger = logging.getLogger(__name__)

HELP = "GCNet's query-independence analysis of every attention block of a checkpoint"

DISTANCES = ("input", "output", "attention")
COLUMNS = (
    "block",
    "type",
    "samples",
    *(f"{d}_{s}" for d in DISTANCES for s in ("mean", "std")),
)


@torch.no_grad()
def _block_inputs(model: nn.Module, x: Tensor, blocks: Sequence[nn.Module]) -> list[tuple]:
    """The inputs of each block on one forward pass of ``model(x)``."""
    seen: dict[int, tuple] = {}
    handles = [
        b.register_forward_pre_hook(
            lambda m, args, i=i: seen.setdefault(i, tuple(a.detach() for a in args))
        )
        for i, b in enumerate(blocks)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [type(blocks[i]).__name__ for i in range(len(blocks)) if i not in seen]
    if missing:
        raise ValueError(f"analyze: blocks never called by the model's forward: {missing}")
    return [seen[i] for i in range(len(blocks))]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    samples: Iterator[Tensor] | Sequence[Tensor],
    *,
    num_pairs: int = 1000,
    seed: int = 0,
    block_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Query-independence distances of every attention block, mean and std over samples.

    Args:
        model: the network (put in eval mode here).
        samples: model inputs of one sample each, without the batch dim.
        num_pairs: query pairs per block and sample.
        seed: seed of the pair sampling (one generator for the whole run).
        block_names: analyse only these blocks (qualified names).

    Returns:
        One row per block with the keys of :data:`COLUMNS` (plus the per-sample values under
        ``"per_sample"``).

    Raises:
        ValueError: the model has no attention block (the message names its modules), or there
            are no samples.
    """
    from nonlocalnet.analysis import query_independence

    model.eval()
    if block_names:
        blocks = [resolve_block(model, n) for n in block_names]
    else:
        resolve_block(model)  # raises, naming the model's modules, when there is none
        blocks = attention_blocks(model)
    mods = [b for _, b in blocks]
    per_block: list[dict[str, list[float]]] = [{d: [] for d in DISTANCES} for _ in blocks]
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for x in samples:
        inputs = _block_inputs(model, x.unsqueeze(0), mods)
        for (name, block), inp, acc in zip(blocks, inputs, per_block, strict=True):
            qi = query_independence(block, inp, num_pairs=num_pairs, generator=gen)
            acc["input"].append(qi.input_distance)
            acc["output"].append(qi.output_distance)
            acc["attention"].append(qi.attention_distance)
            logger.debug("sample %d %s: %s", count, name, qi)
        count += 1
    if count == 0:
        raise ValueError("analyze: no samples to analyse")
    rows = []
    for (name, block), acc in zip(blocks, per_block, strict=True):
        row: dict[str, Any] = {"block": name, "type": type(block).__name__, "samples": count}
        for d in DISTANCES:
            row[f"{d}_mean"], row[f"{d}_std"] = _mean_std(acc[d])
        row["per_sample"] = acc
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: per block, mean ± std over samples of the three distances (3 digits)."""
    lines = [
        "| block | type | samples | input 1−cos | output 1−cos | attention 1−cos |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[f'{d}_mean']:.3g} ± {r[f'{d}_std']:.2g}" for d in DISTANCES]
        lines.append(f"| {r['block']} | {r['type']} | {r['samples']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_report(rows: Sequence[Mapping[str, Any]], out_path: str | Path, title: str) -> Path:
    """Grouped bar chart: per block, the three mean distances with ±1 std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * n + 3.0), 4.8), dpi=100)
    width = 0.26
    colours = {"input": "#4c72b0", "output": "#dd8452", "attention": "#55a868"}
    names = {
        "input": "input features",
        "output": "outputs (before fusion)",
        "attention": "attention maps",
    }
    for k, d in enumerate(DISTANCES):
        xs = [i + (k - 1) * width for i in range(n)]
        means = [r[f"{d}_mean"] for r in rows]
        stds = [r[f"{d}_std"] for r in rows]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, color=colours[d], label=names[d])
        ax.bar_label(bars, labels=[f"{m:.3g}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(range(n), [f"{r['block']}\n({r['type']})" for r in rows], fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("average cosine distance 1 − cos (unitless, 0..2)")
    top = max([r[f"{d}_mean"] + r[f"{d}_std"] for r in rows for d in DISTANCES] + [0.05])
    ax.set_ylim(0, top * 1.2)
    ax.legend(title="1 − cos between two queries'", fontsize=8, title_fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, meta: Mapping[str, Any], title: str
) -> list[Path]:
    """Write ``query_independence.{csv,json,png}`` to ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "query_independence.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path = out_dir / "query_independence.json"
    json_path.write_text(json.dumps({**meta, "blocks": list(rows)}, indent=2))
    png = plot_report(rows, out_dir / "query_independence.png", title)
    return [csv_path, json_path, png]


# -- samples --------------------------------------------------------------------------------


def _dataset_samples(config: Mapping[str, Any], split: str, video: bool) -> Iterator[Tensor]:
    from nonlocalnet.engine.build import build_datasets
    from nonlocalnet.engine.config import config_from_dict

    cfg = config_from_dict(config)
    train_set, val_set = build_datasets(cfg, train=split == "train", val=split == "val")
    dataset = train_set if split == "train" else val_set
    sample_dims = 4 if video else 3
    for i in range(len(dataset)):
        item = dataset[i]
        x = item.get("video") if item.get("video") is not None else item.get("image")
        if x is None:
            continue  # a skipped (unreadable) sample
        if x.dim() == sample_dims + 1:
            x = x[0]  # first of the test views (clips x crops)
        yield x.float()


def _file_samples(paths: Sequence[Path], data: Mapping[str, Any], video: bool) -> Iterator[Tensor]:
    from nonlocalnet.viz.visualize import IMAGE_SUFFIXES, VIDEO_SUFFIXES, load_input

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(
                f for f in p.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--data: {str(p)!r} does not exist")
    if not files:
        raise ValueError(f"--data: no video or image files in {', '.join(map(str, paths))}")
    for f in files:
        yield load_input(f, data, video=video)[0]


def _take(it: Iterator[Tensor], n: int) -> Iterator[Tensor]:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


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
    from nonlocalnet.engine.checkpoint import load_model
    from nonlocalnet.viz.visualize import model_is_video

    for name in ("samples", "pairs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(args.checkpoint)!r} does not exist")
    model, config = load_model(args.checkpoint)
    if not args.block:
        resolve_block(model)  # fail before reading any data
    video = model_is_video(model)
    if len(args.data) == 1 and args.data[0] in ("val", "train"):
        samples = _dataset_samples(config, args.data[0], video)
        data_name = f"{args.data[0]} set ({(config.get('data') or {}).get('format', '?')})"
    else:
        samples = _file_samples([Path(p) for p in args.data], config.get("data") or {}, video)
        data_name = ", ".join(Path(p).name for p in args.data)
    rows = analyze_model(
        model,
        _take(samples, args.samples),
        num_pairs=args.pairs,
        seed=args.seed,
        block_names=args.block,
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
    paths = write_report(rows, args.out, meta, _wrap(title))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _wrap(title: str, width: int = 90) -> str:
    """Break a long title at the last ': ' or '; ' before ``width``."""
    if len(title) <= width:
        return title
    cut = max(title.rfind(": ", 0, width), title.rfind("; ", 0, width))
    if cut <= 0:
        return title
    return title[: cut + 1] + "\n" + _wrap(title[cut + 2 :], width)
