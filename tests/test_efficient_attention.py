"""EfficientAttention and efficient_aggregate: fast == reference == the paper's formula, the
implied map, identity at init, no N×N tensor on the fast path, compile, ONNX, errors."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nonlocalnet.functional import dot_product_aggregate
from nonlocalnet.layers.efficient_attention import (
    EfficientAttention,
    efficient_aggregate,
    efficient_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
C = 6
#: several sizes per dims, odd ones and size-1 axes included
SIZES = {1: [(7,), (1,)], 2: [(5, 3), (1, 4)], 3: [(3, 2, 5)]}
CASES = [(dims, size) for dims, sizes in SIZES.items() for size in sizes]


def _randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """Output and the gradients of <output, cot> w.r.t. x and every parameter, as one vector."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * cot).sum(), [x, *params])
    return torch.cat([y.detach().flatten()] + [g.flatten() for g in grads])


def _make(impl: str = "fast", dims: int = 2, **kw) -> EfficientAttention:
    kw.setdefault("key_channels", 4)
    kw.setdefault("value_channels", 4)
    return EfficientAttention(C, impl=impl, dims=dims, dtype=DT, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# -- fast == reference ------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "size"), CASES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("normalization", ["softmax", "scaling"])
def test_fast_equals_reference(dims, size, heads, normalization) -> None:
    fast = _randomize(_make("fast", dims, heads=heads, normalization=normalization))
    ref = _make("reference", dims, heads=heads, normalization=normalization)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, C, *size, dtype=DT)
    cot = torch.randn_like(x)
    got, want = _outputs_and_grads(fast, x, cot), _outputs_and_grads(ref, x, cot)
    assert _rel(got, want) <= 1e-10
    with torch.no_grad():
        assert float((fast(x) - x).abs().max()) > 1e-2  # the branch is not trivially zero


@pytest.mark.parametrize(("n", "m"), [(9, 4), (5, 5), (1, 3)])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("normalization", ["softmax", "scaling"])
def test_functional_fast_equals_reference(n, m, heads, normalization) -> None:
    """Keys fewer than queries (a sub-sampled key side, as the NL block would pass)."""
    q = torch.randn(2, n, 6, dtype=DT, requires_grad=True)
    k = torch.randn(2, m, 6, dtype=DT, requires_grad=True)
    v = torch.randn(2, m, 9, dtype=DT, requires_grad=True)
    cot = torch.randn(2, n, 9, dtype=DT)
    res = []
    for impl in ("fast", "reference"):
        y = efficient_aggregate(q, k, v, heads=heads, normalization=normalization, impl=impl)
        grads = torch.autograd.grad((y * cot).sum(), [q, k, v])
        res.append(torch.cat([y.flatten(), *(g.flatten() for g in grads)]))
    assert _rel(res[0], res[1]) <= 1e-10


# -- reference == the paper's formula ----------------------------------------------------------


def _paper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """E = ρ_q(Q) (ρ_k(K)ᵀ V), per head, exp/sum written out, heads concatenated."""
    dk, dv = q.shape[-1] // heads, v.shape[-1] // heads
    outs = []
    for h in range(heads):
        qh, kh = q[..., h * dk : (h + 1) * dk], k[..., h * dk : (h + 1) * dk]
        rho_q = torch.exp(qh) / torch.exp(qh).sum(dim=2, keepdim=True)  # over channels
        rho_k = torch.exp(kh) / torch.exp(kh).sum(dim=1, keepdim=True)  # over positions
        context = torch.einsum("bmc,bmd->bcd", rho_k, v[..., h * dv : (h + 1) * dv])
        outs.append(torch.einsum("bnc,bcd->bnd", rho_q, context))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_matches_paper_formula(heads, impl) -> None:
    q, k = torch.randn(2, 11, 4, dtype=DT), torch.randn(2, 7, 4, dtype=DT)
    v = torch.randn(2, 7, 6, dtype=DT)
    got = efficient_aggregate(q, k, v, heads=heads, impl=impl)
    assert _rel(got, _paper(q, k, v, heads)) <= 1e-12


