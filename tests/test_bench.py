"""Smoke test of ``benchmarks/bench_blocks.py --quick`` and of its flop counts and table."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from nonlocalnet.models.flops import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _measure
import bench_blocks


def test_bench_quick_runs_and_fast_matches_reference(tmp_path, monkeypatch, capsys) -> None:
    plotted = {}
    fake = types.ModuleType("bench_plot")
    fake.plot_bench = lambda results, path: plotted.update(results=results, path=path)
    monkeypatch.setitem(sys.modules, "bench_plot", fake)
    out = tmp_path / "nl.json"
    argv = ["--quick", "--json", str(out), "--plot", str(tmp_path / "p.png")]
    argv += ["--pairwise", "embedded_gaussian", "--pairwise", "concatenation"]
    assert bench_blocks.main(argv) == 0
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
        assert set(bench_blocks.ROW_KEYS) <= set(r)
        assert r["block"] == "NonLocal2d"
        assert r["M"] == r["N"]
        for key in ("fwd_bwd_ms", "flops", "gflops"):
            assert r[key] > 0, (key, r)
        assert r["peak_extra_mib"] >= 0
        assert r["gflops"] == pytest.approx(r["flops"] / r["fwd_bwd_ms"] / 1e6, rel=1e-9)
        assert r["flops"] == bench_blocks.block_flops(
            r["pairwise"], r["impl"], r["N"], r["M"], 32, 16
        )
        assert r["extra"]["kernel"] == "auto"
        if r["impl"] == "fast" and r["N"] == 256:
            # output, input gradient and parameter gradients of fast vs reference: float32
            # rounding only (exactness is shown in float64 by test_nonlocal_block.py)
            assert r["max_rel_err"] < 1e-3
    table = capsys.readouterr().out
    assert rows[-1]["max_rel_err"] is None  # the large row is not compared
    assert "embedded_gaussian | 256 (16x16) | fast" in table
    assert plotted["results"]["rows"] == rows
    assert str(plotted["path"]).endswith("p.png")


@pytest.mark.parametrize("kernel", ["sdpa", "blocked"])
def test_kernel_choice_runs_the_whole_block(kernel: str) -> None:
    """``--kernel``: the block's forward with that softmax kernel equals the reference block,
    output and every gradient (the check of a fast row)."""
    case = bench_blocks.Case("embedded_gaussian", "fast", (6, 6), 8, 4, 0.0, True, kernel=kernel)
    row = bench_blocks.measure(case)
    assert row.extra["kernel"] == kernel
    assert row.max_rel_err < 1e-5
    ref = bench_blocks.Case("embedded_gaussian", "reference", (6, 6), 8, 4, kernel=kernel)
    assert bench_blocks.case_kernel(ref) == "auto"  # the reference has no kernel to choose


def test_block_forward_with_a_kernel_is_the_block() -> None:
    case = bench_blocks.Case("gaussian", "fast", (3, 4), 6, 3)
    block = bench_blocks._build(case, "fast").double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    want = block(x)
    for kernel in ("sdpa", "blocked"):
        got = bench_blocks.block_forward(block, x, kernel)
        assert (got - want).abs().max() <= 1e-12, kernel


def test_block_flops() -> None:
    n, m, c, ci = 10, 5, 4, 2
    convs = 6 * n * c * ci * 4  # θ, φ, g, W_z
    flops = bench_blocks.block_flops
    assert flops("embedded_gaussian", "fast", n, m, c, ci) == convs + 12 * n * m * ci
    assert flops("gaussian", "reference", n, m, c, ci) == (
        6 * n * c * ci * 2 + 6 * n * m * (c + ci)
    )
    assert flops("dot_product", "fast", n, m, c, ci) == convs + 6 * (n + m) * ci**2
    assert flops("dot_product", "reference", n, m, c, ci) == convs + 12 * n * m * ci
    concat = convs + 6 * (n + m) * ci
    assert flops("concatenation", "fast", n, m, c, ci) == concat
    assert flops("concatenation", "reference", n, m, c, ci) == concat + 6 * n * m * ci


@pytest.mark.parametrize("pairwise", bench_blocks.PAIRWISE)
def test_block_flops_of_the_reference_are_its_counted_products(pairwise: str) -> None:
    """The reference path runs exactly the products the formula names, forward and backward."""
    case = bench_blocks.Case(pairwise, "reference", (4, 5), 6, 3)
    block = bench_blocks._build(case, "reference")
    x = torch.randn(1, 6, 4, 5, requires_grad=True)
    macs = count_macs(lambda t: block(t).sum().backward(), x)
    assert 2 * macs == bench_blocks.block_flops(pairwise, "reference", 20, 20, 6, 3)


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
    lines = bench_blocks.format_table(results).splitlines()
    fast = next(line for line in lines if "| fast |" in line)
    assert "| 12.50× | 1/12.0 |" in fast
    assert "| 100.0 | 100% |" in fast  # 1 GFLOP in 10 ms = 100 GFLOP/s = the matmul rate


def test_bad_threads(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_blocks.main(["--threads", "0"])
    assert exc.value.code == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_worker_failure_is_named(tmp_path) -> None:
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('no row', file=sys.stderr)\nsys.exit(3)\n")
    with pytest.raises(_measure.WorkerError, match=r"exit 3: no row"):
        _measure.run_worker(script, {}, timeout=60)


def test_peak_memory_sees_an_allocation() -> None:
    mem = _measure.PeakMemory()
    mem.start()
    t = torch.ones(16 * 2**20)  # 64 MiB of float32, written
    del t
    assert 48 <= mem.extra_mib() <= 256, (mem.method, mem.extra_mib())


def test_context_suite_is_handed_its_options(tmp_path, monkeypatch) -> None:
    import bench_context

    calls = []
    monkeypatch.setattr(bench_context, "run_suite", lambda *a, **kw: calls.append((a, kw)))
    argv = ["--suite", "context", "--quick", "--threads", "1", "--json", str(tmp_path / "c.json")]
    assert bench_blocks.main(argv) == 0
    assert calls == [((True,), {"timeout": 1800.0, "threads": 1, "json_path": tmp_path / "c.json"})]
