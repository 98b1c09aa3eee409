"""Fuzz campaign of the blocks: random shapes, options, dtypes, layouts and faults.

For NL, SNL, GC, SE, APNB and AFNB, each case draws every constructor option at random, an input
of random shape (odd and size-1 dimensions included), dtype (float64, float32, bfloat16,
float16, bfloat16 autocast), memory layout (contiguous, channels_last, strided views) and
training mode, and then one of:

* nothing wrong: the fast path must equal the reference (float64 and float32: against the
  reference in the same dtype; half types: against the float64 reference) within the dtype's
  tolerance, and a fresh zero-initialised block must be the identity where the paper says so;
* one fault, in the constructor arguments or in the input: the block must raise a ValueError or
  TypeError whose message is one line, names the block, and holds none of torch's own messages
  (``Expected all tensors``, ``mat1 and mat2``, ...);
* a NaN or an inf in the input: the output must not be finite everywhere (or a clear error).

The draws come from one fixed seed, so a failure names a case that can be rerun alone
(``case_for(family, index)``). ~2000 cases in all; marked slow (``make test-slow``).
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from nonlocalnet import (
    AFNB,
    APNB,
    GlobalContext,
    NonLocal1d,
    NonLocal2d,
    NonLocal3d,
    NonLocalNd,
    SimplifiedNonLocal,
    SqueezeExcite,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEED = 20240611
#: cases per block family
CASES = {"nl": 560, "snl": 220, "gc": 330, "se": 190, "apnb": 380, "afnb": 320}
#: relative error (norm) of the fast path against the reference
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
    "autocast": 5e-2,
}
#: torch's own messages, which must never reach the user through a block
TORCH_INTERNALS = (
    "Expected all tensors",
    "mat1 and mat2",
    "should be the same",
    "Input type",
    "expected scalar type",
    "Given input size",
    "Calculated output size",
    "Sizes of tensors must match",
    "must match the size",
    "shape '[",
    "size mismatch",
    "Expected more than 1 value per channel",
    "Proxy",
    "out of bounds",
    "not implemented for",
)
SIZES = (1, 1, 2, 3, 4, 5, 7, 9)
DTYPES = (torch.float64, torch.float32, torch.float32, torch.bfloat16, torch.float16, "autocast")
INPUT_FAULTS = (
    "channels",
    "rank",
    "int_dtype",
    "not_tensor",
    "empty",
    "param_dtype",
    "single_value",
)


@dataclass
class Case:
    """One draw: how to build the block, what to feed it and what must happen."""

    family: str
    index: int
    make: Callable[[], nn.Module]
    kwargs: dict[str, Any]
    owner: str
    shapes: list[tuple[int, ...]]
    dtype: Any = torch.float32
    layout: str = "contiguous"
    training: bool = False
    randomize: bool = True
    fault: str | None = None
    nonfinite: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"{self.family}#{self.index} {self.owner}({self.kwargs}) shapes={self.shapes} "
            f"dtype={self.dtype} layout={self.layout} training={self.training} "
            f"fault={self.fault} nonfinite={self.nonfinite}"
        )


# -- drawing cases -------------------------------------------------------------------------------


def _spatial(rng: random.Random, dims: int, max_positions: int = 200) -> tuple[int, ...]:
    while True:
        size = tuple(rng.choice(SIZES) for _ in range(dims))
        if math.prod(size) <= max_positions:
            return size


def _nl_case(rng: random.Random) -> tuple[Callable, dict, str, int, int, dict]:
    dims = rng.choice((1, 2, 3))
    channels = rng.randint(1, 10)
    pairwise = rng.choice(("gaussian", "embedded_gaussian", "dot_product", "concatenation"))
    kw: dict[str, Any] = {
        "inner_channels": rng.choice((None, 1, 2, 3, 5)),
        "pairwise": pairwise,
        "use_scale": rng.choice((None, False, True) if "gaussian" in pairwise else (None, False)),
        "sub_sample": rng.random() < 0.6,
        "sub_sample_position": rng.choice(("after", "before")),
        "sub_sample_rounding": rng.choice(("ceil", "floor")),
        "norm": rng.choice((True, True, False, "group")),
        "zero_init": rng.random() < 0.8,
        "impl": "fast",
    }
    if dims == 3:
        kw["extent"] = rng.choice(("spacetime", "space", "time"))
    how = rng.choice(("nd", "fixed"))
    cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}[dims]
    owner = "NonLocalNd" if how == "nd" else cls.__name__

    def make(kw=kw, dims=dims, how=how, cls=cls, channels=channels):
        kwargs = dict(kw)
        if kwargs.get("norm") == "group":
            kwargs["norm"] = lambda c: nn.GroupNorm(1, c)
        if how == "nd":
            return NonLocalNd(channels, dims=dims, **kwargs)
        return cls(channels, **kwargs)

    notes = {
        "bn": kw["norm"] is True,
        "group": kw["norm"] == "group",
        "floor_sub": kw["sub_sample"] and kw["sub_sample_rounding"] == "floor",
    }
    return make, kw, owner, dims, channels, notes


_NL_BAD = [
    ({"pairwise": "cosine"}, "pairwise"),
    ({"impl": "flash"}, "impl"),
    ({"inner_channels": 0}, "inner_channels"),
    ({"sub_sample": "yes"}, "sub_sample"),
    ({"sub_sample_position": "middle"}, "sub_sample_position"),
    ({"sub_sample_rounding": "round"}, "sub_sample_rounding"),
    ({"pairwise": "dot_product", "use_scale": True}, "use_scale"),
    ({"extent": "frames"}, "extent"),
    ({"norm": "batch"}, "norm"),
    ({"use_scale": 1}, "use_scale"),
]


def _snl_case(rng: random.Random):
    dims = rng.choice((1, 2, 3))
    channels = rng.randint(1, 10)
    kw = {"zero_init": rng.random() < 0.8, "impl": "fast"}

    def make(kw=kw, dims=dims, channels=channels):
        kw = dict(kw)
        return SimplifiedNonLocal(channels, dims=kw.pop("dims", dims), **kw)

    return make, kw, "SimplifiedNonLocal", dims, channels, {"bn": False}


_SNL_BAD = [({"impl": "x"}, "impl"), ({"zero_init": None}, "zero_init"), ({"dims": 0}, "dims")]


def _gc_case(rng: random.Random):
    dims = rng.choice((1, 2, 3))
    channels = rng.randint(1, 16)
    ratio = rng.choice((1 / 16, 1 / 4, 1 / 2, 1.0, 0.3))
    if int(channels * ratio) < 1:
        ratio = 1.0
    kw = {
        "ratio": ratio,
        "pooling": rng.choice(("att", "avg")),
        "fusion": rng.choice((("add",), ("mul",), ("mul", "add"), ("add", "mul"), "add", "mul")),
        "layer_norm": rng.random() < 0.7,
        "zero_init": rng.random() < 0.8,
        "impl": "fast",
        "norm_eps": rng.choice((1e-5, 1e-6)),
    }

    def make(kw=kw, dims=dims, channels=channels):
        kw = dict(kw)
        return GlobalContext(channels, dims=kw.pop("dims", dims), **kw)

    return make, kw, "GlobalContext", dims, channels, {"bn": False}


_GC_BAD = [
    ({"ratio": 0}, "ratio"),
    ({"ratio": 2}, "ratio"),
    ({"pooling": "max"}, "pooling"),
    ({"fusion": ()}, "fusion"),
    ({"fusion": ("add", "add")}, "fusion"),
    ({"fusion": ("sum",)}, "fusion"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"layer_norm": "yes"}, "layer_norm"),
    ({"impl": "slow"}, "impl"),
]


def _se_case(rng: random.Random):
    dims = rng.choice((1, 2, 3))
    channels = rng.randint(1, 16)
    ratio = rng.choice((1 / 16, 1 / 4, 1 / 2, 1.0))
    if int(channels * ratio) < 1:
        ratio = 1.0
    kw = {"ratio": ratio}

    def make(kw=kw, dims=dims, channels=channels):
        kw = dict(kw)
        return SqueezeExcite(channels, dims=kw.pop("dims", dims), **kw)

    return make, kw, "SqueezeExcite", dims, channels, {"bn": False}


_SE_BAD = [({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"dims": 4}, "dims")]


def _bins(rng: random.Random) -> tuple[int, ...]:
    return rng.choice(((1, 3, 6, 8), (1, 2), (1,), (2, 3), (1, 2, 4)))


def _apnb_case(rng: random.Random):
    dims = rng.choice((1, 2, 3))
    channels = rng.randint(1, 10)
    kw = {
        "out_channels": rng.choice((None, 1, 3, 6)),
        "key_channels": rng.randint(1, 6),
        "value_channels": rng.randint(1, 6),
        "bins": _bins(rng),
        "share_query_key": rng.random() < 0.6,
        "dropout": rng.choice((0.0, 0.05, 0.3)),
        "zero_init": rng.random() < 0.8,
        "impl": "fast",
        "pool_time": rng.random() < 0.5,
    }

    def make(kw=kw, dims=dims, channels=channels):
        kw = dict(kw)
        return APNB(channels, dims=kw.pop("dims", dims), **kw)

    return make, kw, "APNB", dims, channels, {"bn": True}


_APNB_BAD = [
    ({"key_channels": 0}, "key_channels"),
    ({"dropout": 1.0}, "dropout"),
    ({"bins": ()}, "bins"),
    ({"bins": (0, 2)}, "bin"),
    ({"share_query_key": "no"}, "share_query_key"),
    ({"pool_time": 1}, "pool_time"),
    ({"impl": "flash"}, "impl"),
]


def _afnb_case(rng: random.Random):
    dims = rng.choice((1, 2, 3))
    low, high = rng.randint(1, 8), rng.randint(1, 8)
    kw = {
        "out_channels": rng.randint(1, 6),
        "key_channels": rng.randint(1, 6),
        "value_channels": rng.randint(1, 6),
        "bins": _bins(rng),
        "dropout": rng.choice((0.0, 0.05, 0.3)),
        "zero_init": rng.random() < 0.8,
        "impl": "fast",
        "pool_time": rng.random() < 0.5,
    }

    def make(kw=kw, dims=dims, low=low, high=high):
        kw = dict(kw)
        high = kw.pop("high_channels", high)
        return AFNB(low, high, dims=kw.pop("dims", dims), **kw)

    return make, kw, "AFNB", dims, (low, high), {"bn": True}


_AFNB_BAD = [
    ({"high_channels": 0}, "high_channels"),
    ({"out_channels": 0}, "out_channels"),
    ({"dropout": -0.1}, "dropout"),
    ({"bins": 8}, "bins"),
    ({"impl": "x"}, "impl"),
]

FAMILIES = {
    "nl": (_nl_case, _NL_BAD),
    "snl": (_snl_case, _SNL_BAD),
    "gc": (_gc_case, _GC_BAD),
    "se": (_se_case, _SE_BAD),
    "apnb": (_apnb_case, _APNB_BAD),
    "afnb": (_afnb_case, _AFNB_BAD),
}


def case_for(family: str, index: int) -> Case:
    """Case ``index`` of ``family``, the same at every run."""
    rng = random.Random(f"{SEED}-{family}-{index}")
    draw, bad = FAMILIES[family]
    make, kw, owner, dims, channels, notes = draw(rng)
    roll = rng.random()
    fault = None
    if roll < 0.1:  # a bad constructor argument
        extra, what = rng.choice(bad)
        kw = {**kw, **extra}
        make = functools.partial(make, kw=kw)
        fault = f"ctor:{what}"
    elif roll < 0.3:
        fault = rng.choice(INPUT_FAULTS)
        if fault == "single_value" and not notes["bn"]:
            fault = "channels"
    nonfinite = None
    if fault is None and rng.random() < 0.1:
        nonfinite = rng.choice(("nan", "inf", "-inf"))
    if isinstance(channels, tuple):  # AFNB: low and high maps
        shapes = [
            (rng.randint(1, 3), channels[0], *_spatial(rng, dims, 120)),
            None,
        ]
        shapes[1] = (shapes[0][0], channels[1], *_spatial(rng, dims, 120))
    else:
        shapes = [(rng.randint(1, 3), channels, *_spatial(rng, dims))]
    if notes.get("floor_sub") and fault is None:
        # floor rounding needs 2 positions on every pooled axis; a size-1 axis is a fault
        pooled = {1: (0,), 2: (0, 1), 3: (1, 2)}[dims]
        b, c, *s = shapes[0]
        if any(s[d] < 2 for d in pooled):
            if rng.random() < 0.5:
                fault = "floor_size"
            else:
                s = [max(n, 2) if d in pooled else n for d, n in enumerate(s)]
                shapes[0] = (b, c, *s)
    training = rng.random() < 0.4
    if fault == "single_value":
        training = True
        shapes = [(1, s[1], *([1] * dims)) for s in shapes]
    elif ((notes["bn"] and training) or notes.get("group")) and any(
        math.prod(s) // s[1] < 2 for s in shapes
    ):
        # a training BatchNorm needs two values per channel: a batch of two
        shapes = [(2, *s[1:]) for s in shapes]
    return Case(
        family=family,
        index=index,
        make=make,
        kwargs=kw,
        owner=owner,
        shapes=shapes,
        dtype=rng.choice(DTYPES),
        layout=rng.choice(("contiguous", "contiguous", "channels_last", "transposed", "strided")),
        training=training,
        randomize=rng.random() < 0.85,
        fault=fault,
        nonfinite=nonfinite,
        notes=notes,
    )


# -- running cases -------------------------------------------------------------------------------


def _randomize(block: nn.Module, gen: torch.Generator) -> None:
    """Weights of unit gain everywhere (zero-initialised ones too), BN statistics perturbed."""
    with torch.no_grad():
        for p in block.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "transposed" and x.dim() >= 4:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, strided
    if layout == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]  # a non-contiguous view
    return x


def _inputs(case: Case, gen: torch.Generator, dtype: torch.dtype) -> list[Any]:
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in case.shapes]
    if case.nonfinite is not None:
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[case.nonfinite]
        t = xs[-1]
        idx = tuple(int(torch.randint(n, (1,), generator=gen)) for n in t.shape)
        t[idx] = value
    xs = [_layout(x.to(dtype), case.layout) for x in xs]
    return xs


def _fault_inputs(case: Case, xs: list[torch.Tensor], block: nn.Module) -> list[Any]:
    which = len(xs) - 1 if len(xs) == 1 else int(case.index % 2)
    x = xs[which]
    if case.fault == "channels":
        bad = x[:, :-1] if x.shape[1] > 1 else torch.cat([x, x], 1)
    elif case.fault == "rank":
        bad = x[0] if case.index % 2 else x[None]
    elif case.fault == "int_dtype":
        bad = (x * 3).long() if case.index % 2 else (x * 3).int()
    elif case.fault == "not_tensor":
        bad = x.tolist() if case.index % 2 else x.numpy() if x.dtype != torch.bfloat16 else 3.0
    elif case.fault == "empty":
        dim = case.index % x.dim()
        if dim == 1:
            dim = 0
        bad = x.narrow(dim, 0, 0)
    elif case.fault == "param_dtype":
        other = torch.float32 if x.dtype == torch.float64 else torch.float64
        bad = x.to(other)
    else:  # single_value, floor_size: the input as drawn is the fault
        bad = x
    out = list(xs)
    out[which] = bad
    return out


def _check_error(case: Case, err: BaseException) -> str | None:
    """A problem with an error the block raised, or None when it is a clear one."""
    msg = str(err)
    if not isinstance(err, (ValueError, TypeError)):
        return f"raised {type(err).__name__}: {msg}"
    if "\n" in msg.strip():
        return f"multi-line message: {msg!r}"
    if case.owner not in msg and not msg.startswith(("NonLocal", "PyramidPooling")):
        return f"message does not name {case.owner}: {msg!r}"
    for s in TORCH_INTERNALS:
        if s in msg:
            return f"torch internals in the message ({s!r}): {msg!r}"
    return None


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    den = float(want.norm())
    return float((got - want).norm()) / max(den, 1e-300)


def _run(block: nn.Module, xs: list[Any], seed: int, autocast: bool) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout masks for every path
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return block(*xs)


def run_case(case: Case) -> tuple[str, str | None]:
    """``(outcome, problem)``: outcome names what was checked; problem is None when all held."""
    gen = torch.Generator().manual_seed(case.index * 7919 + len(case.family))
    autocast = case.dtype == "autocast"
    dtype = torch.float32 if autocast else case.dtype
    try:
        block = case.make()
    except Exception as err:
        if case.fault is None or not case.fault.startswith("ctor:"):
            return "ctor", f"valid options raised {type(err).__name__}: {err}"
        return "ctor_error", _check_error(case, err)
    if case.fault is not None and case.fault.startswith("ctor:"):
        return "ctor", f"bad option {case.fault[5:]} accepted: {case.kwargs}"
    if case.randomize:
        _randomize(block, gen)
    block = block.to(dtype).train(case.training)
    fresh_identity = not case.randomize and case.owner not in ("SqueezeExcite", "APNB", "AFNB")
    xs = _inputs(case, gen, dtype)
    if case.fault is not None:
        bad = _fault_inputs(case, xs, block)
        try:
            _run(block, bad, 0, autocast and case.fault != "param_dtype")
        except Exception as err:
            return "input_error", _check_error(case, err)
        return "input_error", f"fault {case.fault} not reported"
    try:
        got = _run(block, xs, 1, autocast)
    except Exception as err:
        problem = _check_error(case, err)
        return "forward", f"valid input raised: {problem or err}"
    if got.dtype not in (dtype, torch.bfloat16, torch.float32):
        return "forward", f"output dtype {got.dtype} for {dtype} input"
    if case.nonfinite is not None:
        if bool(torch.isfinite(got).all()):
            return "nonfinite", f"a {case.nonfinite} in the input gave a finite output"
        return "nonfinite", None
    if not bool(torch.isfinite(got).all()):
        return "forward", "finite input, non-finite output"
    if fresh_identity and getattr(block, "zero_init", False):
        identity = case.owner != "GlobalContext" or "mul" not in block.fusion
        if identity and not torch.equal(got, xs[0]):
            return (
                "identity",
                f"fresh block is not the identity (max {float((got - xs[0]).abs().max())})",
            )
    # fast against reference
    ref = copy.deepcopy(block)
    if hasattr(ref, "impl"):
        ref.impl = "reference"
    tol = TOLERANCE["autocast" if autocast else dtype]
    if dtype in (torch.float64, torch.float32) and not autocast:
        err = _rel(got, _run(ref, xs, 1, False))
        if err > tol:
            return "numerics", f"fast vs reference: relative error {err:.3g} > {tol:g}"
    else:
        # half types and autocast: both paths against the float64 reference of the same
        # (rounded) weights and inputs. Rounding amplified by an ill-conditioned norm (few
        # values, nearly constant) or by cancellation in x + residual hits both paths alike,
        # so the fast path must be within the tolerance or no worse than the reference.
        want = _run(copy.deepcopy(ref).double(), [x.double() for x in xs], 1, False)
        err = _rel(got, want)
        err_ref = _rel(_run(ref, xs, 1, autocast), want)
        if err > tol and err > 2 * err_ref:
            return "numerics", (
                f"fast vs float64 reference: relative error {err:.3g} > {tol:g} and > twice "
                f"the {dtype} reference's {err_ref:.3g}"
            )
        if err_ref > tol and err_ref > 2 * err:
            return "numerics", (
                f"reference vs float64: relative error {err_ref:.3g} > {tol:g} and > twice "
                f"the fast path's {err:.3g}"
            )
    if hasattr(block, "attention_map") and case.index % 3 == 0:
        problem = _map_holds(block, xs, case)
        if problem:
            return "attention_map", problem
    if dtype == torch.float64 and case.index % 2 == 0 and hasattr(ref, "impl"):
        # and the gradients, for half of the float64 cases
        problem = _gradients_agree(block, ref, xs)
        if problem:
            return "gradients", problem
    return "numerics", None


def _map_holds(block: nn.Module, xs: list[torch.Tensor], case: Case) -> str | None:
    """attention_map: finite, (at least) float32, shaped as the layout says, rows summing to 1
    for the softmax forms."""
    amap = block.attention_map(*xs)
    if amap.dtype not in (torch.float32, torch.float64) or not bool(torch.isfinite(amap).all()):
        return f"attention_map: dtype {amap.dtype}, finite {bool(torch.isfinite(amap).all())}"
    sizes = [tuple(x.shape[2:]) for x in xs]
    layout = block.layout(*sizes)
    want = (xs[-1].shape[0] * layout.folds, layout.num_queries, layout.num_keys)
    if case.owner in ("SimplifiedNonLocal", "GlobalContext"):  # one query-independent row
        want = (xs[0].shape[0], 1, layout.num_keys)
    if tuple(amap.shape) != want:
        return f"attention_map: shape {tuple(amap.shape)}, the layout says {want}"
    softmax = getattr(block, "pairwise", "gaussian") in ("gaussian", "embedded_gaussian")
    if softmax and not torch.allclose(amap.sum(-1), torch.ones((), dtype=amap.dtype), atol=1e-3):
        return "attention_map: rows do not sum to 1"
    return None


def _gradients_agree(fast: nn.Module, ref: nn.Module, xs: list[torch.Tensor]) -> str | None:
    grads = []
    for block in (fast, ref):
        inputs = [x.detach().clone().requires_grad_(True) for x in xs]
        out = _run(block, inputs, 1, False)
        cot = torch.ones_like(out) / out.numel() ** 0.5
        params = [p for p in block.parameters() if p.requires_grad]
        g = torch.autograd.grad((out * cot).sum(), [*inputs, *params], allow_unused=True)
        grads.append(torch.cat([t.reshape(-1) for t in g if t is not None]))
    if grads[0].shape != grads[1].shape:
        return "gradients of different shapes"
    err = _rel(grads[0], grads[1])
    return None if err <= 1e-8 else f"gradients: relative error {err:.3g}"


@pytest.mark.parametrize("family", list(CASES))
def test_fuzz(family: str) -> None:
    outcomes: dict[str, int] = {}
    problems: list[str] = []
    for index in range(CASES[family]):
        case = case_for(family, index)
        outcome, problem = run_case(case)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if problem is not None:
            problems.append(f"{case}\n    -> {problem}")
    assert not problems, f"{len(problems)} of {CASES[family]} cases failed:\n" + "\n".join(
        problems[:15]
    )
    # the campaign exercised every kind of check
    assert outcomes.get("numerics", 0) >= CASES[family] // 3, outcomes
    assert outcomes.get("input_error", 0) >= CASES[family] // 10, outcomes
    assert outcomes.get("ctor_error", 0) >= CASES[family] // 30, outcomes
    assert outcomes.get("nonfinite", 0) >= 1, outcomes
