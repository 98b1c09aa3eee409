"""Cost plots of ``bench_blocks.py --plot``: time, memory and achieved rate against N.

Everything drawn comes from the benchmark's own numbers (its JSON): rows of
``{block, pairwise, impl, N, M, fwd_bwd_ms, peak_extra_mib, flops, gflops}`` and the float32
matmul rate measured on the same machine. Rows of the context suite (``bench_context.py``:
``fwd_ms`` and ``macs`` instead of ``fwd_bwd_ms`` and ``flops``) can be merged in: their series
are labelled "[fwd]" (forward only) and their flops are 2 × MACs. Rows with a NaN time (a failed
case) are left out. The roofline of a row is the time its matrix products would take at that
rate, ``flops / matmul_rate``: no implementation of the same flops can beat it by much, so the
gap between a curve and its roofline is what is left to gain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

__all__ = ["FIGSIZE", "bench_figure", "plot_bench", "roofline_ms", "series_of"]

logger = logging.getLogger(__name__)

#: Figure size in inches (saved at 100 dpi without trimming: 2000 x 560 pixels).
FIGSIZE = (20.0, 5.6)
DPI = 100
_PLOT_WIDTH = 0.85  # the rest of the width holds the legend
_REQUIRED = ("block", "impl", "N", "peak_extra_mib")
_STYLE = {"fast": ("-", "o", "full"), "reference": ("--", "s", "none")}


def _time_ms(row: Mapping[str, Any]) -> float:
    return float(row["fwd_bwd_ms"] if "fwd_bwd_ms" in row else row["fwd_ms"])


def _flops(row: Mapping[str, Any]) -> float:
    if row.get("flops"):
        return float(row["flops"])
    return 2.0 * float(row.get("macs") or 0.0)


def series_of(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], list[Mapping]]:
    """Rows grouped by (block, pairwise, impl), each group sorted by N; NaN times left out.

    Forward-only rows (``fwd_ms``) get the impl ``"<impl> [fwd]"``.

    Raises:
        ValueError: a row lacks one of the keys the plot needs.
    """
    groups: dict[tuple[str, str, str], list[Mapping]] = {}
    for i, r in enumerate(rows):
        missing = [k for k in _REQUIRED if k not in r]
        if "fwd_bwd_ms" not in r and "fwd_ms" not in r:
            missing.append("fwd_bwd_ms (or fwd_ms)")
        if missing:
            raise ValueError(
                f"plot_bench: row {i} lacks {', '.join(missing)}; expected keys "
                f"{', '.join(_REQUIRED)}, fwd_bwd_ms (+ pairwise, flops, gflops), "
                f"got {', '.join(r)}"
            )
        if not math.isfinite(_time_ms(r)):
            continue
        impl = str(r["impl"]) if "fwd_bwd_ms" in r else f"{r['impl']} [fwd]"
        block = f"{r['block']}/{r['group']}" if r.get("group") else str(r["block"])
        key = (block, str(r.get("pairwise") or ""), impl)
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["N"]) for k, v in groups.items()}


def _label(block: str, pairwise: str, impl: str) -> str:
    return f"{block} {pairwise} ({impl})" if pairwise else f"{block} ({impl})"


def roofline_ms(flops: float, matmul_gflops: float) -> float:
    """Time (ms) of ``flops`` at the measured matmul rate (GFLOP/s)."""
    return flops / (matmul_gflops * 1e9) * 1e3


def bench_figure(results: Mapping[str, Any], title: str | None = None) -> plt.Figure:
    """The figure of :func:`plot_bench`, not saved (close it with ``plt.close``)."""
    rows = results.get("rows") or []
    if not rows:
        raise ValueError("plot_bench: results has no rows to plot")
    rate = float(results.get("matmul_gflops") or 0.0)
    if not rate > 0:
        raise ValueError(
            f"plot_bench: matmul_gflops must be > 0, got {results.get('matmul_gflops')!r}"
        )
    groups = series_of(rows)
    sizes = sorted({int(r["N"]) for r in rows})
    fig, (ax_t, ax_m, ax_r) = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of: dict[tuple[str, str], str] = {}
    for (block, pw, impl), group in groups.items():
        colour = colour_of.setdefault((block, pw), colours[len(colour_of) % len(colours)])
        ls, marker, fill = _STYLE.get(impl.split(" ")[0], (":", "^", "full"))
        kw = {"ls": ls, "marker": marker, "fillstyle": fill, "color": colour, "ms": 6}
        n = [r["N"] for r in group]
        label = _label(block, pw, impl)
        ax_t.plot(n, [_time_ms(r) for r in group], label=label, **kw)
        mem = [max(float(r["peak_extra_mib"]), 1e-3) for r in group]  # log axis: floor at 1 KiB
        ax_m.plot(n, mem, **kw)
        flops = [_flops(r) for r in group]
        if all(f > 0 for f in flops):
            roof_ms = [roofline_ms(f, rate) for f in flops]
            ax_t.plot(n, roof_ms, ls=":", marker="x", color=colour, lw=1, alpha=0.8)
            achieved = [
                float(r["gflops"]) if r.get("gflops") else f / (_time_ms(r) * 1e6)
                for r, f in zip(group, flops, strict=True)
            ]
            ax_r.plot(n, achieved, **kw)
    ax_t.plot([], [], ls=":", marker="x", color="gray", label="roofline: flops / matmul rate")
    ax_t.plot([], [], ls="-.", color="black", label=f"float32 matmul {rate:.1f} GFLOP/s")
    ax_r.axhline(rate, color="black", lw=1.5, ls="-.")
    for ax, ylabel, head in (
        (ax_t, "forward + backward time (ms; [fwd]: forward only)", "time"),
        (ax_m, "peak extra memory (MiB)", "peak memory"),
        (ax_r, "achieved rate (GFLOP/s)", "achieved rate vs matmul"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Ticks at the measured sizes: minor labels of a short log axis run into each other.
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("N (query positions)")
        ax.set_ylabel(ylabel)
        ax.set_title(head)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax_t.get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
    if title is None:
        title = (
            f"bench_blocks ({results.get('suite', 'blocks')}): C={results.get('channels')}, "
            f"C'={results.get('inner_channels')}, batch {results.get('batch', 1)}, "
            f"{results.get('threads')} threads; solid = fast, dashed = reference"
        )
    fig.suptitle(title)
    fig.tight_layout(rect=(0.0, 0.0, _PLOT_WIDTH, 1.0))
    return fig


def plot_bench(results: Mapping[str, Any], out_path: str | Path, title: str | None = None) -> Path:
    """Log-log time and peak memory against N for every block and implementation.

    Three panels: forward+backward time with each series' matmul roofline (dotted, same colour);
    peak extra memory; achieved GFLOP/s with the measured matmul rate as a horizontal line.

    Args:
        results: ``{"matmul_gflops": float, "rows": [...]}`` as written by ``bench_blocks.py``.
        out_path: PNG to write (folders are created).
        title: figure title; by default names the suite, channels and matmul rate.

    Returns:
        ``out_path``.

    Raises:
        ValueError: no rows, a row without the needed keys, or a non-positive matmul rate.
    """
    fig = bench_figure(results, title)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    logger.info("wrote %s", out)
    return out
