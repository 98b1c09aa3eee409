"""GC, SNL and APNB against the dense non-local block: multiply-adds, map size, time, memory.

    python benchmarks/bench_context.py [--quick] [--device cuda] [--group apnb|context|all] [--json PATH]

(also ``python benchmarks/bench_blocks.py --suite context``). Two groups of rows, every block in
eval mode, batch 1, float32, forward only (``no_grad``):

* ``apnb``: APNB vs a dense embedded-Gaussian NL, both with key/value width 256, on a
  2048-channel 128×256 map (N = 32768, the Cityscapes case of the ANN paper). The NL map is
  N×N (4 GiB in float32), APNB's N×S with S = 110 pyramid samples (13.75 MiB).
* ``context``: SNL, GC (r = 1/16 and 1/4, add fusion) and SE against NL (C' = C/2) at C = 1024,
  N = 28×28 = 784: the overhead in time and parameters.

Columns:

* ``macs``: multiply-adds of the whole block's forward pass, counted by
  ``nonlocalnet.models.flops.count_macs`` on the reference path with meta tensors (fused
  attention performs the same products); ``macs_branch`` leaves out what is not the non-local
  operation: APNB's concat fusion conv (2C → C over all N positions, which the ANN paper's 11×
  comparison does not count).
* ``map_mib``: size of the pairwise map N×M in float32 (what the reference path materialises;
  the fast path never does). For SNL/GC it is the single 1×N row.
* ``fwd_ms``: median forward time over repeated passes after a warm-up (one pass when a pass takes
  more than 10 s); ``peak_extra_mib``: peak memory above the level once the block and the input
  exist (:class:`_measure.PeakMemory`: CPU peak RSS, CUDA ``max_memory_allocated``). Each row
  runs in a fresh subprocess so its peak is its own.
* ``*_vs_nl``: the row's value divided by the NL row of its group (NL reference for ``apnb``,
  NL fast for ``context``); e.g. ``macs_vs_nl = 0.086`` is 11.6× fewer multiply-adds.

The dense reference NL at N = 32768 needs 2 maps of 4 GiB alive at once; when the machine has
less free memory than that (``/proc/meminfo`` MemAvailable), its row is measured on a smaller
map (the row's ``note`` and ``N`` say which) and the other rows keep the full size.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import _measure
from nonlocalnet.layers.registry import create_block
from nonlocalnet.models.flops import count_macs

log = logging.getLogger("bench_context")

#: (channels, key/value width, map size) of the APNB-vs-NL group.
APNB_FULL = (2048, 256, (128, 256))
APNB_QUICK = (64, 16, (16, 32))
#: (channels, map size) of the GC/SNL overhead group.
CONTEXT_FULL = (1024, (28, 28))
CONTEXT_QUICK = (64, (8, 8))
#: Pyramid samples S of APNB (1 + 3² + 6² + 8²).
APNB_SAMPLES = 110


@dataclass
class Case:
    """One measured row."""

    group: str  # "apnb" or "context"
    block: str  # registry name
    impl: str
    channels: int
    size: tuple[int, int]
    width: int | None = None  # NL inner width / APNB key and value width
    device: str = "cpu"
    note: str = ""
    threads: int | None = None  # torch CPU threads in the worker (None: torch's default)


def _kwargs(case: Case) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if case.block.startswith("nl"):
        kw["inner_channels"] = case.width
        kw["impl"] = case.impl
    elif case.block == "apnb":
        kw.update(key_channels=case.width, value_channels=case.width, impl=case.impl)
    elif case.block != "se":
        kw["impl"] = case.impl
    return kw


def build(case: Case, device: str | torch.device) -> nn.Module:
    """The case's block, in eval mode."""
    return create_block(case.block, case.channels, device=device, **_kwargs(case)).eval()


def counted_macs(case: Case) -> tuple[int, int]:
    """(whole block, non-local branch) multiply-adds of one forward pass, batch 1, counted by
    ``count_macs`` on the reference path with meta tensors."""
    ref = replace(case, impl="reference") if case.block != "se" else case
    block = build(ref, "meta")
    x = torch.empty(1, case.channels, *case.size, device="meta")
    with torch.no_grad():
        total = count_macs(block, x)
        branch = count_macs(block.residual, x) if case.block == "apnb" else total
    return total, branch


def params(case: Case) -> int:
    """Parameter count of the case's block."""
    return sum(p.numel() for p in build(case, "meta").parameters())


# -- measurement, inside the worker process ---------------------------------------------------


