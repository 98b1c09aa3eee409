"""Our blocks against the other implementations of them, side by side: time and peak memory.

    python benchmarks/bench_peers.py [--quick] [--rows NAME ...] [--peers NAME ...]
        [--dtype float32|bfloat16 ...] [--step fwd|fwd_bwd ...] [--threads 2] [--warmup 1]
        [--repeat 3] [--json PATH] [--group case|row|all] [--no-memory-pass] [--list]
        [--interleave ROUNDS]

Each row is one block at one size. Our block (fast path, random non-zero weights) runs against
every peer that computes that function (:mod:`peers.adapters`): the installed packages mmcv-lite
(``mmcv.cnn.NonLocal{2,3}d``, ``ContextBlock``), timm (``timm.layers.NonLocalAttn``,
``GlobalContext``) and pytorchvideo (``create_nonlocal``), and faithful stand-ins for code that
does not install as a package (AlexHex7/Non-local_pytorch, SlowFast's ``nonlocal_helper.py``
unless the ``slowfast`` package is importable, the official ANN ``APNB``; see
``benchmarks/peers/``). Our block is built with the options that make it the peer's function
(scale convention, pooling position); the peer receives our weights through an explicit map of
every key.

Before a peer is timed, the process of its first case checks that both compute the same function
with those weights: eval-mode forward, then training-mode forward and backward (dropout off for
the check), float32; the largest difference of the outputs (and of the input gradients) over the
largest value of the residual branch (out − x; the output itself for APNB, whose output is not
residual) must be at most ``--tol`` (1e-4). A peer that fails is aborted for the row with a
message saying by how much; the bench then exits with status 1. The bfloat16 forward difference is
reported, not asserted.

Measurement (``_measure``): every case (row × implementation × dtype × step) runs in a fresh
process with ``--threads`` torch threads (2): ``--warmup`` passes (1), then the median of
``--repeat`` passes (3). ``fwd``: eval mode under ``no_grad``; ``fwd_bwd``: training mode, the
output's gradient back to the input and every parameter. bfloat16: ``torch.autocast("cpu")``.
Peak memory is taken in a second fresh process (one pass after a warm-up on a tiny input), under
``_measure.MEMORY_ENV`` so that glibc returns freed tensors at once: the peak resident set above
the level once module and input exist. Ratios are the peer's value over ours (≥ 1: ours wins).

Rows (``--quick``: the same kinds at tiny sizes, every case in one process, memory from the timing
process; ``--group row`` gives each row its own process):

* ``nl_video``: NL embedded Gaussian on an 8×14×14 video, N = 1568, C = 512, C' = 256;
  ``nl_video_sub``: the same, sub-sampled 1×2×2 (M = 392);
* ``nl_4096`` / ``nl_16384``: NL embedded Gaussian on 64×64 / 128×128 maps;
* ``gauss_4096`` / ``gauss_16384``: NL Gaussian on the same maps;
* ``nl_b8_c512``: NL embedded Gaussian, batch 8, C = 512, 14×14 (N = 196);
  ``nl_b8_c1024``: batch 8, C = 1024 (C' = 512), 7×7 (N = 49);
* ``dot_b8_c512`` / ``dot_16384``: NL dot product, batch 8 at 14×14 / batch 1 at 128×128;
  ``concat_b8_c512`` / ``concat_784``: NL concatenation, batch 8 at 14×14 / batch 1 at 28×28,
  inference only (only mmcv has these forms; its concatenation materialises (B, 2C', N, M)
  pair features, so larger maps do not fit in memory, and cannot train: it divides its
  ReLU's output in place, which the ReLU's backward needs);
* ``gc``: GC (attention pooling, add fusion, r = 1/16), C = 1024, 28×28, batch 8;
* ``apnb_64x128`` / ``apnb_128x256``: APNB, 512 channels, key/value width 256;
* ``net_nl_c2d_r50`` / ``net_nl_i3d_r50``: a training step of the whole network at 8×224×224,
  batch 2, with our blocks' fast path against the same network with their reference path (the
  map materialised, as the peers do); with the multiply-adds of both (meta-device count) and the
  time ratio divided by the MAC ratio. ``--quick`` runs ``nl_c2d_tiny`` instead.

``--interleave ROUNDS`` (time only, for a shared machine): one process per (row, peer, dtype,
step) holds both ours and the peer and alternates their passes ROUNDS times, so that both see
the same load; it prints the ratio of the medians and of the fastest passes.

Full run, on a quiet machine (about an hour or two on 2 cores)::

    python benchmarks/bench_peers.py --json benchmarks/data/bench_peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import _measure
from peers.adapters import (
    PEERS,
    BlockSpec,
    build_ours,
    copy_weights,
    corrupt_weights,
    find_peer,
    peers_for,
    randomise,
)

log = logging.getLogger("bench_peers")

DTYPES = ("float32", "bfloat16")
STEPS = ("fwd", "fwd_bwd")
#: Largest |ours − peer| over the largest value of the branch, float32.
TOL = 1e-4
OURS = "ours"
NET_IMPLS = ("fast", "reference")


@dataclass(frozen=True)
class BlockRow:
    """A row of one block at one size (``steps``: the steps it is measured in)."""

    name: str
    title: str
    spec: BlockSpec
    steps: tuple[str, ...] = STEPS


@dataclass(frozen=True)
class NetRow:
    """A row of a whole network: our blocks' fast path against their reference path."""

    name: str
    title: str
    model: str
    input_shape: tuple[int, ...]
    dtypes: tuple[str, ...] = ("float32",)


