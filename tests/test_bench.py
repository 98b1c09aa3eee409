"""Smoke test of ``nonlocalnet bench --quick`` and of its flop counts and table."""

from __future__ import annotations

import json
import sys
import types

import pytest

from nonlocalnet import bench
from nonlocalnet.cli import main


def test_bench_quick_runs_and_fast_matches_reference(tmp_path, monkeypatch, capsys) -> None:
    plotted = {}
    fake = types.ModuleType("nonlocalnet.viz.bench_plot")
    fake.plot_bench = lambda results, path: plotted.update(results=results, path=path)
    monkeypatch.setitem(sys.modules, "nonlocalnet.viz.bench_plot", fake)
    out = tmp_path / "nl.json"
    argv = ["bench", "--quick", "--json", str(out), "--plot", str(tmp_path / "p.png")]
    argv += ["--pairwise", "embedded_gaussian", "--pairwise", "concatenation"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["matmul_gflops"] > 0
    rows = results["rows"]
    # 16×16 map: 2 pairwise × 2 impls, plus the large embedded_gaussian fast row (32×32)
    assert [(r["pairwise"], r["impl"], r["N"]) for r in rows] == [
        ("embedded_gaussian", "fast", 256),
        ("embedded_gaussian", "reference", 256),
        ("concatenation", "fast", 256),
        ("concatenation", "reference", 256),
        ("embedded_gaussian", "fast", 1024),
    ]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r)
        assert r["block"] == "NonLocal2d"
        assert r["M"] == r["N"]
        for key in ("fwd_bwd_ms", "flops", "gflops"):
            assert r[key] > 0, (key, r)
        assert r["peak_extra_mib"] >= 0
        assert r["gflops"] == pytest.approx(r["flops"] / r["fwd_bwd_ms"] / 1e6, rel=1e-9)
        assert r["flops"] == bench.block_flops(r["pairwise"], r["impl"], r["N"], r["M"], 32, 16)
        if r["impl"] == "fast" and r["N"] == 256:
            # output, input gradient and parameter gradients of fast vs reference: float32
            # rounding only (exactness is shown in float64 by test_nonlocal_block.py)
            assert r["max_rel_err"] < 1e-3
    table = capsys.readouterr().out
    assert rows[-1]["max_rel_err"] is None  # the large row is not compared
    assert "embedded_gaussian | 256 (16x16) | fast" in table
    assert plotted["results"]["rows"] == rows
    assert str(plotted["path"]).endswith("p.png")


def test_block_flops() -> None:
    n, m, c, ci = 10, 5, 4, 2
    convs = 6 * n * c * ci * 4  # θ, φ, g, W_z
    assert bench.block_flops("embedded_gaussian", "fast", n, m, c, ci) == convs + 12 * n * m * ci
    assert bench.block_flops("gaussian", "reference", n, m, c, ci) == (
        6 * n * c * ci * 2 + 6 * n * m * (c + ci)
    )
    assert bench.block_flops("dot_product", "fast", n, m, c, ci) == convs + 6 * (n + m) * ci**2
    assert bench.block_flops("dot_product", "reference", n, m, c, ci) == convs + 12 * n * m * ci
    concat = convs + 6 * (n + m) * ci
    assert bench.block_flops("concatenation", "fast", n, m, c, ci) == concat
    assert bench.block_flops("concatenation", "reference", n, m, c, ci) == concat + 6 * n * m * ci


def _row(pairwise: str, impl: str, ms: float, mib: float) -> dict:
    return {
        "block": "NonLocal2d",
        "pairwise": pairwise,
        "impl": impl,
        "N": 16,
        "M": 16,
        "size": "4x4",
        "fwd_bwd_ms": ms,
        "peak_extra_mib": mib,
        "flops": 1e9,
        "gflops": 1e9 / ms / 1e6,
        "max_rel_err": None,
    }


def test_table_ratios() -> None:
    results = {
        "matmul_gflops": 100.0,
        "channels": 8,
        "inner_channels": 4,
        "batch": 1,
        "threads": 2,
        "rows": [
            _row("dot_product", "fast", 10.0, 5.0),
            _row("dot_product", "reference", 125.0, 60.0),
        ],
    }
    lines = bench.format_table(results).splitlines()
    fast = next(line for line in lines if "| fast |" in line)
    assert "| 12.50× | 1/12.0 |" in fast
    assert "| 100.0 | 100% |" in fast  # 1 GFLOP in 10 ms = 100 GFLOP/s = the matmul rate


def test_missing_context_suite(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "nonlocalnet.bench_context", None)
    assert main(["bench", "--suite", "context"]) == 1
    assert "nonlocalnet.bench_context" in capsys.readouterr().err


def test_bad_threads(capsys) -> None:
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