def test_block_matches_official_layout() -> None:
    """The block: reprojection of the per-head attended values, plus the input."""
    block = _randomize(_make(heads=2, dims=2))
    x = torch.randn(2, C, 4, 5, dtype=DT)

    def conv(m, t):
        return torch.einsum("oc,bcn->bon", m.weight.flatten(1), t) + m.bias[None, :, None]

    xs = x.flatten(2)  # (B, C, N)
    q, k, v = (conv(block.queries, xs), conv(block.keys, xs), conv(block.values, xs))
    e = _paper(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 2).transpose(1, 2)
    want = (conv(block.reprojection, e) + xs).reshape(x.shape)
    with torch.no_grad():
        assert _rel(block(x), want) <= 1e-12


def test_scaling_normalisation_is_the_nl_dot_product() -> None:
    q, k, v = (torch.randn(2, n, c, dtype=DT) for n, c in ((9, 4), (5, 4), (5, 3)))
    want = dot_product_aggregate(q, k, v, impl="reference")  # q kᵀ v / M
    for impl in ("fast", "reference"):
        got = efficient_aggregate(q, k, v, normalization="scaling", impl=impl)
        assert _rel(got, want) <= 1e-12


# -- the implied map ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_map_rows_and_reconstruction(heads) -> None:
    block = _randomize(_make(heads=heads, zero_init=False))
    x = torch.randn(2, C, 5, 3, dtype=DT)
    amap = block.attention_map(x)  # (B, N, N), heads averaged
    assert amap.shape == (2, 15, 15)
    assert bool((amap > 0).all())
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 15, dtype=DT), rtol=0, atol=1e-12)
    q, k, v = block.embed(x)
    w = efficient_weights(q, k, heads=heads)  # (B, h, N, N)
    torch.testing.assert_close(amap, w.mean(1), rtol=1e-12, atol=1e-14)
    # each head's map times its values is that head's slice of E
    d = 4 // heads
    e = efficient_aggregate(q, k, v, heads=heads)
    for h in range(heads):
        rows = block.attention_map(x, head=h)
        torch.testing.assert_close(rows @ v[..., h * d : (h + 1) * d], e[..., h * d : (h + 1) * d])
    chosen = block.attention_map(x, queries=[14, 0, 3])
    torch.testing.assert_close(chosen, amap[:, [14, 0, 3]], rtol=1e-12, atol=1e-14)
    assert block.layout((5, 3)).num_keys == 15


# -- identity at init ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fresh_block_is_identity(dims) -> None:
    for dtype in (torch.float32, DT):
        block = EfficientAttention(16, heads=2, dims=dims, dtype=dtype)
        x = torch.randn(2, 16, *([3] * dims), dtype=dtype) * 10
        assert torch.equal(block(x), x)
        _randomize(block)
        block.reset_parameters()  # zero_init survives a re-initialisation
        assert torch.equal(block(x), x)
    assert block.queries.weight.abs().sum() > 0
    other = EfficientAttention(16, zero_init=False, dims=dims)
    x = torch.randn(2, 16, *([3] * dims))
    assert not torch.equal(other(x), x)


def test_submodules_and_defaults() -> None:
    block = EfficientAttention(64, heads=4)
    names = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert names == {
        "keys.weight": (32, 64, 1, 1),
        "keys.bias": (32,),
        "queries.weight": (32, 64, 1, 1),
        "queries.bias": (32,),
        "values.weight": (32, 64, 1, 1),
        "values.bias": (32,),
        "reprojection.weight": (64, 32, 1, 1),
        "reprojection.bias": (64,),
    }
    assert isinstance(EfficientAttention(8, dims=3).keys, nn.Conv3d)