Row = BlockRow | NetRow


def _nl(c: int, ci: int, size: tuple[int, ...], **kw: Any) -> BlockSpec:
    return BlockSpec("nl", c, size, inner_channels=ci, **kw)


FULL_ROWS: tuple[Row, ...] = (
    BlockRow(
        "nl_video", "NL embedded Gaussian, 8×14×14 video (N = 1568)", _nl(512, 256, (8, 14, 14))
    ),
    BlockRow(
        "nl_video_sub",
        "NL embedded Gaussian, 8×14×14 video, sub-sampled 1×2×2 (N = 1568, M = 392)",
        _nl(512, 256, (8, 14, 14), sub_sample=True),
    ),
    BlockRow("nl_4096", "NL embedded Gaussian, 64×64 (N = 4096)", _nl(512, 256, (64, 64))),
    BlockRow("nl_16384", "NL embedded Gaussian, 128×128 (N = 16384)", _nl(512, 256, (128, 128))),
    BlockRow(
        "gauss_4096", "NL Gaussian, 64×64 (N = 4096)", _nl(512, 256, (64, 64), pairwise="gaussian")
    ),
    BlockRow(
        "gauss_16384",
        "NL Gaussian, 128×128 (N = 16384)",
        _nl(512, 256, (128, 128), pairwise="gaussian"),
    ),
    BlockRow(
        "nl_b8_c512",
        "NL embedded Gaussian 2d, batch 8, C = 512, 14×14 (N = 196)",
        _nl(512, 256, (14, 14), batch=8),
    ),
    BlockRow(
        "nl_b8_c1024",
        "NL embedded Gaussian 2d, batch 8, C = 1024, C' = 512, 7×7 (N = 49)",
        _nl(1024, 512, (7, 7), batch=8),
    ),
    BlockRow(
        "dot_b8_c512",
        "NL dot product 2d, batch 8, C = 512, 14×14 (N = 196)",
        _nl(512, 256, (14, 14), batch=8, pairwise="dot_product"),
    ),
    BlockRow(
        "dot_16384",
        "NL dot product, 128×128 (N = 16384)",
        _nl(512, 256, (128, 128), pairwise="dot_product"),
    ),
    BlockRow(
        "concat_b8_c512",
        "NL concatenation 2d, batch 8, C = 512, 14×14 (N = 196), inference",
        _nl(512, 256, (14, 14), batch=8, pairwise="concatenation"),
        steps=("fwd",),
    ),
    BlockRow(
        "concat_784",
        "NL concatenation, 28×28 (N = 784; mmcv's pair features take 1.2 GiB), inference",
        _nl(512, 256, (28, 28), pairwise="concatenation"),
        steps=("fwd",),
    ),
    BlockRow(
        "gc",
        "GC (att, add, r = 1/16), C = 1024, 28×28, batch 8",
        BlockSpec("gc", 1024, (28, 28), 8),
    ),
    BlockRow(
        "apnb_64x128",
        "APNB, 512 ch, key/value 256, 64×128 (N = 8192, S = 110)",
        BlockSpec("apnb", 512, (64, 128), inner_channels=256),
    ),
    BlockRow(
        "apnb_128x256",
        "APNB, 512 ch, key/value 256, 128×256 (N = 32768, S = 110)",
        BlockSpec("apnb", 512, (128, 256), inner_channels=256),
    ),
    NetRow(
        "net_nl_c2d_r50",
        "NL-C2D R50 (5 blocks) training step, 8×224×224, batch 2",
        "nl_c2d_r50",
        (2, 3, 8, 224, 224),
    ),
    NetRow(
        "net_nl_i3d_r50",
        "NL-I3D R50 training step, 8×224×224, batch 2",
        "nl_i3d_r50",
        (2, 3, 8, 224, 224),
    ),
)

