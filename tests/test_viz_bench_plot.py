"""``plot_bench``: log-log cost plots with the matmul roofline, from the benchmark's numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_plot import (
    DPI,
    FIGSIZE,
    bench_figure,
    plot_bench,
    roofline_ms,
    series_of,
)


def _results() -> dict:
    rows = []
    for block, pw in (("NonLocal2d", "embedded_gaussian"), ("GlobalContext", "")):
        for impl, k in (("fast", 1.0), ("reference", 3.0)):
            for n in (64, 256, 1024):
                flops = 8.0 * n * n * 16
                ms = k * flops / 2e7
                rows.append(
                    {
                        "block": block,
                        "pairwise": pw,
                        "impl": impl,
                        "N": n,
                        "M": n,
                        "fwd_bwd_ms": ms,
                        "peak_extra_mib": n * n * 4 / 2**20 if impl == "reference" else 0.0,
                        "flops": flops,
                        "gflops": flops / (ms * 1e6),
                    }
                )
    return {"matmul_gflops": 50.0, "rows": rows, "suite": "test", "channels": 32}


def test_roofline_is_flops_over_the_matmul_rate() -> None:
    assert roofline_ms(2e9, 100.0) == pytest.approx(20.0)  # 2 GFLOP at 100 GFLOP/s = 20 ms
    fig = bench_figure(_results())
    try:
        ax_t, ax_m, ax_r = fig.axes[:3]
        assert ax_t.get_xscale() == ax_t.get_yscale() == "log"
        assert "ms" in ax_t.get_ylabel() and "MiB" in ax_m.get_ylabel()
        assert "GFLOP/s" in ax_r.get_ylabel() and "N" in ax_t.get_xlabel()
        # 4 series, each with a measured line and a roofline on the time axis.
        lines = [ln for ln in ax_t.get_lines() if len(ln.get_xdata())]
        assert len(lines) == 8
        roof = [ln for ln in lines if ln.get_marker() == "x"]
        expected = [8.0 * n * n * 16 / 50e9 * 1e3 for n in (64, 256, 1024)]
        for ln in roof:
            np.testing.assert_allclose(ln.get_ydata(), expected)
        # measured times as given; zero memory floored for the log axis.
        measured = [ln for ln in lines if ln.get_marker() != "x"]
        assert sorted(ln.get_ydata()[0] for ln in measured) == pytest.approx(
            sorted([8.0 * 64 * 64 * 16 / 2e7 * k for k in (1, 1, 3, 3)])
        )
        assert min(min(ln.get_ydata()) for ln in ax_m.get_lines()) == pytest.approx(1e-3)
        # the matmul rate as a horizontal line on the rate axis.
        assert any(set(ln.get_ydata()) == {50.0} for ln in ax_r.get_lines())
    finally:
        plt.close(fig)


def test_plot_bench_writes_a_png_of_the_figure_size(tmp_path) -> None:
    path = plot_bench(_results(), tmp_path / "sub" / "bench.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_bad_results_are_named() -> None:
    with pytest.raises(ValueError, match="no rows"):
        bench_figure({"matmul_gflops": 1.0, "rows": []})
    with pytest.raises(ValueError, match="matmul_gflops must be > 0"):
        bench_figure({"matmul_gflops": 0.0, "rows": _results()["rows"]})
    with pytest.raises(ValueError, match=r"row 0 lacks fwd_bwd_ms \(or fwd_ms\)"):
        bench_figure(
            {
                "matmul_gflops": 1.0,
                "rows": [{"block": "b", "impl": "fast", "N": 4, "peak_extra_mib": 1.0}],
            }
        )


def test_context_suite_rows_forward_only_and_nan() -> None:
    rows = [
        {"group": "context", "block": "gc", "impl": "fast", "N": n, "fwd_ms": 0.1 * n,
         "peak_extra_mib": 1.0, "macs": 1e6 * n}
        for n in (16, 64)
    ]  # fmt: skip
    rows.append({**rows[0], "N": 256, "fwd_ms": float("nan")})  # a failed case
    groups = series_of(rows)
    assert list(groups) == [("gc/context", "", "fast [fwd]")]
    assert [r["N"] for r in groups["gc/context", "", "fast [fwd]"]] == [16, 64]
    fig = bench_figure({"matmul_gflops": 10.0, "rows": rows})
    try:
        roof = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "x"]
        (line,) = [ln for ln in roof if len(ln.get_xdata())]
        np.testing.assert_allclose(line.get_ydata(), [2e6 * n / 10e9 * 1e3 for n in (16, 64)])
    finally:
        plt.close(fig)
