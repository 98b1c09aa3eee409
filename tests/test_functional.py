"""The functional core: fast == reference == the formula, on (B, N, C) tokens."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nonlocalnet import functional as NLF

DT = torch.float64


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().norm() / want.detach().norm())


def _flat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])  # (total,)


def _tokens(pairwise: str, b: int, n: int, m: int, c_q: int, c_v: int):
    d = 1 if pairwise == "concatenation" else c_q
    q = torch.randn(b, n, d, dtype=DT, requires_grad=True)
    k = torch.randn(b, m, d, dtype=DT, requires_grad=True)
    v = torch.randn(b, m, c_v, dtype=DT, requires_grad=True)
    return q, k, v


def _formula(pairwise: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """y_i = 1/C(x) Σ_j f(q_i, k_j) v_j with explicit loops over batch and query."""
    b, n, _ = q.shape
    m = k.shape[1]
    out = torch.zeros(b, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for i in range(n):
            if pairwise in ("gaussian", "embedded_gaussian"):
                f = torch.exp(scale * (k[bi] * q[bi, i]).sum(-1))  # (M,)
                c = f.sum()
            elif pairwise == "dot_product":
                f = (k[bi] * q[bi, i]).sum(-1)  # (M,)
                c = m
            else:
                f = torch.clamp(q[bi, i, 0] + k[bi, :, 0], min=0)  # (M,)
                c = m
            out[bi, i] = (f[:, None] * v[bi]).sum(0) / c
    return out


def _impls(pairwise: str, shared: bool = False) -> list[str]:
    """Every impl but the reference: the dispatch choices and each kernel that applies."""
    return [
        i for i in NLF.impl_choices(pairwise) if i != "reference" and (i != "symmetric" or shared)
    ]


@pytest.mark.parametrize("pairwise", NLF.PAIRWISE)
@pytest.mark.parametrize(("c_q", "c_v"), [(4, 4), (6, 3), (3, 5)])
def test_fast_equals_reference_with_gradients(pairwise: str, c_q: int, c_v: int) -> None:
    """Every kernel (and both dispatch choices) against the reference, output and gradients."""
    q, k, v = _tokens(pairwise, 2, 9, 7, c_q, c_v)
    grad = torch.randn(2, 9, c_v, dtype=DT)

    def run(impl: str) -> torch.Tensor:
        y = NLF.aggregate(pairwise, q, k, v, scale=0.7, impl=impl)
        return _flat(y, *torch.autograd.grad(y, (q, k, v), grad))

    want = run("reference")
    for impl in _impls(pairwise):
        assert _rel(run(impl), want) <= 1e-10, impl


@pytest.mark.parametrize("pairwise", NLF.PAIRWISE)
def test_reference_equals_formula(pairwise: str) -> None:
    q, k, v = _tokens(pairwise, 2, 6, 5, 3, 4)
    with torch.no_grad():
        want = _formula(pairwise, q, k, v, scale=0.6)
        got = NLF.aggregate(pairwise, q, k, v, scale=0.6, impl="reference")
    assert _rel(got, want) <= 1e-12


@pytest.mark.parametrize("pairwise", NLF.PAIRWISE)
def test_pairwise_weights_match_formula(pairwise: str) -> None:
    q, k, _ = _tokens(pairwise, 2, 5, 4, 3, 1)
    q, k = q.detach(), k.detach()
    with torch.no_grad():
        w = NLF.pairwise_weights(pairwise, q, k, scale=0.5)
    assert w.shape == (2, 5, 4)
    for bi in range(2):
        for i in range(5):
            for j in range(4):
                if pairwise in ("gaussian", "embedded_gaussian"):
                    den = sum(math.exp(0.5 * float(q[bi, i] @ k[bi, jj])) for jj in range(4))
                    want = math.exp(0.5 * float(q[bi, i] @ k[bi, j])) / den
                elif pairwise == "dot_product":
                    want = float(q[bi, i] @ k[bi, j]) / 4
                else:
                    want = max(float(q[bi, i, 0] + k[bi, j, 0]), 0.0) / 4
                assert w[bi, i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_concatenation_ties_are_exact() -> None:
    """Keys with a_i + b_j == 0 exactly contribute 0, and ReLU'(0) = 0 in both paths."""
    a = torch.tensor([[[1.0], [-2.0], [0.5], [3.0]]], dtype=DT, requires_grad=True)
    b = torch.tensor([[[-1.0], [2.0], [-0.5], [2.0], [-3.0]]], dtype=DT, requires_grad=True)
    v = torch.randn(1, 5, 3, dtype=DT, requires_grad=True)
    grad = torch.randn(1, 4, 3, dtype=DT)
    outs = []
    for impl in ("reference", "sorted", "direct"):
        y = NLF.concatenation_aggregate(a, b, v, impl=impl)
        outs.append(_flat(y, *torch.autograd.grad(y, (a, b, v), grad)))
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], rtol=0, atol=1e-14)
    # a_0 = 1: keys with b_j > -1: b = 2, -0.5, 2 -> (3 v_1 + 0.5 v_2 + 3 v_3) / 5
    want0 = (3 * v[0, 1] + 0.5 * v[0, 2] + 3 * v[0, 3]) / 5
    y = NLF.concatenation_aggregate(a, b, v)
    assert torch.allclose(y[0, 0], want0, rtol=0, atol=1e-14)