QUICK_ROWS: tuple[Row, ...] = (
    BlockRow("nl_video", "NL embedded Gaussian, 4×6×6 video", _nl(16, 8, (4, 6, 6))),
    BlockRow(
        "nl_video_sub",
        "NL embedded Gaussian, 4×6×6 video, sub-sampled",
        _nl(16, 8, (4, 6, 6), sub_sample=True),
    ),
    BlockRow("nl_4096", "NL embedded Gaussian, 8×8", _nl(16, 8, (8, 8))),
    BlockRow("nl_16384", "NL embedded Gaussian, 16×16", _nl(16, 8, (16, 16))),
    BlockRow("gauss_4096", "NL Gaussian, 8×8", _nl(16, 8, (8, 8), pairwise="gaussian")),
    BlockRow("gauss_16384", "NL Gaussian, 16×16", _nl(16, 8, (16, 16), pairwise="gaussian")),
    BlockRow("nl_b8_c512", "NL embedded Gaussian, batch 2, 6×6", _nl(16, 8, (6, 6), batch=2)),
    BlockRow(
        "nl_b8_c1024", "NL embedded Gaussian, batch 2, C = 32, 4×4", _nl(32, 16, (4, 4), batch=2)
    ),
    BlockRow(
        "dot_b8_c512",
        "NL dot product, batch 2, 6×6",
        _nl(16, 8, (6, 6), batch=2, pairwise="dot_product"),
    ),
    BlockRow("dot_16384", "NL dot product, 16×16", _nl(16, 8, (16, 16), pairwise="dot_product")),
    BlockRow(
        "concat_b8_c512",
        "NL concatenation, batch 2, 6×6, inference",
        _nl(16, 8, (6, 6), batch=2, pairwise="concatenation"),
        steps=("fwd",),
    ),
    BlockRow(
        "concat_784",
        "NL concatenation, 8×8, inference",
        _nl(16, 8, (8, 8), pairwise="concatenation"),
        steps=("fwd",),
    ),
    BlockRow("gc", "GC, C = 64, 8×8, batch 2", BlockSpec("gc", 64, (8, 8), 2)),
    BlockRow(
        "apnb_64x128", "APNB, 16 ch, 12×16", BlockSpec("apnb", 16, (12, 16), inner_channels=8)
    ),
    BlockRow(
        "apnb_128x256", "APNB, 16 ch, 16×32", BlockSpec("apnb", 16, (16, 32), inner_channels=8)
    ),
    NetRow(
        "net_nl_c2d_tiny",
        "nl_c2d_tiny training step, 8×32×32, batch 2",
        "nl_c2d_tiny",
        (2, 3, 8, 32, 32),
    ),
)


def rows_table(quick: bool) -> dict[str, Row]:
    """The rows of a run by name."""
    return {r.name: r for r in (QUICK_ROWS if quick else FULL_ROWS)}


@dataclass
class Case:
    """One measurement: a row, an implementation, a dtype and a step, in one process."""

    row: str
    impl: str  # "ours", a peer name, or "fast"/"reference" for a network row
    dtype: str
    step: str
    quick: bool = False
    ours_options: dict[str, Any] = field(default_factory=dict)
    threads: int = 2
    warmup: int = 1
    repeat: int = 3
    check: bool = False
    memory_only: bool = False
    corrupt: bool = False
    tol: float = TOL

    @property
    def key(self) -> tuple[str, str]:
        """(row, implementation): a check failure aborts every case with this key."""
        return (self.row, self.impl)


class MismatchError(RuntimeError):
    """Ours and a peer disagree after the weight copy."""


# -- measurement, inside the worker process ---------------------------------------------------


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if dtype == "float32":
        return contextlib.nullcontext()
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def make_input(spec: BlockSpec, seed: int = 1) -> tuple[Tensor, Tensor]:
    """The input x and the output gradient of a block row (same in every process).

    Gaussian rows scale x by C^-1/4, so that x_iᵀx_j ~ N(0, 1) (see :func:`peers.adapters.randomise`
    on degenerate softmaxes).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.input_shape, generator=gen)
    if spec.kind == "nl" and spec.pairwise == "gaussian":
        x = x * spec.channels**-0.25
    grad = torch.randn(spec.input_shape, generator=gen)
    return x, grad


def _dropout_off(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


def _rel(got: Tensor, want: Tensor, base: Tensor | None) -> float:
    """max |got − want| over max |want − base|."""
    scale = (want - base if base is not None else want).abs().max()
    return float((got - want).abs().max() / scale.clamp_min(1e-30))


def check_agreement(
    ours: nn.Module,
    peer: nn.Module,
    spec: BlockSpec,
    tol: float = TOL,
    label: str = "",
    train: bool = True,
) -> dict[str, float]:
    """Ours and the peer compute the same function: eval forward, train forward + backward
    (the latter unless ``train`` is False: a row measured in inference only).

    Float32; dropout off during the check. Errors are relative to the largest value of the
    branch (out − x for residual blocks; the output for APNB) and of the input gradient's branch
    part.

    Returns:
        ``{"eval", "train", "grad", "bf16"}`` relative errors (``bf16``: eval forward under
        bfloat16 autocast, reported only).

    Raises:
        MismatchError: a float32 error above ``tol`` (or not finite).
    """
    residual = spec.kind != "apnb"
    x, grad = make_input(spec)
    errs: dict[str, float] = {}
    for m in (ours, peer):
        m.eval()
    with torch.no_grad():
        a, b = ours(x), peer(x)
        errs["eval"] = _rel(a, b, x if residual else None)
        with _autocast("bfloat16"):
            a16, b16 = ours(x), peer(x)
        errs["bf16"] = _rel(a16.float(), b16.float(), x if residual else None)
    if not train:
        return _checked(errs, tol, label)
    for m in (ours, peer):
        m.train()
        _dropout_off(m)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours(xa), peer(xb)
    a.backward(grad)
    b.backward(grad)
    errs["train"] = _rel(a.detach(), b.detach(), x if residual else None)
    errs["grad"] = _rel(xa.grad, xb.grad, grad if residual else None)
    for m in (ours, peer):
        for p in m.parameters():
            p.grad = None
    return _checked(errs, tol, label)


def _checked(errs: dict[str, float], tol: float, label: str) -> dict[str, float]:
    """``errs`` if every float32 error is within ``tol`` and the bfloat16 one finite."""
    bad = {k: v for k, v in errs.items() if k != "bf16" and not (v <= tol)}
    if bad or not math.isfinite(errs["bf16"]):
        detail = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        raise MismatchError(
            f"{label}: outputs disagree after the weight copy: max |ours - peer| / max |branch| "
            f"= {detail} (float32 tolerance {tol:.0e}); row aborted for this peer"
        )
    return errs


def _build_block_case(case: Case, row: BlockRow) -> tuple[nn.Module, dict[str, float] | None, str]:
    """The module a block case times (ours, or the peer holding our weights), its check, and
    the code it runs."""
    spec = row.spec
    ours = build_ours(spec, case.ours_options)
    randomise(ours)
    if case.impl == OURS:
        return ours, None, "nonlocalnet"
    peer = find_peer(spec.kind, case.impl)
    module = peer.build(spec)
    copy_weights(ours, module, peer, spec)
    if case.corrupt:
        corrupt_weights(module)
    errs = None
    if case.check:
        label = f"{row.name}/{peer.name}"
        errs = check_agreement(ours, module, spec, case.tol, label, train="fwd_bwd" in row.steps)
    del ours
    if case.memory_only:  # nothing of ours in the baseline (a full collection costs ~0.3 s)
        gc.collect()
    return module, errs, peer.describe()


def _block_pass(module: nn.Module, x: Tensor, grad: Tensor, case: Case) -> Callable[[], None]:
    if case.step == "fwd":
        module.eval()

        def run() -> None:
            with torch.no_grad(), _autocast(case.dtype):
                module(x)

        return run
    module.train()
    x.requires_grad_(True)
    params = list(module.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with _autocast(case.dtype):
            out = module(x)
        out.backward(grad.to(out.dtype))

    return run


def _tiny_spec(spec: BlockSpec) -> BlockSpec:
    size = (2, 4, 4) if spec.dims == 3 else (8, 8) if spec.kind == "apnb" else (4,) * spec.dims
    return replace(spec, size=size)


@torch.no_grad()
def _randomise_gammas(model: nn.Module, seed: int = 0) -> int:
    """Give the NL blocks' zero-initialised BN weights values in [0.5, 1.5]; returns the count."""
    from nonlocalnet import NonLocalNd

    gen = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, NonLocalNd) and m.norm is not None:
            w = m.norm.weight
            w.copy_(0.5 + torch.rand(w.shape, generator=gen))
            n += 1
    return n