def measure(case: Case) -> dict[str, Any]:
    """Time and peak memory of the case's forward pass, in this process."""
    device = torch.device(case.device)
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    # warm kernels and thread pools on a tiny map first
    warm = build(replace(case, size=(8, 8)), device)
    with torch.no_grad():
        warm(torch.randn(1, case.channels, 8, 8, device=device))
    del warm

    block = build(case, device)
    x = torch.randn(1, case.channels, *case.size, device=device)
    cuda = device.type == "cuda"

    def once(fn: Callable[[torch.Tensor], torch.Tensor] = block) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn(x)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del y
        return dt

    def repeat(fn: Callable[[torch.Tensor], torch.Tensor], first: float) -> list[float]:
        if first >= 10.0:
            return [first]
        times: list[float] = []
        deadline = time.perf_counter() + max(2.0, 3 * first)
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            times.append(once(fn))
        return times

    mem = _measure.PeakMemory(device)
    mem.start()
    first = once()
    peak = mem.extra_mib()
    times = repeat(block, first)
    # APNB: the non-local branch alone (everything but the concat fusion conv)
    branch = repeat(block.residual, once(block.residual)) if case.block == "apnb" else times
    return {
        "fwd_ms": 1000.0 * statistics.median(times),
        "fwd_ms_min": 1000.0 * min(times),
        "branch_ms": 1000.0 * statistics.median(branch),
        "peak_extra_mib": peak,
        "reps": len(times),
    }


def _measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: a :class:`Case` as JSON in, its measurements out."""
    return measure(Case(**{**case, "size": tuple(case["size"])}))


def measure_in_subprocess(case: Case, timeout: float) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter; ``{"error": why}`` when it fails."""
    try:
        return _measure.run_worker(__file__, asdict(case), timeout=timeout)
    except _measure.WorkerError as err:
        return {"error": str(err)}


# -- the suite ---------------------------------------------------------------------------------