def test_default_scale() -> None:
    assert NLF.default_scale("embedded_gaussian", 16, None) == 0.25
    assert NLF.default_scale("gaussian", 16, None) == 1.0
    assert NLF.default_scale("gaussian", 16, True) == 0.25
    assert NLF.default_scale("embedded_gaussian", 16, False) == 1.0
    assert NLF.default_scale("dot_product", 16, None) == 1.0
    assert NLF.default_scale("concatenation", 16, False) == 1.0
    with pytest.raises(ValueError, match="use_scale"):
        NLF.default_scale("dot_product", 16, True)
    with pytest.raises(ValueError, match="pairwise"):
        NLF.default_scale("cosine", 16, None)


def test_softmax_scale_is_applied() -> None:
    q, k, v = _tokens("embedded_gaussian", 1, 4, 6, 3, 2)
    with torch.no_grad():
        y1 = NLF.aggregate("embedded_gaussian", q, k, v, scale=0.3)
        y2 = NLF.aggregate("embedded_gaussian", q * 0.3, k, v, scale=1.0)
        y3 = NLF.aggregate("embedded_gaussian", q, k, v, scale=1.0)
    assert _rel(y1, y2) <= 1e-12
    assert _rel(y1, y3) > 1e-3


def _sdpa_kernels(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "attention" in e.key or "softmax" in e.key}


@pytest.mark.parametrize("transposed", [False, True])
def test_fast_softmax_uses_the_fused_kernel(transposed: bool) -> None:
    """Equal widths: the fused kernel, with no silent fallback to the math kernel on strided
    inputs (a transposed (B, C, N) conv output)."""
    if transposed:
        q, k, v = (torch.randn(1, 8, n).transpose(1, 2) for n in (64, 48, 48))
    else:
        q, k, v = torch.randn(1, 64, 8), torch.randn(1, 48, 8), torch.randn(1, 48, 8)
    kernels = _sdpa_kernels(lambda: NLF.softmax_aggregate(q, k, v, scale=1.0, impl="fast"))
    assert any("flash_attention" in name for name in kernels), kernels
    assert not any(name in ("aten::_softmax", "aten::softmax") for name in kernels), kernels
    want = NLF.softmax_aggregate(q, k, v, scale=1.0, impl="reference")
    got = NLF.softmax_aggregate(q, k, v, scale=1.0, impl="fast")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _shapes(fn) -> list[list[int]]:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [list(s) for e in prof.events() for s in (e.input_shapes or []) if s]


@pytest.mark.parametrize(("c_q", "c_v"), [(8, 4), (4, 8)])
def test_unequal_widths_use_query_blocks(c_q: int, c_v: int, monkeypatch) -> None:
    """Values narrower or wider than the logits (gaussian: C vs C'): blocks of queries, forward
    and backward, never the (N, M) map."""
    monkeypatch.setattr(NLF, "ATTENTION_CHUNK_ELEMENTS", 5 * 48)  # blocks of 5 queries
    q = torch.randn(1, 64, c_q, dtype=DT, requires_grad=True)
    k = torch.randn(1, 48, c_q, dtype=DT, requires_grad=True)
    v = torch.randn(1, 48, c_v, dtype=DT, requires_grad=True)

    def fwd_bwd() -> None:
        NLF.softmax_aggregate(q, k, v, scale=0.5, impl="fast").sum().backward()

    shapes = _shapes(fwd_bwd)
    assert [1, 5, 48] in shapes
    assert not any(s[-2:] in ([64, 48], [48, 64]) for s in shapes)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000])