def _net_model(row: NetRow, impl: str) -> nn.Module:
    from nonlocalnet.models import create_model

    torch.manual_seed(0)
    model = create_model(row.model, impl=impl)
    _randomise_gammas(model)
    return model


def _net_pass(model: nn.Module, x: Tensor, target: Tensor, case: Case) -> Callable[[], None]:
    loss_fn = nn.CrossEntropyLoss()
    if case.step == "fwd":
        model.eval()

        def run() -> None:
            with torch.no_grad(), _autocast(case.dtype):
                model(x)

        return run
    model.train()

    def run() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(case.dtype):
            loss = loss_fn(model(x), target)
        loss.backward()

    return run


#: Tolerance of the float64 training-mode comparison of the networks.
TOL_F64 = 1e-9


def check_networks(fast: nn.Module, ref: nn.Module, x: Tensor, tol: float, label: str) -> dict:
    """Fast and reference networks agree: the same weights, the same function.

    * ``eval``: float32 eval-mode logits on the timed clip, within ``tol``;
    * ``train_f64`` / ``grad_f64``: training-mode logits and the first parameter's gradient in
      float64 (on the clip at half resolution when it is at least 128 pixels wide), within
      :data:`TOL_F64`. In float32 the training-mode gradient of a deep network with batch
      statistics amplifies rounding: changing the input by a relative 1e-7 moves the first
      layer's gradient by several percent, so float32 cannot tell a wrong function from
      rounding there; float64 can. Dropout is off for that pass (its masks would differ).

    Both networks end in float32 again (an exact round trip of their parameters).
    """
    ref.load_state_dict(fast.state_dict())
    errs: dict[str, float] = {}
    for m in (fast, ref):
        m.eval()
    with torch.no_grad():
        errs["eval"] = _rel(fast(x), ref(x), None)
    clip = (x[..., ::2, ::2] if x.shape[-1] >= 128 else x).double()
    outs, grads = [], []
    for m in (fast, ref):
        m.double().train()
        _dropout_off(m)
        m.zero_grad(set_to_none=True)
        out = m(clip)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(next(p.grad for p in m.parameters() if p.grad is not None))
        m.zero_grad(set_to_none=True)
        m.float()
    errs["train_f64"] = _rel(outs[0], outs[1], None)
    errs["grad_f64"] = _rel(grads[0], grads[1], None)
    if not (errs["eval"] <= tol and errs["train_f64"] <= TOL_F64 and errs["grad_f64"] <= TOL_F64):
        detail = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        raise MismatchError(
            f"{label}: fast and reference disagree: max |fast - ref| / max |ref| = {detail} "
            f"(tolerance {tol:.0e} in float32, {TOL_F64:.0e} in float64)"
        )
    return errs


def _net_macs(row: NetRow, impl: str) -> int:
    from nonlocalnet.models import create_model
    from nonlocalnet.models.flops import count_flops

    with torch.device("meta"):
        model = create_model(row.model, impl=impl)
    return count_flops(model, row.input_shape).macs