# -- the fast path never forms an N×N tensor ----------------------------------------------------


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op takes or returns (backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _map_shaped(block: nn.Module, x: torch.Tensor, n: int, m: int) -> list[str]:
    x = x.clone().requires_grad_(True)
    with _Shapes() as rec:
        block(x).backward(torch.randn_like(x))
    return [f"{f}{s}" for f, s in rec.seen if {(n, m), (m, n)} & set(itertools.pairwise(s))]


@pytest.mark.parametrize("heads", [1, 2])
def test_fast_path_never_forms_the_map(heads) -> None:
    x = torch.randn(1, C, 5, 7, dtype=DT)  # N = 35
    fast = _randomize(_make(heads=heads))
    assert _map_shaped(fast, x, 35, 35) == []
    ref = _make("reference", heads=heads)
    assert _map_shaped(ref, x, 35, 35) != []  # the check does see a materialised map


# -- torch.compile and ONNX ---------------------------------------------------------------------


def test_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    block = _randomize(EfficientAttention(8, heads=2), 0.3)
    x = torch.randn(2, 8, 5, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = compiled(x1), block(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    (g1,), (g2,) = torch.autograd.grad(y1.sum(), [x1]), torch.autograd.grad(y2.sum(), [x2])
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    block = _randomize(EfficientAttention(8, heads=2), 0.3)
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("normalization", ["softmax", "scaling"])
def test_onnx_export_matches_torch(normalization, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    block = _randomize(EfficientAttention(8, heads=2, normalization=normalization), 0.3).eval()
    x = torch.randn(2, 8, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True)
    path = tmp_path / "effattn.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = block(x)
    assert float((want - x).abs().max()) > 1e-2
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


# -- bfloat16 -----------------------------------------------------------------------------------


def test_bfloat16_autocast_close_to_float32() -> None:
    block = _randomize(EfficientAttention(16, heads=2, zero_init=False), 0.2)
    x = torch.randn(2, 16, 6, 7, requires_grad=True)
    y32 = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = block(x)
    assert y16.dtype == torch.float32  # x + a bfloat16 branch promotes
    (grad,) = torch.autograd.grad(y16.sum(), [x])
    assert bool(torch.isfinite(grad).all())
    assert _rel(y16 - x, y32 - x) <= 3e-2  # the branch alone, through bf16 products
    with torch.no_grad():
        out = block.to(torch.bfloat16)(x.detach().bfloat16())
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heads": 3}, r"key_channels \(4\) must be divisible by heads \(3\)"),
        ({"heads": 2, "value_channels": 5}, r"value_channels \(5\) must be divisible"),
        ({"heads": 0}, "heads must be a positive int"),
        ({"normalization": "l2"}, "unknown normalization 'l2'"),
        ({"impl": "flash"}, "unknown impl 'flash'"),
        ({"dims": 4}, "unknown dims 4"),
        ({"key_channels": 0}, "key_channels must be a positive int"),
    ],
)
def test_bad_constructor_arguments(kwargs, match) -> None:
    kwargs = {"key_channels": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        EfficientAttention(8, **kwargs)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        EfficientAttention(0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_inputs(dims) -> None:
    block = EfficientAttention(8, dims=dims)
    good = torch.randn(1, 8, *([3] * dims))
    block(good)
    with pytest.raises(ValueError, match=rf"{dims + 2}-d.*got {dims + 1}-d"):
        block(good[0])
    with pytest.raises(ValueError, match=r"8 channels.*got 5"):
        block(torch.randn(1, 5, *([3] * dims)))
    with pytest.raises(ValueError, match="empty dimension"):
        block(torch.randn(1, 8, *([3] * (dims - 1)), 0))
    with pytest.raises(TypeError, match=r"floating-point dtype, got torch\.int64"):
        block(good.long())
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        block(good.tolist())
    n = math.prod(good.shape[2:])
    with pytest.raises(ValueError, match=rf"\[0, {n}\)"):
        block.attention_map(good, queries=[n])
    with pytest.raises(ValueError, match="head must be an int"):
        block.attention_map(good, head=1)


def test_bad_functional_inputs() -> None:
    q, k, v = torch.randn(2, 5, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="same number of positions"):
        efficient_aggregate(q, k, v[:, :2])
    with pytest.raises(ValueError, match="same channel count"):
        efficient_aggregate(q, k[..., :3], v)
    with pytest.raises(ValueError, match="same batch size"):
        efficient_aggregate(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"value channels \(6\) must be divisible by heads \(4\)"):
        efficient_aggregate(q, k, v, heads=4)
    with pytest.raises(ValueError, match="unknown impl"):
        efficient_aggregate(q, k, v, impl="slow")
    with pytest.raises(ValueError, match=r"3-d \(B, N, C\)"):
        efficient_aggregate(q[0], k, v)
