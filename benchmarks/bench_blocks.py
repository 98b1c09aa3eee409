"""Speed and memory of the non-local block, fast vs reference.

    python benchmarks/bench_blocks.py [--quick] [--json PATH] [--plot PATH] [--suite nl|context|all]

For each pairwise function, the *whole* block (θ, φ, g, W_z, BatchNorm and the aggregation) is
run forward and backward (gradients of the input and of every parameter) at C=512, C'=256,
batch 1, on 2d maps of N = 28×56 = 1568, 64×64 = 4096 and 128×128 = 16384 positions, with the
fast path and with the reference path (which materialises the N×M map). Each case runs in a
fresh subprocess (:mod:`_measure`), so that its peak memory is its own:

* time: median of several forward+backward passes after a warm-up pass (a single pass when
  one takes longer than 20 s);
* peak extra memory: measured in a second fresh process (one pass): its peak resident set
  size during the pass minus its resident size once the block, the input and the output
  gradient exist (:class:`_measure.PeakMemory`). That process runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensors to the system at once:
  with its default, freed 1–32 MiB blocks stay in the heap and the RSS counts them (the fast
  paths' numbers roughly double; the timing process's RSS peak is kept in the row's ``extra``
  as ``peak_extra_mib_default_malloc``; ``--default-malloc`` skips the second process).
  Kernels and threads are warmed up on a tiny input first, so one-time library allocations
  are not counted.

``--kernel`` picks the softmax kernel of the fast rows of the softmax forms (a kernel name of
:data:`nonlocalnet.functional.SOFTMAX_KERNELS`, given to the block as its ``impl``); ``auto``
keeps ``impl="fast"``, the dispatcher's O(N)-memory choice.

The machine's float32 matrix-multiply rate (``torch.mm`` of 2048×2048 matrices, median of
several) is measured too, and each row reports its achieved rate: ``flops`` counts the matrix
products the row's algorithm needs, forward and backward (backward = 2× forward), by
:func:`block_flops`:

* attention (softmax forms, and the reference path of every form): 12·N·M·C' for
  ``embedded_gaussian`` (QKᵀ and PV forward, four products backward); for ``gaussian`` the
  logits use the C input channels: 6·N·M·(C + C'); the reference dot product 12·N·M·C';
  the reference concatenation 6·N·M·C' (only PV is a product);
* fast dot product: 6·(N + M)·C'² (kᵀv and q(kᵀv), forward and backward);
* fast concatenation: none beyond the convolutions (sort, cumsum and gather are not products);
* convolutions: 6·P·C_in·C_out for each 1×1 conv over P positions, plus 6·(N + M)·C' for the
  w_f projection of concatenation.

For the reference path these are the products it runs (as counted by
``nonlocalnet.models.flops.count_macs``); a fast path that recomputes the logits in its backward
pass runs more than it is credited with, so its rate is a lower bound of what it runs at.

``--suite context`` (or ``all``) runs the GC/SNL/APNB suite of ``bench_context.py`` too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import _measure
from nonlocalnet import NonLocal2d
from nonlocalnet.functional import IMPLS, PAIRWISE, SOFTMAX_KERNELS, SOFTMAX_PAIRWISE

log = logging.getLogger("bench_blocks")

#: (channels, inner_channels, 2d map sizes, size of the extra large fast row)
FULL = (512, 256, ((28, 56), (64, 64), (128, 128)), (256, 256))
QUICK = (32, 16, ((16, 16),), (32, 32))

#: Keys every row of ``--json`` has (see :class:`Row` for the others).
ROW_KEYS = (
    "block",
    "pairwise",
    "impl",
    "N",
    "M",
    "fwd_bwd_ms",
    "peak_extra_mib",
    "flops",
    "gflops",
)

#: Above this many positions the fast rows skip the in-process comparison with the reference.
CHECK_MAX_N = 4096


@dataclass
class Case:
    """One measurement, run in its own process."""

    pairwise: str
    impl: str
    size: tuple[int, int]
    channels: int
    inner_channels: int
    min_time: float = 2.0
    check: bool = False
    threads: int | None = None
    memory_only: bool = False
    kernel: str = "auto"


@dataclass
class Row:
    """One line of the table (and of ``--json``)."""

    block: str
    pairwise: str
    impl: str
    N: int
    M: int
    fwd_bwd_ms: float
    peak_extra_mib: float
    flops: float
    gflops: float
    size: str = ""
    reps: int = 0
    max_rel_err: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def block_flops(pairwise: str, impl: str, n: int, m: int, c: int, ci: int) -> float:
    """Matrix-product flops of one forward+backward pass of the block (see the module doc).

    Args:
        pairwise: the pairwise function.
        impl: ``"fast"`` or ``"reference"``.
        n: query positions N.
        m: key positions M.
        c: channels C.
        ci: inner channels C'.

    Returns:
        The flop count (multiply and add counted separately).
    """
    convs = 6 * n * c * ci * 2  # g (over M = N here) and W_z
    if pairwise != "gaussian":
        convs += 6 * n * c * ci * 2  # θ and φ
    if pairwise == "concatenation":
        convs += 6 * (n + m) * ci
    if pairwise == "gaussian":
        attn = 6 * n * m * (c + ci)
    elif pairwise == "embedded_gaussian" or (pairwise == "dot_product" and impl == "reference"):
        attn = 12 * n * m * ci
    elif pairwise == "dot_product":
        attn = 6 * (n + m) * ci * ci
    elif impl == "reference":  # concatenation
        attn = 6 * n * m * ci
    else:
        attn = 0
    return float(convs + attn)


# -- measurement, inside the worker process ---------------------------------------------------


def case_kernel(case: Case) -> str:
    """The softmax kernel the case runs with: ``case.kernel`` for the fast softmax forms."""
    if case.impl == "fast" and case.pairwise in SOFTMAX_PAIRWISE:
        return case.kernel
    return "auto"


def _build(case: Case, impl: str) -> NonLocal2d:
    torch.manual_seed(0)
    block = NonLocal2d(
        case.channels,
        case.inner_channels,
        pairwise=case.pairwise,
        zero_init=False,
        impl=impl,
    )
    with torch.no_grad():  # non-trivial weights, so that every path does real work
        for p in block.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
    return block


def block_forward(block: NonLocal2d, x: Tensor, kernel: str = "auto") -> Tensor:
    """z = BN(W_z y) + x: the block's ``forward``, with ``impl=kernel`` unless ``"auto"``."""
    if kernel == "auto":
        return block(x)
    impl = block.impl
    block.impl = kernel
    try:
        return block(x)
    finally:
        block.impl = impl