def _timed(run: Callable[[], None], warmup: int, repeat: int) -> dict[str, Any]:
    for _ in range(warmup):
        run()
    mem = _measure.PeakMemory("cpu")
    mem.start()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "ms": statistics.median(wall) * 1e3,
        "times_ms": [t * 1e3 for t in wall],
        "cpu_ms": statistics.median(cpu) * 1e3,
        "peak_extra_mib": mem.extra_mib(),
        "memory_method": mem.method,
    }


def _peak(run: Callable[[], None], warm: Callable[[], None]) -> dict[str, Any]:
    warm()
    mem = _measure.PeakMemory("cpu")
    mem.start()
    run()
    return {"peak_extra_mib": mem.extra_mib(), "memory_method": mem.method}


def measure_case(case: Case) -> dict[str, Any]:
    """Measure one case in this process; a failed check is returned as the row's ``error``."""
    row = rows_table(case.quick)[case.row]
    out: dict[str, Any] = {**asdict(case), "error": None, "check_errors": None}
    try:
        if isinstance(row, NetRow):
            out.update(_measure_net(case, row))
        else:
            out.update(_measure_block(case, row))
    except MismatchError as err:
        out["error"] = str(err)
        out["error_kind"] = "mismatch"
    return out


def _measure_block(case: Case, row: BlockRow) -> dict[str, Any]:
    module, errs, source = _build_block_case(case, row)
    x, grad = make_input(row.spec)
    run = _block_pass(module, x, grad, case)
    res: dict[str, Any] = {"check_errors": errs, "source": source}
    if case.memory_only:
        tx, tgrad = make_input(_tiny_spec(row.spec))
        warm = _block_pass(module, tx, tgrad, case)
        res.update(_peak(run, warm))
    else:
        res.update(_timed(run, case.warmup, case.repeat))
    return res


def _measure_net(case: Case, row: NetRow) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(row.input_shape, generator=gen)
    res: dict[str, Any] = {"check_errors": None}
    model = _net_model(row, case.impl)
    if case.check:
        other = _net_model(row, "fast" if case.impl == "reference" else "reference")
        pair = (other, model) if case.impl == "reference" else (model, other)
        res["check_errors"] = check_networks(*pair, x, case.tol, row.name)
        del other, pair
        gc.collect()  # the second network's memory, before this one is timed
    classes = model.fc.out_features if hasattr(model, "fc") else 10
    target = torch.randint(0, classes, (row.input_shape[0],), generator=gen)
    run = _net_pass(model, x, target, case)
    if case.memory_only:
        tiny = torch.randn(row.input_shape[0], *row.input_shape[1:3], 64, 64, generator=gen)
        res.update(_peak(run, _net_pass(model, tiny, target, case)))
    else:
        res.update(_timed(run, case.warmup, case.repeat))
        res["macs"] = _net_macs(row, case.impl)
    return res