@pytest.mark.parametrize("shared", [False, True])
def test_chunked_softmax_equals_reference(chunk: int, shared: bool) -> None:
    q = torch.randn(2, 7, 5, dtype=DT, requires_grad=True)
    k = q if shared else torch.randn(2, 6, 5, dtype=DT, requires_grad=True)
    v = torch.randn(2, k.shape[1], 3, dtype=DT, requires_grad=True)
    grad = torch.randn(2, 7, 3, dtype=DT)
    inputs = (q, v) if shared else (q, k, v)
    got = NLF.chunked_softmax_aggregate(q, k, v, scale=0.8, chunk=chunk)
    want = NLF.softmax_aggregate(q, k, v, scale=0.8, impl="reference")
    g_got = torch.autograd.grad(got, inputs, grad)
    g_want = torch.autograd.grad(want, inputs, grad)
    assert _rel(_flat(got, *g_got), _flat(want, *g_want)) <= 1e-13
    with pytest.raises(ValueError, match="chunk"):
        NLF.chunked_softmax_aggregate(q, k, v, scale=1.0, chunk=0)


@pytest.mark.parametrize(("n", "tile"), [(7, 1), (10, 3), (12, 4), (9, 9), (5, 64)])
def test_symmetric_softmax_equals_reference(n: int, tile: int) -> None:
    """Keys = queries: tiles I <= J of the symmetric logits serve both halves of the map."""
    x = torch.randn(2, n, 5, dtype=DT, requires_grad=True)
    v = torch.randn(2, n, 3, dtype=DT, requires_grad=True)
    grad = torch.randn(2, n, 3, dtype=DT)
    got = NLF.symmetric_softmax_aggregate(x, v, scale=0.8, tile=tile)
    want = NLF.softmax_aggregate(x, x, v, scale=0.8, impl="reference")
    g_got = torch.autograd.grad(got, (x, v), grad)
    g_want = torch.autograd.grad(want, (x, v), grad)
    assert _rel(_flat(got, *g_got), _flat(want, *g_want)) <= 1e-13
    with pytest.raises(ValueError, match="tile"):
        NLF.symmetric_softmax_aggregate(x, v, scale=1.0, tile=0)


def test_shared_keys_use_symmetric_tiles(monkeypatch) -> None:
    """softmax_aggregate(x, x, v) on the CPU takes the symmetric kernel: (tile, tile) logit
    blocks, never the (N, N) map, forward and backward."""
    monkeypatch.setattr(NLF, "SYMMETRIC_TILE", 8)
    x = torch.randn(1, 40, 6, dtype=DT, requires_grad=True)
    v = torch.randn(1, 40, 3, dtype=DT, requires_grad=True)

    def fwd_bwd() -> None:
        NLF.softmax_aggregate(x, x, v, scale=0.5, impl="fast").sum().backward()

    shapes = _shapes(fwd_bwd)
    assert [1, 8, 8] in shapes
    assert not any(s[-2:] == [40, 40] for s in shapes)


def test_symmetric_softmax_large_logits_and_low_precision() -> None:
    x, v = torch.randn(1, 9, 6) * 40, torch.randn(1, 9, 3)
    want = NLF.softmax_aggregate(x.double(), x.double(), v.double(), scale=1.0, impl="reference")
    got = NLF.symmetric_softmax_aggregate(x, v, scale=1.0, tile=4)
    assert _rel(got.double(), want) <= 1e-5
    got16 = NLF.symmetric_softmax_aggregate(x, v.bfloat16(), scale=1.0, tile=4)
    assert got16.dtype == torch.bfloat16
    assert _rel(got16.double(), want) <= 1e-2


def test_chunked_softmax_large_logits_and_low_precision() -> None:
    """Logits far beyond exp's range stay finite; bfloat16 inputs are accumulated in float32."""
    q, k, v = torch.randn(1, 9, 6) * 40, torch.randn(1, 8, 6) * 40, torch.randn(1, 8, 3)
    got = NLF.chunked_softmax_aggregate(q, k, v, scale=1.0, chunk=4)
    want = NLF.softmax_aggregate(q.double(), k.double(), v.double(), scale=1.0, impl="reference")
    assert _rel(got.double(), want) <= 1e-5
    got16 = NLF.chunked_softmax_aggregate(q, k, v.bfloat16(), scale=1.0, chunk=4)
    assert got16.dtype == torch.bfloat16
    assert _rel(got16.double(), want) <= 1e-2


