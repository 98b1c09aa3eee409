"""The successors of the non-local block against the dense NL block: time, memory, multiply-adds.

    python benchmarks/bench_successors.py [--quick] [--threads 2] [--json PATH] [--block NAME ...]

Blocks, each with its fast path and its reference path, at C = 512 on 64×128 and 128×256 maps
(N = 8192 and 32768; the second is the 1/8-resolution Cityscapes map of the ANN, CCNet and
EMANet papers), batch 1, float32, forward and backward (gradients of the input and of every
parameter), in training mode:

* ``nl``: the dense non-local block (:class:`~nonlocalnet.layers.nonlocal_block.NonLocal2d`,
  embedded Gaussian, C' = C/2, no sub-sampling). Its reference path materialises the N×N map,
  as every published implementation does: the baseline of the ``*_vs_nl`` columns. Its fast
  path is fused attention.
* ``dnl``: disentangled non-local (:class:`~nonlocalnet.layers.dnl.DisentangledNonLocal2d`,
  C' = C/2, τ = 0.05): reference = ω (N×N) materialised; fast = fused attention on the whitened
  queries and keys plus GCNet's attention pooling for the unary term.
* ``cc``: recurrent criss-cross attention (:class:`~nonlocalnet.layers.criss_cross.
  CrissCrossAttention`, R = 2, C' = C/8): reference = mmcv's joint N×(H+W) energy; fast = one
  axis at a time, merged by log-sum-exp, logits recomputed in backward.
* ``ema``: the EM attention unit (:class:`~nonlocalnet.layers.ema.EMAU`, K = 64 bases, T = 3
  steps): both paths form the N×K responsibilities (the method has no N×N map); the fast one
  without permuted copies.
* ``ea``: efficient attention (:class:`~nonlocalnet.layers.efficient_attention.
  EfficientAttention`, C_k = C_v = C/2, one head, softmax normalisation): reference = the implied
  N×N map W = ρ_q(Q)ρ_k(K)ᵀ materialised; fast = the C_k×C_v global context ρ_k(K)ᵀV first.

Weights are random and not zero-initialised (``zero_init=False``; θ and φ of NL and DNL drawn so
that their logits have unit variance on unit-variance inputs), so no branch is zero.

Before the rows of a block, its fast and reference paths are run on the same weights and input
and compared (output, input gradient and parameter gradients, relative L2 error ≤
:data:`TOLERANCE` in float64; the float32 difference is reported) on a map of at most
:data:`CHECK_MAX_N` positions (the benchmark size halved until it fits); a block that fails the
check is not timed, and the script exits with status 1.

Columns:

* ``time_ms``: median of ``--reps`` (3) forward+backward passes after a warm-up pass at the
  benchmark size (kernels and threads are warmed first on a tiny map); ``time_ms_min`` the
  fastest.
* ``peak_extra_mib``: peak memory of one forward+backward pass above the level once the block,
  the input and the output gradient exist (:class:`_measure.PeakMemory`: CPU peak RSS),
  measured in a second fresh process under :data:`_measure.MEMORY_ENV` (glibc returns freed
  blocks at once); ``--one-process`` takes it from the timing process's warm-up pass instead.
* ``macs``: multiply-adds of one forward+backward pass, counted with
  :func:`nonlocalnet.models.flops.count_macs` on the real tensors of the warm-up pass at the
  benchmark size (``macs_method = "real"``; the fused kernels' backward passes recompute their
  logits, and are counted as they run), or, for a row skipped for memory, on meta tensors
  (``"meta"``: the reference paths run the same products there).
* ``map``/``map_mib``: the largest tensor of pairwise weights the path forms (float32).
* ``*_vs_ref`` (fast rows): fast / reference of the same block and size; ``*_vs_nl``: the row
  over the dense reference NL of the same size (MACs also when that row is skipped: its count
  needs no memory).

Every row runs in its own fresh process (:func:`_measure.run_worker`), so its peak memory is its
own. A reference row that forms an N×N map is skipped, with a "would need X GiB" note, when the
maps it keeps alive for backward do not fit in the machine's available memory (``MemAvailable``;
:func:`dense_need_gib`).

``--quick``: C = 32 on a 8×16 map, a smoke test; each row still runs in its own process, which
also takes its peak memory (as ``--one-process``). It writes JSON only when ``--json`` is given
(the default path is for the full run). ``--in-process`` runs the rows in this process (no
isolation of the peak memory: for tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import _measure
from bench_context import mem_available_gib
from nonlocalnet.layers.criss_cross import CrissCrossAttention
from nonlocalnet.layers.dnl import DisentangledNonLocal2d
from nonlocalnet.layers.efficient_attention import EfficientAttention
from nonlocalnet.layers.ema import EMAU
from nonlocalnet.layers.nonlocal_block import NonLocal2d
from nonlocalnet.models.flops import count_macs

log = logging.getLogger("bench_successors")

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "data" / "bench_successors.json"

#: (channels, map sizes) of the full run and of ``--quick``.
FULL = (512, ((64, 128), (128, 256)))
QUICK = (32, ((8, 16),))
IMPLS = ("fast", "reference")
#: relative L2 error allowed between the fast and the reference path, in float64 (the paths
#: compute one function; in float32 rounding alone reaches 3e-4 for EMA's three EM steps at
#: N = 8192, so the float32 difference is reported beside the check, not judged).
TOLERANCE = 1e-10
#: largest map (positions) of the agreement check.
CHECK_MAX_N = 8192
#: criss-cross recurrence, EMA bases and steps.
CC_RECURRENCE = 2
EMA_BASES = 64
EMA_STAGES = 3
#: N×N float32 maps alive at the peak of a reference forward+backward pass: the peak extra memory
#: over N²·4 bytes measured with this script at C = 64 on a 64×64 map was 3.06 (NL: the softmax
#: kept for backward, its gradient and the logits' gradient), 3.08 (DNL: ω in place of the
#: softmax) and 2.08 (efficient attention: W and its gradient); the rest is activations.
DENSE_MAPS = {"nl": 3.0, "dnl": 3.0, "ea": 2.0}
#: share of MemAvailable a row may plan to use.
MEMORY_SHARE = 0.8


def _nl(channels: int, impl: str) -> nn.Module:
    return NonLocal2d(channels, pairwise="embedded_gaussian", zero_init=False, impl=impl)


def _dnl(channels: int, impl: str) -> nn.Module:
    return DisentangledNonLocal2d(channels, zero_init=False, impl=impl)


def _cc(channels: int, impl: str) -> nn.Module:
    return CrissCrossAttention(channels, recurrence=CC_RECURRENCE, zero_init=False, impl=impl)


def _ema(channels: int, impl: str) -> nn.Module:
    return EMAU(channels, num_bases=EMA_BASES, num_stages=EMA_STAGES, zero_init=False, impl=impl)


def _ea(channels: int, impl: str) -> nn.Module:
    return EfficientAttention(channels, zero_init=False, impl=impl)


#: name → (label, builder(channels, impl)).
BLOCKS: dict[str, tuple[str, Callable[[int, str], nn.Module]]] = {
    "nl": ("NL (embedded Gaussian)", _nl),
    "dnl": ("DNL", _dnl),
    "cc": (f"criss-cross R={CC_RECURRENCE}", _cc),
    "ema": (f"EMA K={EMA_BASES} T={EMA_STAGES}", _ema),
    "ea": ("efficient attention", _ea),
}


def build(name: str, channels: int, impl: str, seed: int = 0) -> nn.Module:
    """The block ``name`` with random, non-zero weights, in training mode.

    The same ``seed`` gives the same weights for both impls. θ and φ of NL and DNL are redrawn
    with std σ = (C · s · √C')^-1/2 (s the logit scale, s/τ for DNL), so that their logits
    s·qᵀk have unit variance on unit-variance inputs; g with std C^-1/2.
    """
    torch.manual_seed(seed)
    block = BLOCKS[name][1](channels, impl)
    if name in ("nl", "dnl"):
        c, c_inner = block.channels, block.inner_channels
        std = (c * block.scale * math.sqrt(c_inner)) ** -0.5
        with torch.no_grad():
            block.theta.weight.normal_(0.0, std)
            block.phi.weight.normal_(0.0, std)
            block.g.weight.normal_(0.0, c**-0.5)
    return block.train()


def _fwd_bwd(block: nn.Module, x: Tensor, grad: Tensor) -> None:
    """One forward+backward pass; gradients of the previous pass are dropped first."""
    for p in block.parameters():
        p.grad = None
    x.grad = None
    out = block(x)
    out.backward(grad)
    del out


def _inputs(channels: int, size: Sequence[int], seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *size, generator=g).requires_grad_(True)
    grad = torch.randn(1, channels, *size, generator=g)
    return x, grad


# -- agreement of fast and reference ----------------------------------------------------------


def check_size(size: Sequence[int], max_n: int = CHECK_MAX_N) -> tuple[int, int]:
    """``size`` halved (both sides, rounding up) until it has at most ``max_n`` positions."""
    h, w = size
    while h * w > max_n and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def check_agreement(name: str, channels: int, size: Sequence[int]) -> dict[str, Any]:
    """Relative L2 error of [output, input grad, parameter grads], fast vs reference.

    Both paths get the same weights, buffers and input, in training mode: in float64 (judged
    against :data:`TOLERANCE`) and in float32 (``rel_err_float32``, reported).
    """

    def run(block: nn.Module, dtype: torch.dtype) -> Tensor:
        x, grad = _inputs(channels, size)
        x = x.detach().to(dtype).requires_grad_(True)
        out = block(x)
        out.backward(grad.to(dtype))
        parts = [out.detach(), x.grad] + [p.grad for p in block.parameters() if p.grad is not None]
        return torch.cat([t.reshape(-1) for t in parts])  # (total,)

    t0 = time.perf_counter()
    errors, norm = {}, 0.0
    for dtype in (torch.float64, torch.float32):
        fast = build(name, channels, "fast")
        ref = build(name, channels, "reference")
        ref.load_state_dict(fast.state_dict())
        fast, ref = fast.to(dtype), ref.to(dtype)
        got, want = run(fast, dtype), run(ref, dtype)
        errors[dtype] = float((got - want).norm() / want.norm())
        norm = norm or float(want.norm())
    err = errors[torch.float64]
    return {
        "block": name,
        "C": channels,
        "size": list(size),
        "rel_err": err,
        "rel_err_float32": errors[torch.float32],
        "ok": err <= TOLERANCE,
        "branch_norm": norm,
        "seconds": time.perf_counter() - t0,
    }


# -- one row, inside the worker process -------------------------------------------------------


@dataclass
class Case:
    """One measured row."""

    block: str
    impl: str
    channels: int
    size: tuple[int, int]
    threads: int = 2
    reps: int = 3
    memory_only: bool = False


def measure(case: Case) -> dict[str, Any]:
    """Time, peak extra memory and multiply-adds of the case, in this process."""
    if case.threads:
        torch.set_num_threads(case.threads)
    # warm kernels, thread pools, the allocator and the flop counter on a tiny map
    tiny = build(case.block, case.channels, case.impl)
    count_macs(_fwd_bwd, tiny, *_inputs(case.channels, (4, 8)))
    del tiny

    block = build(case.block, case.channels, case.impl)
    x, grad = _inputs(case.channels, case.size)
    mem = _measure.PeakMemory("cpu")
    mem.start()
    if case.memory_only:
        _fwd_bwd(block, x, grad)
        return {"peak_extra_mib": mem.extra_mib(), "memory_method": mem.method}
    t0 = time.perf_counter()
    macs = count_macs(_fwd_bwd, block, x, grad)
    first = time.perf_counter() - t0
    peak = mem.extra_mib()
    times = []
    for _ in range(case.reps):
        t0 = time.perf_counter()
        _fwd_bwd(block, x, grad)
        times.append(time.perf_counter() - t0)
    return {
        "time_ms": 1e3 * statistics.median(times),
        "time_ms_min": 1e3 * min(times),
        "times_ms": [1e3 * t for t in times],
        "warmup_ms": 1e3 * first,
        "peak_extra_mib": peak,
        "memory_method": mem.method,
        "macs": macs,
        "threads": torch.get_num_threads(),
    }


def _measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: a :class:`Case` as JSON in, its measurements out."""
    return measure(Case(**{**case, "size": tuple(case["size"])}))


def run_case(
    case: Case, *, timeout: float, one_process: bool = False, in_process: bool = False
) -> dict[str, Any]:
    """Measure ``case`` in a fresh process (and its memory in a second one, see the module
    docstring); ``{"error": why}`` when a process fails."""
    if in_process:
        return measure(case)
    try:
        if one_process:
            return _measure.run_worker(
                __file__, asdict(case), timeout=timeout, env=_measure.MEMORY_ENV
            )
        res = _measure.run_worker(__file__, asdict(case), timeout=timeout)
        mem = _measure.run_worker(
            __file__,
            asdict(replace(case, memory_only=True)),
            timeout=timeout,
            env=_measure.MEMORY_ENV,
        )
    except _measure.WorkerError as err:
        return {"error": str(err)}
    res["peak_extra_mib_timing_process"] = res["peak_extra_mib"]
    res["peak_extra_mib"] = mem["peak_extra_mib"]
    res["memory_method"] = f"{mem['memory_method']}, MALLOC_MMAP_THRESHOLD_=65536"
    return res


# -- sizes, memory, maps ----------------------------------------------------------------------


def dense_need_gib(name: str, impl: str, channels: int, size: Sequence[int]) -> float:
    """Memory a forward+backward pass needs beyond its inputs, for the paths with an N×N map
    (:data:`DENSE_MAPS` maps, plus 16 C-wide activations); 0 for the others."""
    if impl != "reference" or name not in DENSE_MAPS:
        return 0.0
    n = size[0] * size[1]
    return (DENSE_MAPS[name] * n * n * 4 + 16 * n * channels * 4) / 2**30


def fits(name: str, impl: str, channels: int, size: Sequence[int]) -> tuple[bool, str]:
    """Whether the row fits in the available memory; the skip note when it does not."""
    need = dense_need_gib(name, impl, channels, size)
    avail = mem_available_gib()
    if need == 0.0 or avail is None or need <= MEMORY_SHARE * avail:
        return True, ""
    n = size[0] * size[1]
    return False, (
        f"skipped: would need ~{need:.1f} GiB ({DENSE_MAPS[name]:g} N×N float32 maps of "
        f"{n * n * 4 / 2**30:.2f} GiB), {avail:.1f} GiB available"
    )


def pairwise_map(name: str, impl: str, channels: int, size: Sequence[int]) -> tuple[str, float]:
    """The largest tensor of pairwise weights the path forms: its shape and its MiB (float32)."""
    h, w = size
    n = h * w
    if name in DENSE_MAPS and impl == "reference":
        return "N×N", n * n * 4 / _measure.MIB
    if name == "cc":
        # mmcv's joint energy (the self position in both lines), or one axis's logits at a time
        m = h + w if impl == "reference" else max(h, w)
        return ("N×(H+W)" if impl == "reference" else "N×max(H,W)"), n * m * 4 / _measure.MIB
    if name == "ema":
        return "N×K", n * EMA_BASES * 4 / _measure.MIB
    return "—", 0.0


def meta_macs(name: str, impl: str, channels: int, size: Sequence[int]) -> int:
    """Multiply-adds of one forward+backward pass counted on meta tensors."""
    with torch.device("meta"):
        block = BLOCKS[name][1](channels, impl).train()
        x = torch.empty(1, channels, *size, requires_grad=True)

    def step(t: Tensor) -> None:
        block(t).sum().backward()

    return count_macs(step, x)


# -- the suite ---------------------------------------------------------------------------------


def run_suite(
    *,
    quick: bool = False,
    blocks: Sequence[str] = tuple(BLOCKS),
    threads: int = 2,
    reps: int = 3,
    timeout: float = 1800.0,
    one_process: bool = False,
    in_process: bool = False,
) -> dict[str, Any]:
    """Check and measure every block; returns ``{"config", "checks", "rows"}``."""
    channels, sizes = QUICK if quick else FULL
    blocks = ["nl", *[b for b in blocks if b != "nl"]]  # the baseline first
    torch.set_num_threads(threads)
    checks, rows = [], []
    for name in blocks:
        for csize in dict.fromkeys(check_size(s) for s in sizes):
            log.info("checking %s fast vs reference at %s×%s", name, *csize)
            checks.append(check_agreement(name, channels, csize))
        ok = all(c["ok"] for c in checks if c["block"] == name)
        for size in sizes:
            for impl in IMPLS:
                rows.append(
                    _row(
                        name,
                        impl,
                        channels,
                        size,
                        ok,
                        threads,
                        reps,
                        timeout,
                        one_process,
                        in_process,
                    )
                )
    _add_ratios(rows)
    config = {
        "quick": quick,
        "channels": channels,
        "sizes": [list(s) for s in sizes],
        "batch": 1,
        "dtype": "float32",
        "pass": "forward+backward, training mode",
        "threads": threads,
        "reps": reps,
        "tolerance": TOLERANCE,
        "mem_available_gib": mem_available_gib(),
        "torch": torch.__version__,
        "memory": "in-process"
        if in_process
        else ("one process" if one_process else "separate process"),
    }
    return {"config": config, "checks": checks, "rows": rows}


def _row(
    name: str,
    impl: str,
    channels: int,
    size: tuple[int, int],
    agreed: bool,
    threads: int,
    reps: int,
    timeout: float,
    one_process: bool,
    in_process: bool,
) -> dict[str, Any]:
    nan = float("nan")
    map_shape, map_mib = pairwise_map(name, impl, channels, size)
    row: dict[str, Any] = {
        "block": name,
        "label": BLOCKS[name][0],
        "impl": impl,
        "C": channels,
        "size": list(size),
        "N": size[0] * size[1],
        "map": map_shape,
        "map_mib": map_mib,
    }
    with torch.device("meta"):
        row["params"] = sum(p.numel() for p in BLOCKS[name][1](channels, impl).parameters())
    fit, why = fits(name, impl, channels, size)
    if not agreed:
        res: dict[str, Any] = {"note": "not timed: fast and reference disagree (see checks)"}
    elif not fit:
        log.warning("%s %s %s×%s %s", name, impl, *size, why)
        res = {"note": why}
    else:
        log.info("measuring %s %s at %s×%s", name, impl, *size)
        case = Case(name, impl, channels, size, threads, reps)
        res = run_case(case, timeout=timeout, one_process=one_process, in_process=in_process)
        if "error" in res:
            res["note"] = res.pop("error")
    if "macs" in res:
        row["macs_method"] = "real"
    else:
        try:
            res["macs"] = meta_macs(name, impl, channels, size)
            row["macs_method"] = "meta"
        except Exception as err:  # a path with an op that has no meta kernel
            res["macs"] = None
            row["macs_method"] = f"unavailable ({type(err).__name__} on meta tensors)"
    for key in ("time_ms", "time_ms_min", "peak_extra_mib"):
        row[key] = res.pop(key, nan)
    row["macs"] = res.pop("macs")
    row["note"] = res.pop("note", "")
    row["extra"] = res
    return row


def _float(v: int | None) -> float:
    return float("nan") if v is None else float(v)


def _div(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``*_vs_ref`` on the fast rows and ``*_vs_nl`` on every row (see the module docstring)."""
    by_key = {(r["block"], r["impl"], tuple(r["size"])): r for r in rows}
    for r in rows:
        size = tuple(r["size"])
        ref = by_key.get((r["block"], "reference", size))
        nl = by_key.get(("nl", "reference", size))
        for suffix, base in (("ref", ref), ("nl", nl)):
            if base is None or (suffix == "ref" and r["impl"] == "reference"):
                continue
            r[f"time_vs_{suffix}"] = _div(r["time_ms"], base["time_ms"])
            r[f"mem_vs_{suffix}"] = _div(r["peak_extra_mib"], base["peak_extra_mib"])
            r[f"macs_vs_{suffix}"] = _div(_float(r["macs"]), _float(base["macs"]))


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables: the agreement checks, then the rows."""
    cfg = result["config"]
    out = [
        "### Agreement, fast vs reference (output + all gradients; float64 judged, tol "
        f"{cfg['tolerance']:g}; float32 reported)",
        "",
        "| block | map | rel. L2 error float64 | float32 | ok |",
        "|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        f32 = c.get("rel_err_float32")
        out.append(
            f"| {BLOCKS[c['block']][0]} | {c['size'][0]}×{c['size'][1]} | {c['rel_err']:.2e} "
            f"| {'—' if f32 is None else f'{f32:.2e}'} | {'yes' if c['ok'] else 'NO'} |"
        )
    out += [
        "",
        f"### Successors vs dense NL (C={cfg['channels']}, batch 1, float32, forward+backward, "
        f"{cfg['threads']} threads, median of {cfg['reps']})",
        "",
        "| block | impl | size | N | ms (min) | peak extra MiB | GMACs | pairwise map | map MiB "
        "| time fast/ref | mem fast/ref | MACs fast/ref | time / NL | mem / NL | MACs / NL | note |",
        "|" + "---|" * 16,
    ]
    for r in result["rows"]:
        macs = _fmt(_float(r["macs"]) / 1e9, ".4g") + (
            " (meta)" if r["macs_method"] == "meta" else ""
        )
        out.append(
            f"| {r['label']} | {r['impl']} | {r['size'][0]}×{r['size'][1]} | {r['N']} "
            f"| {_fmt(r['time_ms'], '.1f')} ({_fmt(r['time_ms_min'], '.1f')}) "
            f"| {_fmt(r['peak_extra_mib'], '.1f')} | {macs} | {r['map']} | {_fmt(r['map_mib'], '.4g')} "
            f"| {_fmt(r.get('time_vs_ref'))} | {_fmt(r.get('mem_vs_ref'))} "
            f"| {_fmt(r.get('macs_vs_ref'))} | {_fmt(r.get('time_vs_nl'))} "
            f"| {_fmt(r.get('mem_vs_nl'))} | {_fmt(r.get('macs_vs_nl'))} | {r['note']} |"
        )
    out.append("")
    return "\n".join(out)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the suite, print the tables, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--reps", type=int, default=3, help="timed passes per row (default 3)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    p.add_argument(
        "--block",
        action="append",
        choices=tuple(BLOCKS),
        default=None,
        help="only these blocks (repeat; the dense NL is always measured)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"write the results here (default {DEFAULT_JSON.relative_to(HERE.parent)}; "
        "with --quick only when given)",
    )
    p.add_argument(
        "--one-process",
        action="store_true",
        help="take the peak memory in the timing process (fewer processes)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the rows in this process (no isolation: for tests)",
    )
    p.add_argument(_measure.WORKER_FLAG, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return _measure.worker_main(_measure_case, args.worker)
    if args.threads < 1 or args.reps < 1:
        p.error(f"--threads and --reps must be >= 1, got {args.threads} and {args.reps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run_suite(
        quick=args.quick,
        blocks=args.block or tuple(BLOCKS),
        threads=args.threads,
        reps=args.reps,
        timeout=args.timeout,
        one_process=args.one_process or args.quick,
        in_process=args.in_process,
    )
    print(format_table(result))
    path = args.json if args.json is not None or args.quick else DEFAULT_JSON
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_nan_to_none(result), indent=2) + "\n")
        log.info("wrote %s", path)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