def interleave_case(case: Case, rounds: int) -> dict[str, Any]:
    """Ours and one peer (``case.impl``) in this process, passes alternating, ``rounds`` each.

    The passes alternate in order (ours first in even rounds, the peer first in odd ones), so
    both see the same machine load: on a shared machine the time ratio of one run is far
    steadier than the ratio of two runs. Returns both medians, their ratio, and the ratio of
    the fastest passes. Peak memory is not measured (both live in the process).
    """
    row = rows_table(case.quick)[case.row]
    if not isinstance(row, BlockRow):
        raise ValueError(f"interleave takes block rows, got {case.row!r}")
    peer_module, errs, source = _build_block_case(case, row)
    ours = build_ours(row.spec, case.ours_options)
    randomise(ours)
    x, grad = make_input(row.spec)
    runs = {
        OURS: _block_pass(ours, x.clone(), grad, case),
        case.impl: _block_pass(peer_module, x.clone(), grad, case),
    }
    for run in runs.values():
        for _ in range(case.warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(rounds):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    ours_ms = statistics.median(times[OURS]) * 1e3
    peer_ms = statistics.median(times[case.impl]) * 1e3
    return {
        **asdict(case),
        "error": None,
        "check_errors": errs,
        "source": source,
        "ours_ms": ours_ms,
        "peer_ms": peer_ms,
        "time_ratio": peer_ms / ours_ms,
        "min_ratio": min(times[case.impl]) / min(times[OURS]),
        "rounds": rounds,
    }


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: ``{"cases": [...]}`` in, ``{"results": [...]}`` out, in order; with
    ``"interleave": rounds``, each case is a peer run against ours (:func:`interleave_case`).

    After a failed check, the remaining cases of the same (row, implementation) are skipped.
    """
    if spec.get("interleave"):
        torch.set_num_threads(spec["cases"][0]["threads"])
        out = []
        for c in spec["cases"]:
            case = Case(**c)
            try:
                out.append(interleave_case(case, spec["interleave"]))
            except MismatchError as err:
                out.append({**asdict(case), "error": str(err), "error_kind": "mismatch"})
        return {"results": out, "threads": torch.get_num_threads()}
    cases = [Case(**c) for c in spec["cases"]]
    if cases:
        torch.set_num_threads(cases[0].threads)
    failed: dict[tuple[str, str], str] = {}
    results = []
    for case in cases:
        if case.key in failed:
            results.append({**asdict(case), "error": failed[case.key], "error_kind": "skipped"})
            continue
        res = measure_case(case)
        if res["error"] is not None:
            failed[case.key] = f"skipped: {res['error']}"
        results.append(res)
    return {"results": results, "threads": torch.get_num_threads()}


# -- orchestration ----------------------------------------------------------------------------


def _options_key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def plan_row(row: Row, args: argparse.Namespace) -> list[Case]:
    """Every case of a row, ours first; each peer's first case carries its check."""
    common = {
        "quick": args.quick,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "tol": args.tol,
    }
    if isinstance(row, NetRow):
        modes = [(d, "fwd_bwd") for d in args.dtype if d in row.dtypes and "fwd_bwd" in args.step]
        cases = []
        for impl in NET_IMPLS:
            for i, (dtype, step) in enumerate(modes):
                cases.append(
                    Case(
                        row.name, impl, dtype, step, check=impl == "reference" and i == 0, **common
                    )
                )
        return cases
    modes = [(d, s) for d in args.dtype for s in args.step if s in row.steps]
    # the float32 training pass first: the check runs in it
    modes.sort(key=lambda m: m != ("float32", "fwd_bwd"))
    peers = [p for p in peers_for(row.spec) if not args.peers or p.name in args.peers]
    configs: dict[str, dict[str, Any]] = {}
    for p in peers:
        configs.setdefault(_options_key(p.ours_options(row.spec)), p.ours_options(row.spec))
    cases = [
        Case(row.name, OURS, dtype, step, ours_options=options, **common)
        for options in configs.values()
        for dtype, step in modes
    ]
    for p in peers:
        for i, (dtype, step) in enumerate(modes):
            cases.append(
                Case(
                    row.name,
                    p.name,
                    dtype,
                    step,
                    ours_options=p.ours_options(row.spec),
                    check=i == 0,
                    corrupt=p.name in args.corrupt,
                    **common,
                )
            )
    return cases


def _run_batch(
    cases: list[Case],
    timeout: float,
    env: dict[str, str] | None = None,
    interleave: int = 0,
) -> list[dict]:
    """Run cases in one fresh process; a crashed process fails each of its cases."""
    job: dict[str, Any] = {"cases": [asdict(c) for c in cases]}
    if interleave:
        job["interleave"] = interleave
    try:
        data = _measure.run_worker(__file__, job, timeout=timeout * len(cases), env=env)
    except _measure.WorkerError as err:
        log.error("worker failed (%s):\n%s", err, err.stderr)
        return [
            {**asdict(c), "error": f"process failed: {err}", "error_kind": "crash"} for c in cases
        ]
    return data["results"]


GROUPS = ("case", "row", "all")


def default_group(args: argparse.Namespace) -> str:
    """``--group``, else one process per case (``"all"`` in one process for ``--quick``)."""
    return args.group or ("all" if args.quick else "case")


def _batches(cases: list[Case], group: str) -> list[list[Case]]:
    """The cases of each process: one each, one process per row, or all in one."""
    if group == "case":
        return [[c] for c in cases]
    if group == "all":
        return [cases] if cases else []
    by_row: dict[str, list[Case]] = {}
    for c in cases:
        by_row.setdefault(c.row, []).append(c)
    return list(by_row.values())


def _memory_pass(case: Case, res: dict[str, Any], timeout: float) -> None:
    """Replace the timing process's peak by one pass in a fresh process under MEMORY_ENV."""
    mem = _run_batch([replace(case, memory_only=True, check=False)], timeout, _measure.MEMORY_ENV)
    res["peak_extra_mib_timing"] = res["peak_extra_mib"]
    if mem[0].get("error"):
        res["memory_error"] = mem[0]["error"]
        return
    res["peak_extra_mib"] = mem[0]["peak_extra_mib"]
    res["memory_method"] = (
        f"{mem[0]['memory_method']}, separate process, MALLOC_MMAP_THRESHOLD_=65536"
    )


def run_rows(rows: list[Row], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every case of ``rows``; returns the results in plan order.

    After a failed check (or a failed case) of a peer, its remaining cases in the row are
    skipped.
    """
    group = default_group(args)
    memory_pass = group == "case" and not args.no_memory_pass
    cases = [c for row in rows for c in plan_row(row, args)]
    log.info("%d cases in %d rows, processes per %s", len(cases), len(rows), group)
    results: list[dict[str, Any]] = []
    failed: dict[tuple[str, str], str] = {}
    for batch in _batches(cases, group):
        todo = [c for c in batch if c.key not in failed]
        measured = _run_batch(todo, args.timeout) if todo else []
        done = {id(c): r for c, r in zip(todo, measured, strict=True)}
        for case in batch:
            res = done.get(id(case))
            if res is None:
                res = {**asdict(case), "error": failed[case.key], "error_kind": "skipped"}
            elif res.get("error"):
                failed.setdefault(case.key, f"skipped: {res['error']}")
                log.error("%s/%s: %s", case.row, case.impl, res["error"])
            else:
                if memory_pass:
                    _memory_pass(case, res, args.timeout)
                log.info(
                    "%s %s %s %s: %.1f ms, %.1f MiB",
                    case.row,
                    case.impl,
                    case.dtype,
                    case.step,
                    res["ms"],
                    res["peak_extra_mib"],
                )
            results.append(res)
        if args.json is not None:  # partial results survive an interrupted run
            _write_json(args, results, complete=False)
    return results


def run_interleaved(rows: list[Row], args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--interleave``: one fresh process per (row, peer, dtype, step), ours and the peer
    alternating in it (:func:`interleave_case`); network rows are left out."""
    results = []
    for row in rows:
        if not isinstance(row, BlockRow):
            continue
        for case in plan_row(row, args):
            if case.impl == OURS:
                continue
            case = replace(case, check=True, warmup=max(case.warmup, 1))
            res = _run_batch([case], args.timeout * 2, interleave=args.interleave)[0]
            if res.get("error"):
                log.error("%s/%s: %s", case.row, case.impl, res["error"])
            else:
                log.info(
                    "%s %s %s %s: ours %.1f ms, peer %.1f ms, ratio %.3f (fastest %.3f)",
                    case.row,
                    case.impl,
                    case.dtype,
                    case.step,
                    res["ours_ms"],
                    res["peer_ms"],
                    res["time_ratio"],
                    res["min_ratio"],
                )
            results.append(res)
    return results


def format_interleaved(results: list[dict[str, Any]]) -> str:
    """Markdown table of an ``--interleave`` run."""
    head = "| row | peer | mode | ours ms | peer ms | time ratio (medians) | ratio of fastest |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        mode = f"{r['dtype']} {r['step'].replace('_', '+')}"
        if r.get("error"):
            lines.append(f"| {r['row']} | {r['impl']} | {mode} | aborted: {r['error']} |")
            continue
        lines.append(
            f"| {r['row']} | {r['impl']} | {mode} | {r['ours_ms']:.1f} | {r['peer_ms']:.1f} | "
            f"{_fmt_ratio(r['time_ratio'])} | {_fmt_ratio(r['min_ratio'])} |"
        )
    return "\n".join(lines)


# -- tables -----------------------------------------------------------------------------------


def _ratio(peer: float, ours: float) -> float | None:
    return peer / ours if ours > 0 else None


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    mark = "" if r >= 1.0 else " (loses)"
    digits = 3 if abs(r - 1.0) < 0.005 else 2  # 0.998× rather than a losing 1.00×
    return f"{r:.{digits}f}×{mark}"


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparison per peer case: its time and memory over ours (same row, options, mode)."""
    ours = {
        (r["row"], _options_key(r["ours_options"]), r["dtype"], r["step"]): r
        for r in results
        if r["impl"] == OURS and not r.get("error")
    }
    nets = {(r["row"], r["dtype"], r["step"]): r for r in results if r["impl"] == "fast"}
    out = []
    for r in results:
        if r["impl"] in (OURS, "fast"):
            continue
        if r["impl"] == "reference":
            base = nets.get((r["row"], r["dtype"], r["step"]))
        else:
            base = ours.get((r["row"], _options_key(r["ours_options"]), r["dtype"], r["step"]))
        c = {
            "row": r["row"],
            "peer": r["impl"],
            "dtype": r["dtype"],
            "step": r["step"],
            "error": r.get("error"),
        }
        if base is not None and base.get("error"):
            c["error"] = c["error"] or f"ours failed: {base['error']}"
        if not c["error"] and base is not None:
            c.update(
                ours_ms=base["ms"],
                peer_ms=r["ms"],
                time_ratio=_ratio(r["ms"], base["ms"]),
                ours_mib=base["peak_extra_mib"],
                peer_mib=r["peak_extra_mib"],
                memory_ratio=_ratio(r["peak_extra_mib"], base["peak_extra_mib"]),
            )
            if "macs" in r and "macs" in base:
                c["mac_ratio"] = r["macs"] / base["macs"]
                c["ours_macs"], c["peer_macs"] = base["macs"], r["macs"]
                c["time_per_mac_ratio"] = c["time_ratio"] / c["mac_ratio"]
        elif not c["error"]:
            c["error"] = "no matching row of ours"
        out.append(c)
    return out


def format_report(results: list[dict[str, Any]], quick: bool) -> str:
    """Markdown: the peers, then one table per row, then the summary."""
    table = rows_table(quick)
    lines = ["Peers:"]
    for kind, peers in PEERS.items():
        for p in peers:
            lines.append(f"- {kind}/{p.name}: {p.describe()}. {p.notes}")
    comps = compare(results)
    by_row: dict[str, list[dict[str, Any]]] = {}
    for c in comps:
        by_row.setdefault(c["row"], []).append(c)
    checks = {(r["row"], r["impl"]): r["check_errors"] for r in results if r.get("check_errors")}
    for name, cs in by_row.items():
        row = table[name]
        lines += ["", f"## {name}: {row.title}"]
        if isinstance(row, BlockRow):
            s = row.spec
            width = f"r = {s.ratio:g}" if s.kind == "gc" else f"C' = {s.inner_channels}"
            lines.append(
                f"C = {s.channels}, {width}, batch {s.batch}, input {'×'.join(map(str, s.size))}"
            )
        agree = [
            f"{peer} " + " / ".join(f"{k} {v:.1e}" for k, v in e.items())
            for (r, peer), e in checks.items()
            if r == name
        ]
        if agree:
            lines.append("agreement, max |diff| / max |branch|: " + "; ".join(agree))
        net = isinstance(row, NetRow)
        head = (
            "| peer | mode | ours ms | peer ms | time ratio | ours MiB | peer MiB | memory ratio |"
        )
        if net:
            head = (
                "| blocks | mode | fast ms | reference ms | time ratio | fast MiB "
                "| reference MiB | memory ratio | GMACs fast | GMACs ref | time ÷ MAC ratio |"
            )
        lines += ["", head, head_rule(head)]
        for c in cs:
            mode = f"{c['dtype']} {c['step'].replace('_', '+')}"
            if c.get("error"):
                lines.append(f"| {c['peer']} | {mode} | aborted: {c['error']} |")
                continue
            cells = [
                c["peer"],
                mode,
                f"{c['ours_ms']:.1f}",
                f"{c['peer_ms']:.1f}",
                _fmt_ratio(c["time_ratio"]),
                f"{c['ours_mib']:.1f}",
                f"{c['peer_mib']:.1f}",
                _fmt_ratio(c["memory_ratio"]),
            ]
            if net:
                cells += [
                    f"{c['ours_macs'] / 1e9:.2f}",
                    f"{c['peer_macs'] / 1e9:.2f}",
                    f"{c['time_per_mac_ratio']:.2f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", summary(comps)]
    return "\n".join(lines)


def head_rule(head: str) -> str:
    """The markdown rule under a table header: text columns left, numbers right."""
    n = head.count("|") - 1
    return "|---|---|" + "---:|" * (n - 2)


def summary(comps: list[dict[str, Any]]) -> str:
    """How many comparisons ours wins (ratio ≥ 1), and the lowest ratios."""
    done = [c for c in comps if not c.get("error")]
    aborted = [c for c in comps if c.get("error")]
    if not done:
        return f"No comparison completed ({len(aborted)} aborted)."
    parts = []
    for key, label in (("time_ratio", "time"), ("memory_ratio", "peak memory")):
        vals = [c for c in done if c.get(key) is not None]
        if not vals:
            continue
        wins = sum(c[key] >= 1.0 for c in vals)
        low = min(vals, key=lambda c: c[key])
        parts.append(
            f"{label}: ours wins {wins}/{len(vals)} (lowest {low[key]:.2f}× vs {low['peer']} on "
            f"{low['row']}, {low['dtype']} {low['step']})"
        )
    text = "Summary: " + "; ".join(parts)
    if aborted:
        text += f"; {len(aborted)} comparisons aborted"
    return text


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "quick": args.quick,
        "group": default_group(args),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "peers": {f"{k}/{p.name}": p.describe() for k, ps in PEERS.items() for p in ps},
    }


def _write_json(args: argparse.Namespace, results: list[dict[str, Any]], complete: bool) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": _meta(args),
        "complete": complete,
        "results": results,
        "comparisons": compare(results),
    }
    args.json.write_text(json.dumps(data, indent=2))


def _csv(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    """Options of this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--rows", action="append", help="only these rows (repeatable, or a,b)")
    parser.add_argument("--peers", action="append", help="only these peers (repeatable, or a,b)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="default: both")
    parser.add_argument("--step", action="append", choices=STEPS, help="default: both")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case (2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up passes (1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes, median (3)")
    parser.add_argument("--tol", type=float, default=TOL, help="float32 agreement tolerance")
    parser.add_argument(
        "--group",
        choices=GROUPS,
        default=None,
        help="processes: one per case (default), one per row, or one (default of --quick)",
    )
    parser.add_argument(
        "--no-memory-pass",
        action="store_true",
        help="take peak memory in the timing process instead of a separate one",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="ours and each peer in one process, passes alternating ROUNDS times (time only)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    parser.add_argument("--list", action="store_true", help="list rows and peers, then exit")
    # a deliberately wrong weight copy for these peers (tests of the agreement check)
    parser.add_argument("--corrupt", action="append", default=None, help=argparse.SUPPRESS)
    parser.add_argument(_measure.WORKER_FLAG, default=None, help=argparse.SUPPRESS)
    return parser


def _list(quick: bool) -> str:
    lines = []
    for row in rows_table(quick).values():
        if isinstance(row, NetRow):
            lines.append(f"{row.name}: {row.title} (fast vs reference)")
        else:
            names = ", ".join(p.name for p in peers_for(row.spec))
            lines.append(f"{row.name}: {row.title}; peers: {names}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen rows, print the report; 1 when a check or a case failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _measure.worker_main(_worker, args.worker)
    for name in ("threads", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.list:
        print(_list(args.quick))
        return 0
    table = rows_table(args.quick)
    names = _csv(args.rows) or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; expected some of {list(table)}")
    args.peers = _csv(args.peers)
    known = {p.name for ps in PEERS.values() for p in ps}
    if set(args.peers) - known:
        parser.error(
            f"unknown peers {sorted(set(args.peers) - known)}; expected some of {sorted(known)}"
        )
    args.corrupt = _csv(args.corrupt)
    args.dtype = args.dtype or list(DTYPES)
    args.step = args.step or list(STEPS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.interleave:
        results = run_interleaved([table[n] for n in names], args)
        print(format_interleaved(results))
        return 1 if any(r.get("error") for r in results) else 0
    results = run_rows([table[n] for n in names], args)
    if args.json is not None:
        _write_json(args, results, complete=True)
    print(format_report(results, args.quick))
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