def test_fast_dot_product_never_forms_the_map() -> None:
    """The fast dot product multiplies right to left: no (B, N, M) intermediate."""
    q, k, v = (torch.randn(1, 50, 3), torch.randn(1, 40, 3), torch.randn(1, 40, 2))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        NLF.aggregate("dot_product", q, k, v, impl="fast")
    shapes = [s for e in prof.events() for s in (e.input_shapes or [])]
    assert [1, 50, 40] not in shapes


@pytest.mark.parametrize(
    ("args", "kwargs", "err", "match"),
    [
        (("cosine",), {}, ValueError, "pairwise"),
        (("gaussian",), {"impl": "slow"}, ValueError, "impl"),
        (("gaussian",), {"scale": float("nan")}, ValueError, "scale"),
    ],
)
def test_bad_choices(args, kwargs, err, match) -> None:
    q, k, v = _tokens("gaussian", 1, 3, 3, 2, 2)
    with pytest.raises(err, match=match):
        NLF.aggregate(*args, q, k, v, **kwargs)


def test_bad_tokens() -> None:
    q, k, v = (torch.randn(2, 5, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="3-d"):
        NLF.aggregate("gaussian", q[0], k, v)
    with pytest.raises(TypeError, match="floating"):
        NLF.aggregate("gaussian", q.long(), k, v)
    with pytest.raises(TypeError, match="Tensor"):
        NLF.aggregate("gaussian", q.tolist(), k, v)
    with pytest.raises(ValueError, match="empty"):
        NLF.aggregate("gaussian", q[:, :0], k, v)
    with pytest.raises(ValueError, match="batch size"):
        NLF.aggregate("gaussian", q[:1], k, v)
    with pytest.raises(ValueError, match="number of positions"):
        NLF.aggregate("gaussian", q, k, v[:, :3])
    with pytest.raises(ValueError, match="channel count"):
        NLF.aggregate("dot_product", q, k[..., :2], v)
    with pytest.raises(ValueError, match=r"\(B, N, 1\)"):
        NLF.aggregate("concatenation", q, k, v)


def test_blocked_kernel_option(monkeypatch) -> None:
    """impl="blocked" routes equal widths to the query-blocked path: same numbers, forward and
    backward, and no fused kernel."""
    q, k, v = _tokens("embedded_gaussian", 2, 9, 7, 4, 4)
    grad = torch.randn(2, 9, 4, dtype=DT)
    want = NLF.softmax_aggregate(q, k, v, scale=0.7, impl="reference")
    g_want = torch.autograd.grad(want, (q, k, v), grad)
    monkeypatch.setattr(NLF, "ATTENTION_CHUNK_ELEMENTS", 2 * 7)  # blocks of 2 queries

    def blocked() -> torch.Tensor:
        return NLF.aggregate("embedded_gaussian", q, k, v, scale=0.7, impl="blocked")

    kernels = _sdpa_kernels(blocked)
    assert not any("flash_attention" in name for name in kernels), kernels
    assert [2, 2, 7] in _shapes(blocked)  # (B, 2, M): the logits of one block of 2 queries
    got = blocked()
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    assert _rel(_flat(got, *g_got), _flat(want, *g_want)) <= 1e-12


@pytest.mark.parametrize(("c_q", "c_v"), [(4, 4), (6, 3), (3, 5)])
@pytest.mark.parametrize("shared", [False, True])
def test_every_kernel_equals_the_reference(c_q: int, c_v: int, shared: bool) -> None:
    """Each softmax kernel, unequal widths and keys that are the queries included, forward and
    backward; "sdpa" takes the fused kernel even where the dispatcher would not."""
    q, k, v = _tokens("gaussian", 2, 9, 9 if shared else 7, c_q, c_v)
    if shared:
        k = q
    grad = torch.randn(2, 9, c_v, dtype=DT)
    want = NLF.softmax_aggregate(q, k, v, scale=0.6, impl="reference")
    g_want = torch.autograd.grad(want, (q, v) if shared else (q, k, v), grad)
    for impl in _impls("gaussian", shared):
        got = NLF.softmax_aggregate(q, k, v, scale=0.6, impl=impl)
        g_got = torch.autograd.grad(got, (q, v) if shared else (q, k, v), grad)
        assert _rel(_flat(got, *g_got), _flat(want, *g_want)) <= 1e-12, impl
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    k32 = q32 if shared else k32
    kernels = _sdpa_kernels(lambda: NLF.softmax_aggregate(q32, k32, v32, scale=0.6, impl="sdpa"))
    assert any("flash_attention" in name for name in kernels), kernels


def test_bad_kernel_is_named() -> None:
    q, k, v = _tokens("embedded_gaussian", 1, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        NLF.softmax_aggregate(q, k, v, scale=1.0, impl="flash")
    with pytest.raises(ValueError, match="unknown impl 'blocked'"):
        NLF.aggregate("dot_product", q, k, v, impl="blocked")
    with pytest.raises(ValueError, match="unknown impl 'linear'"):
        NLF.aggregate("embedded_gaussian", q, k, v, impl="linear")
    with pytest.raises(ValueError, match=r"symmetric.*keys that are the queries"):
        NLF.softmax_aggregate(q, k, v, scale=1.0, impl="symmetric")
    assert not hasattr(NLF, "CPU_SOFTMAX_KERNEL")  # a kernel is an argument, not a global


# -- the dispatcher ------------------------------------------------------------------------------


def _choose(pairwise: str, n: int, m: int, c_q: int, c_v: int, **kw) -> str:
    return NLF.choose_kernel(pairwise, n=n, m=m, c_q=c_q, c_v=c_v, **kw)


def test_dispatch_small_maps_take_the_direct_kernel() -> None:
    """Small maps take the direct product while a backward pass follows (softmax forms:
    N·M <= 2^22 and <= 3× the q, k, v tokens; 2^21 for keys that are the queries), the fused
    kernels without one; "fast" never takes it; the dot product by its product count."""
    # embedded Gaussian, C' = 256: N = M <= min(2048, 3·768)
    assert _choose("embedded_gaussian", 196, 196, 256, 256) == "direct"
    assert _choose("embedded_gaussian", 2048, 2048, 256, 256) == "direct"
    assert _choose("embedded_gaussian", 2049, 2049, 256, 256) == "sdpa"
    assert _choose("embedded_gaussian", 196, 196, 256, 256, grad=False) == "sdpa"
    assert _choose("embedded_gaussian", 196, 196, 256, 256, impl="fast") == "sdpa"
    # narrow widths: the token bound (C' = 8: N = M <= 3·24 = 72)
    assert _choose("embedded_gaussian", 72, 72, 8, 8) == "direct"
    assert _choose("embedded_gaussian", 73, 73, 8, 8) == "sdpa"
    # gaussian (keys = queries, C = 512, C' = 256): N·M <= 2^21
    assert _choose("gaussian", 1448, 1448, 512, 256, shared=True) == "direct"
    assert _choose("gaussian", 1449, 1449, 512, 256, shared=True) == "symmetric"
    assert _choose("gaussian", 784, 784, 512, 256, shared=True, grad=False) == "symmetric"
    assert _choose("gaussian", 4096, 1024, 512, 256) == "direct"  # sub-sampled keys
    assert _choose("gaussian", 8192, 2048, 512, 256) == "blocked"
    # dot product: direct while N·M·(C_q + C_v) < (N + M)·C_q·C_v (N = M = 255 < C' = 256)
    assert _choose("dot_product", 255, 255, 256, 256) == "direct"
    assert _choose("dot_product", 256, 256, 256, 256) == "linear"
    assert _choose("dot_product", 255, 255, 256, 256, grad=False) == "direct"
    # concatenation (scalar a, b): the map no larger than a, b and the values
    assert _choose("concatenation", 196, 196, 1, 256) == "direct"
    assert _choose("concatenation", 784, 784, 1, 256) == "sorted"
    assert _choose("concatenation", 196, 196, 1, 256, impl="fast") == "sorted"
    # forced kernels and the reference
    assert _choose("embedded_gaussian", 9, 9, 4, 4, impl="blocked") == "blocked"
    assert _choose("dot_product", 9, 9, 4, 4, impl="reference") == "reference"


def test_dispatch_on_cuda_takes_the_fused_kernel() -> None:
    for n in (49, 4096):
        assert _choose("embedded_gaussian", n, n, 256, 256, device_type="cuda") == "sdpa"
        assert _choose("gaussian", n, n, 512, 256, shared=True, device_type="cuda") == "sdpa"
    assert _choose("dot_product", 49, 49, 256, 256, device_type="cuda") == "direct"
    assert _choose("concatenation", 4096, 4096, 1, 256, device_type="cuda") == "sorted"


@pytest.mark.parametrize("pairwise", NLF.PAIRWISE)
def test_auto_is_exact_on_both_sides_of_the_threshold(pairwise: str) -> None:
    """impl="auto" just below and just above the small-map threshold: a different kernel each
    side, both equal to the reference in float64, output and every gradient."""
    c_q = 1 if pairwise == "concatenation" else 6
    c_v = 5
    sides = []
    for n in range(2, 80):  # N = M: find where the choice changes
        kernel = _choose(pairwise, n, n, c_q, c_v, shared=pairwise == "gaussian")
        if not sides or sides[-1][1] != kernel:
            sides.append((n, kernel))
    assert [k for _, k in sides][:2] == [
        "direct",
        NLF.choose_kernel(
            pairwise,
            n=sides[1][0],
            m=sides[1][0],
            c_q=c_q,
            c_v=c_v,
            shared=pairwise == "gaussian",
            impl="fast",
        ),
    ]
    n_switch = sides[1][0]
    for n in (n_switch - 1, n_switch):
        q, k, v = _tokens(pairwise, 2, n, n, c_q, c_v)
        if pairwise == "gaussian":
            k = q
        inputs = (q, v) if pairwise == "gaussian" else (q, k, v)
        grad = torch.randn(2, n, c_v, dtype=DT)
        outs = []
        for impl in ("auto", "reference"):
            y = NLF.aggregate(pairwise, q, k, v, scale=0.4, impl=impl)
            outs.append(_flat(y, *torch.autograd.grad(y, inputs, grad)))
        assert _rel(outs[0], outs[1]) <= 1e-10, n


def test_select_kernel_reads_the_tensors() -> None:
    q, v = torch.randn(1, 900, 8), torch.randn(1, 900, 4)
    assert NLF.select_kernel("gaussian", q, q, v) == "symmetric"
    assert NLF.select_kernel("gaussian", q, q.clone(), v) == "blocked"
    small = q[:, :10]
    assert NLF.select_kernel("gaussian", small, small, v[:, :10]) == "symmetric"  # no grad
    small.requires_grad_(True)
    assert NLF.select_kernel("gaussian", small, small, v[:, :10]) == "direct"
    with torch.no_grad():
        assert NLF.select_kernel("gaussian", small, small, v[:, :10]) == "symmetric"


def test_dispatch_is_logged(caplog) -> None:
    q, k, v = _tokens("embedded_gaussian", 1, 4, 3, 2, 2)  # requiring grad
    with caplog.at_level("DEBUG", logger="nonlocalnet.kernels"):
        NLF.aggregate("embedded_gaussian", q, k, v)
    assert "kernel 'direct'" in caplog.text


def test_direct_kernel_never_recomputes_and_matches_in_low_precision() -> None:
    """The direct kernel keeps its map for backward (one logits product forward, none in
    backward) and accumulates half-precision inputs in float32."""
    q, k = (torch.randn(1, n, 8, requires_grad=True) for n in (12, 10))
    v = torch.randn(1, 10, 5, requires_grad=True)

    def fwd_bwd() -> None:
        NLF.softmax_aggregate(q, k, v, scale=0.3, impl="direct").sum().backward()

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fwd_bwd()
    logits = [
        e
        for e in prof.events()
        if e.name in ("aten::bmm", "aten::baddbmm")
        and [list(s) for s in e.input_shapes if s][-2:] == [[1, 12, 8], [1, 8, 10]]
    ]
    assert len(logits) == 1
    big = [t * 30 for t in (q.detach(), k.detach())]
    want = NLF.softmax_aggregate(
        *(t.double() for t in big), v.detach().double(), scale=0.3, impl="reference"
    )
    got = NLF.softmax_aggregate(
        *(t.bfloat16() for t in big), v.detach().bfloat16(), scale=0.3, impl="direct"
    )
    assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    assert _rel(got.double(), want) <= 2e-2


# -- low precision: logits and sums that float16 cannot hold -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairwise", NLF.PAIRWISE)
def test_large_logits_in_half_precision(pairwise: str, dtype: torch.dtype) -> None:
    """Logits beyond float16's range (65504): the reference path and the materialised weights
    (computed in float32) stay finite and close to float64, as the fast path does; weights come
    back in the inputs' dtype unless asked for another."""
    g = torch.Generator().manual_seed(0)
    d = 1 if pairwise == "concatenation" else 8
    big = 3e4 if pairwise == "concatenation" else 300.0  # q·k ~ 1e5, a + b ~ 6e4
    q, k = (torch.randn(2, n, d, generator=g) * big for n in (9, 7))
    v = torch.randn(2, 7, 3, generator=g)
    if pairwise == "dot_product":
        v = v / 1e4  # the result itself inside float16's range, its partial sums kᵀv not
    scale = 0.05 if "gaussian" in pairwise else 1.0
    # float16 rounds q and k: compare with float64 on the rounded inputs
    q16, k16, v16 = (t.to(dtype) for t in (q, k, v))
    qd, kd, vd = (t.double() for t in (q16, k16, v16))
    want = NLF.aggregate(pairwise, qd, kd, vd, scale=scale, impl="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for impl in ("reference", *_impls(pairwise)):
        got = NLF.aggregate(pairwise, q16, k16, v16, scale=scale, impl=impl)
        assert got.dtype == dtype
        assert bool(torch.isfinite(got).all()), impl
        assert _rel(got.double(), want) <= tol, impl
    w = NLF.pairwise_weights(pairwise, q16, k16, scale=scale)
    w32 = NLF.pairwise_weights(pairwise, q16, k16, scale=scale, dtype=torch.float32)
    w_want = NLF.pairwise_weights(pairwise, qd, kd, scale=scale)
    assert w.dtype == dtype and w32.dtype == torch.float32
    assert bool(torch.isfinite(w32).all())
    assert _rel(w32.double(), w_want) <= 1e-5
    if pairwise in ("gaussian", "embedded_gaussian"):
        torch.testing.assert_close(w32.sum(-1), torch.ones(2, 9), rtol=0, atol=1e-6)


def test_reference_accumulates_in_float32_under_autocast() -> None:
    q, k, v = torch.randn(1, 6, 4) * 400, torch.randn(1, 5, 4) * 400, torch.randn(1, 5, 3)
    want = NLF.softmax_aggregate(q.double(), k.double(), v.double(), scale=0.1, impl="reference")
    with torch.autocast("cpu", dtype=torch.float16):
        got = NLF.softmax_aggregate(q.half(), k.half(), v.half(), scale=0.1, impl="reference")
        w = NLF.pairwise_weights("gaussian", q.half(), k.half(), scale=0.1, dtype=torch.float32)
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(w).all())
    assert _rel(got.double(), want) <= 2e-2


# -- the counts of the concatenation form, without a binary search ------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merged_counts_equal_searchsorted(dtype: torch.dtype) -> None:
    """#{j : t_j < q_i} from one merged sort (what ONNX export uses) equals torch.searchsorted,
    ties (t_j = q_i, not counted), repeated values and infinities included."""
    g = torch.Generator().manual_seed(0)
    for b, n, m in [(1, 1, 1), (2, 9, 7), (3, 50, 40), (1, 7, 1), (1, 1, 9)]:
        t = torch.sort(torch.randint(-3, 4, (b, m), generator=g).to(dtype))[0]
        q = torch.randint(-4, 5, (b, n), generator=g).to(dtype)
        q[0, 0] = float("inf")
        if n > 1:
            q[0, 1] = -float("inf")
        assert torch.equal(NLF.merged_counts(t, q), torch.searchsorted(t, q))
        cont_t = torch.sort(torch.randn(b, m, generator=g, dtype=dtype))[0]
        cont_q = torch.randn(b, n, generator=g, dtype=dtype)
        assert torch.equal(NLF.merged_counts(cont_t, cont_q), torch.searchsorted(cont_t, cont_q))
    # the thresholds need not be sorted
    t, q = torch.tensor([[2.0, -1.0, 0.5, -1.0]]), torch.tensor([[-1.0, 0.5, 3.0, -2.0]])
    assert NLF.merged_counts(t, q).tolist() == [[0, 2, 4, 0]]


def test_concatenation_under_onnx_export_uses_merged_counts(monkeypatch) -> None:
    """While exporting to ONNX, the fast concatenation takes the merged counts: same result."""
    a = torch.tensor([[[1.0], [-2.0], [0.5], [3.0]]], dtype=DT)
    b = torch.tensor([[[-1.0], [2.0], [-0.5], [2.0], [-3.0]]], dtype=DT)
    v = torch.randn(1, 5, 3, dtype=DT)
    want = NLF.concatenation_aggregate(a, b, v, impl="sorted")
    calls = []
    merged = NLF.merged_counts

    def spy(*args):
        calls.append(1)
        return merged(*args)

    monkeypatch.setattr(NLF, "merged_counts", spy)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    got = NLF.concatenation_aggregate(a, b, v, impl="sorted")
    assert calls and torch.equal(got, want)


# -- CUDA: the fused kernels, no math fallback, no device syncs ----------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("c_q", "c_v"), [(64, 64), (256, 256), (60, 60), (32, 48)])
def test_cuda_sdpa_reaches_the_fused_kernels(dtype, c_q: int, c_v: int) -> None:
    """With the math backend excluded, the fast softmax path still runs (FlashAttention or the
    memory-efficient kernel; widths padded to a common multiple of 8), forward and backward,
    and agrees with the reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, n, c_q, device="cuda", generator=g) for n in (300, 200))
    v = torch.randn(2, 200, c_v, device="cuda", generator=g)
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    assert NLF.select_kernel("embedded_gaussian", q, k, v) == "sdpa"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        y = NLF.softmax_aggregate(q, k, v, scale=c_q**-0.5)
        y.float().square().sum().backward()
    want = NLF.softmax_aggregate(
        *(t.detach().double() for t in (q, k, v)), scale=c_q**-0.5, impl="reference"
    )
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(y.double(), want) <= tol
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


@cuda
@pytest.mark.parametrize("pairwise", NLF.PAIRWISE)
def test_cuda_fast_paths_do_not_sync(pairwise: str) -> None:
    """The dispatched kernels run without a host-device synchronisation, forward and backward."""
    d = 1 if pairwise == "concatenation" else 64
    q, k = (torch.randn(2, n, d, device="cuda", requires_grad=True) for n in (500, 400))
    v = torch.randn(2, 400, 64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for impl in ("auto", "fast"):
            y = NLF.aggregate(pairwise, q, k, v, scale=0.1, impl=impl)
            y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = NLF.aggregate(pairwise, q.double(), k.double(), v.double(), scale=0.1, impl="reference")
    assert _rel(NLF.aggregate(pairwise, q, k, v, scale=0.1).double(), want) <= 1e-4


@pytest.mark.parametrize("impl", ["direct", "blocked", "symmetric", "sdpa"])
def test_bfloat16_autocast_kernels(impl: str, monkeypatch) -> None:
    """Under a bfloat16 autocast the kernels run their products in bfloat16 (as autocast does)
    with float32 statistics: close to the float64 reference on moderate logits, finite, and
    with gradients close to it too; blocks and tiles smaller than the input."""
    monkeypatch.setattr(NLF, "ATTENTION_CHUNK_ELEMENTS", 7 * 40)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 16, generator=g)
    v = torch.randn(2, 40, 8, generator=g)
    k = q if impl == "symmetric" else torch.randn(2, 40, 16, generator=g)
    grad = torch.randn(2, 40, 8, generator=g)
    inputs = [
        t.clone().requires_grad_(True) for t in ((q, v) if impl == "symmetric" else (q, k, v))
    ]
    qq, kk, vv = (inputs[0], inputs[0], inputs[1]) if impl == "symmetric" else inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if impl == "symmetric":
            y = NLF.symmetric_softmax_aggregate(qq, vv, scale=0.25, tile=16)
        else:
            y = NLF.softmax_aggregate(qq, kk, vv, scale=0.25, impl=impl)
    got = torch.autograd.grad(y, inputs, grad.to(y.dtype))
    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    rq, rk, rv = (ref_in[0], ref_in[0], ref_in[1]) if impl == "symmetric" else ref_in
    want = NLF.softmax_aggregate(rq, rk, rv, scale=0.25, impl="reference")
    g_want = torch.autograd.grad(want, ref_in, grad.double())
    assert bool(torch.isfinite(y).all())
    assert _rel(y.double(), want) <= 3e-2
    for a, b in zip(got, g_want, strict=True):
        assert _rel(a.double(), b) <= 5e-2