def _fwd_bwd(block: NonLocal2d, x: Tensor, grad: Tensor, kernel: str = "auto") -> Tensor:
    for p in block.parameters():
        p.grad = None
    x.grad = None
    out = block_forward(block, x, kernel)
    out.backward(grad)
    return out


def measure(case: Case) -> Row:
    """Time and peak extra memory of one case, in this process."""
    if case.threads:
        torch.set_num_threads(case.threads)
    kernel = case_kernel(case)
    h, w = case.size
    n = h * w
    # Warm up kernels, thread pools and allocator on a tiny input of the same block kind.
    tiny = _build(replace(case, size=(4, 4)), case.impl)
    _fwd_bwd(
        tiny,
        torch.randn(1, case.channels, 4, 4, requires_grad=True),
        torch.randn(1, case.channels, 4, 4),
        kernel,
    )
    del tiny

    block = _build(case, case.impl)
    # Unit-variance logits for the (unscaled) gaussian form: x_iᵀx_j ~ N(0, 1). With unit
    # inputs they would be ~N(0, C), the softmax one-hot and its tail denormal floats, whose
    # arithmetic is many times slower on x86 and would dominate both paths' times.
    x = (torch.randn(1, case.channels, h, w) * case.channels**-0.25).requires_grad_(True)
    grad = torch.randn(1, case.channels, h, w)
    mem = _measure.PeakMemory("cpu")
    mem.start()
    t0, c0 = time.perf_counter(), time.process_time()
    _fwd_bwd(block, x, grad, kernel)
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    times: list[float] = []
    cpu: list[float] = []
    if first > 20.0 or case.memory_only:
        times, cpu = [first], [first_cpu]
    else:
        while len(times) < 2 or (sum(times) < case.min_time and len(times) < 10):
            t0, c0 = time.perf_counter(), time.process_time()
            _fwd_bwd(block, x, grad, kernel)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = mem.extra_mib()
    m = n  # no sub-sampling in the benchmark
    flops = block_flops(case.pairwise, case.impl, n, m, case.channels, case.inner_channels)
    sec = statistics.median(times)
    row = Row(
        block="NonLocal2d",
        pairwise=case.pairwise,
        impl=case.impl,
        N=n,
        M=m,
        fwd_bwd_ms=sec * 1e3,
        peak_extra_mib=peak,
        flops=flops,
        gflops=flops / sec / 1e9,
        size=f"{h}x{w}",
        reps=len(times),
        extra={
            "memory_method": mem.method,
            "threads": torch.get_num_threads(),
            "cpu_ms": statistics.median(cpu) * 1e3,
            "kernel": kernel,
        },
    )
    if case.check and not case.memory_only:
        row.max_rel_err = _check_against_reference(case, block, x, grad, kernel)
    return row