def mem_available_gib() -> float | None:
    """MemAvailable of /proc/meminfo, in GiB (None where unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+)", f.read())
    except OSError:
        return None
    return int(m.group(1)) / 2**20 if m else None


def _dense_nl_fits(c: int, size: tuple[int, int]) -> tuple[bool, str]:
    """Whether the reference NL fits in free memory: 2 N×N float32 maps are alive at once
    (logits and their scaled copy, then the scaled logits and the softmax), plus activations."""
    n = size[0] * size[1]
    need = (2 * n * n * 4 + 6 * n * c * 4) / 2**30
    avail = mem_available_gib()
    if avail is None:
        return True, ""
    if need > 0.6 * avail:
        return False, f"needs ~{need:.1f} GiB, {avail:.1f} GiB available"
    return True, ""


def cases(
    quick: bool, device: str = "cpu", group: str = "all", threads: int | None = None
) -> list[Case]:
    """The rows of the suite (``group``: "apnb", "context" or "all")."""
    c, w, size = APNB_QUICK if quick else APNB_FULL
    ref_size, note = size, ""
    if device == "cpu":
        fits, why = _dense_nl_fits(c, size)
        if not fits:
            ref_size = (size[0] // 2, size[1] // 2)
            note = f"measured at {ref_size[0]}×{ref_size[1]}: full size {why}"
            log.warning("dense reference NL: %s", note)
    rows = [
        Case("apnb", "nl", "reference", c, ref_size, w, device, note),
        Case("apnb", "nl", "fast", c, size, w, device),
        Case("apnb", "apnb", "reference", c, size, w, device),
        Case("apnb", "apnb", "fast", c, size, w, device),
    ]
    cc, csize = CONTEXT_QUICK if quick else CONTEXT_FULL
    rows += [
        Case("context", "nl", impl, cc, csize, cc // 2, device) for impl in ("fast", "reference")
    ]
    rows += [Case("context", b, "fast", cc, csize, None, device) for b in ("snl", "gc", "gc_r4")]
    rows.append(Case("context", "se", "fast", cc, csize, None, device))
    for r in rows:
        r.threads = threads
    return [r for r in rows if group in ("all", r.group)]


def _map_mib(case: Case) -> float:
    n = case.size[0] * case.size[1]
    m = {"nl": n, "apnb": APNB_SAMPLES, "snl": n, "gc": n, "gc_r4": n}.get(case.block, 0)
    rows = n if case.block in ("nl", "apnb") else 1
    return rows * m * 4 / _measure.MIB


def measure_suite(
    quick: bool,
    device: str = "cpu",
    timeout: float = 900.0,
    group: str = "all",
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Measure every case; returns the rows (with the ratios to the NL row of each group)."""
    rows: list[dict[str, Any]] = []
    for case in cases(quick, device, group, threads):
        macs, branch = counted_macs(case)
        log.info("measuring %s %s %s %s", case.group, case.block, case.impl, case.size)
        res = measure_in_subprocess(case, timeout)
        n = case.size[0] * case.size[1]
        nan = float("nan")
        rows.append(
            {
                "group": case.group,
                "block": case.block,
                "impl": case.impl,
                "C": case.channels,
                "size": list(case.size),
                "width": case.width,
                "N": n,
                "M": {"apnb": APNB_SAMPLES, "se": 0}.get(case.block, n),
                "fwd_ms": res.get("fwd_ms", nan),
                "fwd_ms_min": res.get("fwd_ms_min", nan),
                "branch_ms": res.get("branch_ms", nan),
                "reps": res.get("reps", 0),
                "peak_extra_mib": res.get("peak_extra_mib", nan),
                "macs": macs,
                "macs_branch": branch,
                "map_mib": _map_mib(case),
                "params": params(case),
                "device": device,
                "threads": case.threads or torch.get_num_threads(),
                "note": case.note or res.get("error", ""),
            }
        )
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``*_vs_nl``: each row over the NL row of its group, taken at the group's full map size.

    A reference NL measured on a smaller map (not enough memory) is compared through its MACs
    and map size at the full size, and its time and memory scaled by (N_full/N)², the order of
    its dominant terms; its ``note`` says so.
    """
    for group, ref_impl in (("apnb", "reference"), ("context", "fast")):
        grp = [r for r in rows if r["group"] == group]
        ref = next((r for r in grp if r["block"] == "nl" and r["impl"] == ref_impl), None)
        if ref is None:
            continue
        n_full = max(r["N"] for r in grp)
        full_size = next(tuple(r["size"]) for r in grp if r["N"] == n_full)
        s = (n_full / ref["N"]) ** 2
        if s != 1.0:
            ref["note"] += f"; ratios use its time and memory × {s:.0f} (N² scaling)"
        nl_full = Case(group, "nl", ref_impl, ref["C"], full_size, ref["width"])
        ref_macs = float(counted_macs(nl_full)[0])
        ref_map = n_full * n_full * 4 / _measure.MIB
        for r in grp:
            own = r is ref
            r["macs_vs_nl"] = 1.0 if own else r["macs"] / ref_macs
            r["macs_branch_vs_nl"] = 1.0 if own else r["macs_branch"] / ref_macs
            r["map_vs_nl"] = 1.0 if own else r["map_mib"] / ref_map
            r["time_vs_nl"] = 1.0 if own else _div(r["fwd_ms"], ref["fwd_ms"] * s)
            r["branch_time_vs_nl"] = 1.0 if own else _div(r["branch_ms"], ref["fwd_ms"] * s)
            r["mem_vs_nl"] = 1.0 if own else _div(r["peak_extra_mib"], ref["peak_extra_mib"] * s)
            r["params_vs_nl"] = r["params"] / ref["params"]


def _div(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of the two groups."""
    out = []
    head = (
        "| block | impl | C | map | N | M | fwd ms (min) | branch ms | peak extra MiB | GMACs | GMACs branch "
        "| map MiB | params | MACs ×fewer | branch MACs ×fewer | map ×smaller | time / NL | branch time / NL "
        "| mem / NL | params / NL | note |"
    )
    for group, title in (
        ("apnb", "APNB vs dense NL (key/value width as given, batch 1, fp32, forward)"),
        ("context", "GC / SNL / SE overhead vs NL (batch 1, fp32, forward)"),
    ):
        out += [f"### {title}", "", head, "|" + "---|" * 21]
        for r in rows:
            if r["group"] != group:
                continue

            def inv(key: str, r: dict[str, Any] = r) -> str:
                v = r.get(key)
                return f"{1 / v:.1f}×" if v else "—"

            out.append(
                f"| {r['block']} | {r['impl']} | {r['C']} | {r['size'][0]}×{r['size'][1]} | {r['N']} | {r['M']} "
                f"| {r['fwd_ms']:.2f} ({r['fwd_ms_min']:.2f}) | {r['branch_ms']:.2f} | {r['peak_extra_mib']:.1f} | {r['macs'] / 1e9:.3f} "
                f"| {r['macs_branch'] / 1e9:.3f} | {r['map_mib']:.3g} | {r['params']:,} "
                f"| {inv('macs_vs_nl')} | {inv('macs_branch_vs_nl')} | {inv('map_vs_nl')} "
                f"| {r.get('time_vs_nl', float('nan')):.3g} "
                f"| {r.get('branch_time_vs_nl', float('nan')):.3g} | {r.get('mem_vs_nl', float('nan')):.3g} "
                f"| {r.get('params_vs_nl', float('nan')):.3g} | {r['note']} |"
            )
        out.append("")
    return "\n".join(out)


def run_suite(
    quick: bool,
    *,
    device: str = "cpu",
    timeout: float = 900.0,
    group: str = "all",
    threads: int | None = None,
    json_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Measure, print the tables, write the rows to ``json_path`` (NaN as null); returns them."""
    rows = measure_suite(quick, device, timeout, group, threads)
    print(format_table(rows))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        safe = [{k: (None if v != v else v) for k, v in r.items()} for r in rows]  # NaN -> null
        json_path.write_text(json.dumps(safe, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the suite."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per row (1 gives stable times on a loaded machine)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    p.add_argument("--group", choices=("apnb", "context", "all"), default="all")
    p.add_argument(_measure.WORKER_FLAG, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return _measure.worker_main(_measure_case, args.worker)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_suite(
        args.quick,
        device=args.device,
        timeout=args.timeout,
        group=args.group,
        threads=args.threads,
        json_path=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
