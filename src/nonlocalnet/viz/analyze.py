"""GCNet's query-independence analysis of a trained model's attention blocks.

For every attention block of a model (NL, SNL, GC with attention pooling, APNB, AFNB) and every
sample, :func:`analyze_model` averages, through :func:`nonlocalnet.analysis.query_independence`,
over random pairs of query positions the cosine distance 1 − cos of (a) the block's input
features, (b) its output before the residual/fusion and (c) the two queries' attention maps. The
report gives, per block, the mean and the standard deviation over samples of each distance
(GCNet, Table 1: trained NL blocks have input distances far from 0 and attention distances close
to 0).

Samples are model inputs of one sample each: from a dataset in the data pipeline's dict format
(:func:`dataset_samples`) or video/image files prepared as at test time
(:func:`nonlocalnet.viz.visualize.load_input`). :func:`format_table` gives the Markdown table and
:func:`write_report` writes ``query_independence.csv``, ``query_independence.json`` and
``query_independence.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from nonlocalnet.viz.visualize import select_blocks

__all__ = [
    "COLUMNS",
    "analyze_model",
    "dataset_samples",
    "format_table",
    "plot_report",
    "wrap_title",
    "write_report",
]

logger = logging.getLogger(__name__)

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
    blocks = select_blocks(model, block_names)
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


def dataset_samples(dataset: Dataset, *, video: bool) -> Iterator[Tensor]:
    """The model inputs of a dataset's items, in order, as float tensors without the batch dim.

    Args:
        dataset: a dataset with ``len`` yielding the data pipeline's dicts (``"video"`` or
            ``"image"``; None for an unreadable sample, which is skipped).
        video: the model takes clips ``(C, T, H, W)`` (else images ``(C, H, W)``); of stacked
            test views (clips x crops) the first is taken.
    """
    dims = 4 if video else 3
    for i in range(len(dataset)):
        item = dataset[i]
        x = item.get("video") if item.get("video") is not None else item.get("image")
        if x is None:
            continue  # a skipped (unreadable) sample
        if x.dim() == dims + 1:
            x = x[0]  # first of the test views (clips x crops)
        yield x.float()


def wrap_title(title: str, width: int = 90) -> str:
    """Break a long title at the last ': ' or '; ' before ``width``."""
    if len(title) <= width:
        return title
    cut = max(title.rfind(": ", 0, width), title.rfind("; ", 0, width))
    if cut <= 0:
        return title
    return title[: cut + 1] + "\n" + wrap_title(title[cut + 2 :], width)