def _check_against_reference(
    case: Case, block: NonLocal2d, x: Tensor, grad: Tensor, kernel: str
) -> float:
    """Relative error of [output, input grad, parameter grads] of this impl vs the reference."""

    def run(b: NonLocal2d, kernel: str) -> Tensor:
        out = _fwd_bwd(b, x, grad, kernel)
        parts = [out.detach(), x.grad] + [p.grad for p in b.parameters()]
        return torch.cat([t.reshape(-1) for t in parts])  # (total,)

    ref = _build(case, "reference")
    ref.load_state_dict(block.state_dict())
    got, want = run(block, kernel), run(ref, "auto")
    return float((got - want).norm() / want.norm())


def _measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: a :class:`Case` as JSON in, its :class:`Row` as a dict out."""
    return asdict(measure(Case(**{**case, "size": tuple(case["size"])})))


# -- orchestration ----------------------------------------------------------------------------


def run_in_subprocess(case: Case, timeout: float, env: dict[str, str] | None = None) -> Row:
    """Run :func:`measure` for ``case`` in a fresh Python process (``env`` added to ours)."""
    try:
        data = _measure.run_worker(__file__, asdict(case), timeout=timeout, env=env)
    except _measure.WorkerError as err:
        raise RuntimeError(
            f"bench case {case.pairwise}/{case.impl} {case.size} failed ({err}):\n{err.stderr}"
        ) from err
    return Row(**data)


def run_case(case: Case, timeout: float, default_malloc: bool = False) -> Row:
    """Time ``case`` in one process and, unless ``default_malloc``, take its peak memory in a
    second one under :data:`_measure.MEMORY_ENV` (one pass)."""
    row = run_in_subprocess(case, timeout)
    if default_malloc:
        return row
    mem = run_in_subprocess(
        replace(case, memory_only=True, check=False), timeout, _measure.MEMORY_ENV
    )
    row.extra["peak_extra_mib_default_malloc"] = row.peak_extra_mib
    row.extra["memory_method"] = f"{mem.extra['memory_method']}, MALLOC_MMAP_THRESHOLD_=65536"
    row.peak_extra_mib = mem.peak_extra_mib
    return row


def run_nl(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every case of the non-local suite; returns ``{"matmul_gflops", "rows", ...}``."""
    c, ci, sizes, big = QUICK if args.quick else FULL
    pairwise = args.pairwise or list(PAIRWISE)
    min_time = 0.2 if args.quick else 2.0
    mm, mm_cpu = _measure.matmul_rate_in_subprocess(
        256 if args.quick else 2048, timeout=args.timeout, threads=args.threads
    )
    log.info("float32 matmul rate: %.1f GFLOP/s (%.1f per CPU second)", mm, mm_cpu)
    rows: list[Row] = []

    def results(complete: bool) -> dict[str, Any]:
        return {
            "suite": "nl",
            "channels": c,
            "inner_channels": ci,
            "batch": 1,
            "threads": rows[0].extra.get("threads") if rows else None,
            "matmul_gflops": mm,
            "matmul_gflops_cpu": mm_cpu,
            "complete": complete,
            "rows": [asdict(r) for r in rows],
        }

    def add(case: Case) -> None:
        row = run_case(case, args.timeout, args.default_malloc)
        log.info(
            "%s %s N=%d: %.1f ms (CPU %.1f ms), %.1f MiB",
            row.pairwise,
            row.impl,
            row.N,
            row.fwd_bwd_ms,
            row.extra["cpu_ms"],
            row.peak_extra_mib,
        )
        rows.append(row)
        if args.json is not None:  # partial results survive an interrupted run
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results(False), indent=2))

    common = {"min_time": min_time, "threads": args.threads, "kernel": args.kernel}
    for size in () if args.large_only else sizes:
        n = size[0] * size[1]
        for pw in pairwise:
            for impl in IMPLS:
                check = impl == "fast" and n <= CHECK_MAX_N
                add(Case(pw, impl, size, c, ci, check=check, **common))
    if not args.no_large and "embedded_gaussian" in pairwise:
        add(Case("embedded_gaussian", "fast", big, c, ci, **common))
    return results(True)


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the rows with fast/reference ratios per (pairwise, N)."""
    rows = results["rows"]
    mm = results["matmul_gflops"]
    ref = {(r["pairwise"], r["N"]): r for r in rows if r["impl"] == "reference"}
    lines = [
        f"float32 matmul rate: {mm:.1f} GFLOP/s; C={results['channels']}, "
        f"C'={results['inner_channels']}, batch {results['batch']}, "
        f"{results.get('threads')} threads",
        "",
        "| pairwise | N (map) | impl | fwd+bwd ms | CPU ms | peak extra MiB | GFLOP/s "
        "| % matmul | speed-up | memory ratio | max rel err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = ref.get((r["pairwise"], r["N"]))
        speed = mem = "—"
        if r["impl"] == "fast" and base is not None:
            speed = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}×"
            mem = (
                f"1/{base['peak_extra_mib'] / r['peak_extra_mib']:.1f}"
                if r["peak_extra_mib"] > 0
                else "0"
            )
        err = "—" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.1e}"
        cpu_ms = r.get("extra", {}).get("cpu_ms")
        cpu = "—" if cpu_ms is None else f"{cpu_ms:.1f}"
        lines.append(
            f"| {r['pairwise']} | {r['N']} ({r['size']}) | {r['impl']} | {r['fwd_bwd_ms']:.1f} "
            f"| {cpu} | {r['peak_extra_mib']:.1f} | {r['gflops']:.1f} | {100 * r['gflops'] / mm:.0f}% "
            f"| {speed} | {mem} | {err} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Options of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (C=32, maps up to 16×16): a smoke test"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the rows")
    parser.add_argument(
        "--suite",
        choices=("nl", "context", "all"),
        default="nl",
        help="nl: the non-local block; context: GC/SNL/APNB (bench_context.py); all",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="PATH", help="plot the results to PATH"
    )
    parser.add_argument(
        "--pairwise",
        action="append",
        choices=PAIRWISE,
        default=None,
        help="only this pairwise function (repeatable; default: all four)",
    )
    parser.add_argument(
        "--no-large", action="store_true", help="skip the embedded_gaussian 256×256 row"
    )
    parser.add_argument(
        "--kernel",
        choices=("auto", *SOFTMAX_KERNELS),
        default="auto",
        help="softmax kernel of the fast rows (the block's impl; auto: impl='fast')",
    )
    parser.add_argument(
        "--large-only", action="store_true", help="only the embedded_gaussian 256×256 row"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="take the peak memory in the timing process, under the default glibc malloc "
        "settings (counts freed tensors kept in the heap), instead of a separate pass",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per case (default: torch's)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed per case (default 1800)"
    )
    parser.add_argument(_measure.WORKER_FLAG, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the chosen suite, print its table, write ``--json`` / ``--plot`` when asked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _measure.worker_main(_measure_case, args.worker)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.suite in ("nl", "all"):
        results = run_nl(args)
        print(format_table(results))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
        if args.plot is not None:
            from bench_plot import plot_bench

            plot_bench(results, args.plot)
    if args.suite in ("context", "all"):
        import bench_context

        path = args.json
        if path is not None and args.suite == "all":
            path = path.with_name(path.stem + "_context.json")
        bench_context.run_suite(
            args.quick, timeout=args.timeout, threads=args.threads, json_path=path
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
