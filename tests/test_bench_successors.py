"""``benchmarks/bench_successors.py --quick`` (every block, ratios, the agreement check, the
memory skip) and ``benchmarks/dnl_query_independence.py`` on a tiny budget."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_successors as bs
import dnl_query_independence as dq
from nonlocalnet.layers.ema import EMAU

pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(tmp_path: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / "s.json"
    rc = bs.main(["--quick", "--in-process", "--threads", "1", "--json", str(out), *extra])
    return rc, json.loads(out.read_text()), capsys.readouterr().out


def test_quick_has_every_block_checked_and_its_ratios(tmp_path, capsys) -> None:
    rc, res, table = _quick(tmp_path, capsys)
    assert rc == 0
    channels, (size,) = bs.QUICK
    assert [(r["block"], r["impl"]) for r in res["rows"]] == [
        (b, impl) for b in bs.BLOCKS for impl in bs.IMPLS
    ]
    # fast vs reference agree (output and every gradient) before any block is timed
    assert [c["block"] for c in res["checks"]] == list(bs.BLOCKS)
    for c in res["checks"]:
        assert c["ok"] and c["rel_err"] <= bs.TOLERANCE and c["branch_norm"] > 0, c
        assert c["size"] == list(size)
    for r in res["rows"]:
        assert r["C"] == channels and r["size"] == list(size) and r["note"] == "", r
        assert r["time_ms"] > 0 and r["peak_extra_mib"] >= 0 and r["macs"] > 0, r
        assert r["macs_method"] == "real"
        for key in ("time_vs_nl", "mem_vs_nl", "macs_vs_nl"):
            assert key in r
        if r["impl"] == "fast":
            assert r["time_vs_ref"] > 0 and r["macs_vs_ref"] > 0, r
    rows = {(r["block"], r["impl"]): r for r in res["rows"]}
    nl_ref = rows["nl", "reference"]
    assert nl_ref["time_vs_nl"] == nl_ref["macs_vs_nl"] == 1.0
    # the reference paths run the products of the formula: the count on the real tensors is
    # the meta count; efficient attention's fast path is linear in N, EMA's paths do the same
    for b in ("nl", "dnl", "ea"):
        assert rows[b, "reference"]["macs"] == bs.meta_macs(b, "reference", channels, size)
    assert rows["ea", "fast"]["macs_vs_ref"] < 0.5
    assert rows["ema", "fast"]["macs"] == rows["ema", "reference"]["macs"]
    assert rows["nl", "reference"]["map"] == "N×N"
    assert rows["nl", "reference"]["map_mib"] == pytest.approx(
        size[0] ** 2 * size[1] ** 2 * 4 / 2**20
    )
    # the table: every block, the ratio columns, the agreement
    for label, _ in bs.BLOCKS.values():
        assert table.count(f"| {label} |") == 3  # a check row and two impl rows
    assert "time fast/ref" in table and "MACs / NL" in table and "rel. L2 error" in table


def test_disagreement_stops_the_timing(tmp_path, capsys, monkeypatch) -> None:
    """A reference that is not the fast path's function (2 EM steps instead of 3) fails the
    check: its rows are not timed and the script exits with 1."""

    def wrong(channels: int, impl: str) -> EMAU:
        stages = bs.EMA_STAGES if impl == "fast" else bs.EMA_STAGES - 1
        return EMAU(channels, num_stages=stages, zero_init=False, impl=impl)

    monkeypatch.setitem(bs.BLOCKS, "ema", ("EMA", wrong))
    rc, res, _ = _quick(tmp_path, capsys, "--block", "ema")
    assert rc == 1
    check = next(c for c in res["checks"] if c["block"] == "ema")
    assert not check["ok"] and check["rel_err"] > bs.TOLERANCE
    for r in res["rows"]:
        if r["block"] == "ema":
            assert r["time_ms"] is None and "disagree" in r["note"]
        else:
            assert r["time_ms"] > 0


def test_a_dense_map_that_does_not_fit_is_skipped(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(bs, "mem_available_gib", lambda: 1e-6)
    rc, res, table = _quick(tmp_path, capsys, "--block", "cc")
    assert rc == 0
    rows = {(r["block"], r["impl"]): r for r in res["rows"]}
    skipped = rows["nl", "reference"]
    assert skipped["note"].startswith("skipped: would need ~") and "GiB" in skipped["note"]
    assert skipped["time_ms"] is None and skipped["macs_method"] == "meta"
    # MACs are still compared with the skipped NL; time and memory are not
    fast = rows["cc", "fast"]
    assert fast["time_ms"] > 0 and fast["time_vs_nl"] is None
    assert fast["macs_vs_nl"] == pytest.approx(fast["macs"] / skipped["macs"])
    assert "would need" in table


def test_need_and_check_sizes() -> None:
    assert bs.check_size((64, 128)) == (64, 128)
    assert bs.check_size((128, 256)) == (64, 128)
    assert bs.check_size((5, 3), max_n=4) == (2, 1)
    n = 128 * 256
    need = bs.dense_need_gib("nl", "reference", 512, (128, 256))
    assert need == pytest.approx((3 * n * n * 4 + 16 * n * 512 * 4) / 2**30)
    assert bs.dense_need_gib("nl", "fast", 512, (128, 256)) == 0.0
    assert bs.dense_need_gib("cc", "reference", 512, (128, 256)) == 0.0


def test_a_row_in_its_own_processes() -> None:
    """The worker protocol: timing in one process, peak memory in a second one."""
    case = bs.Case("ea", "fast", 16, (4, 8), threads=1, reps=1)
    res = bs.run_case(case, timeout=300)
    assert "error" not in res, res
    assert res["time_ms"] > 0 and res["macs"] > 0 and len(res["times_ms"]) == 1
    assert "MALLOC_MMAP_THRESHOLD_" in res["memory_method"]
    assert res["peak_extra_mib"] >= 0


def test_dnl_query_independence_tiny(tmp_path) -> None:
    js, png = tmp_path / "q.json", tmp_path / "q.png"
    argv = ["--steps", "3", "--num-train", "16", "--num-val", "8", "--batch-size", "8"]
    argv += ["--analysis-clips", "4", "--num-pairs", "64", "--threads", "1"]
    assert dq.main([*argv, "--json", str(js), "--png", str(png)]) == 0
    res = json.loads(js.read_text())
    assert png.stat().st_size > 0
    dist = res["attention_distance"]
    assert set(dist) == {"dnl_pairwise", "dnl_unary", "dnl_both", "nl"}
    # the unary term is the same row for every query: distance 0 by construction
    assert dist["dnl_unary"] <= 1e-6
    assert dist["dnl_pairwise"] > 1e-6 and math.isfinite(dist["nl"])
    assert res["init"]["dnl_unary"]["attention_distance"] <= 1e-6
    for key in dist:
        qi = res["trained"][key]
        assert qi["num_pairs"] == 64 and qi["input_distance"] > 0
    assert res["model"]["block_input"] == [32, 4, 4, 4]
    assert set(res["val_top1"]) == {"dnl", "nl"}
