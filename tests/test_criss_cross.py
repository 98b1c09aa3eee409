"""CrissCrossAttention: fast == reference == the paper's rule == mmcv, the self position counted
once, recurrence, identity at init, no joint (H, W, H+W−1) tensor on the fast path, compile, ONNX,
errors."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nonlocalnet.functional
from nonlocalnet.layers.criss_cross import (
    CrissCrossAttention,
    criss_cross_aggregate,
    criss_cross_weights,
    num_criss_cross_keys,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
C = 16  # C' = C/8 = 2
#: several sizes per dims: odd ones, and size-1 axes (a masked line with no key at all)
SIZES = {1: [(7,), (1,)], 2: [(5, 3), (1, 4), (4, 1)], 3: [(3, 2, 5), (1, 3, 1)]}
CASES = [(dims, size) for dims, sizes in SIZES.items() for size in sizes]


def _randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad((y * cot).sum(), [x, *module.parameters()])
    return torch.cat([y.detach().flatten()] + [g.flatten() for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# -- fast == reference --------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "size"), CASES)
@pytest.mark.parametrize("recurrence", [1, 2])
def test_fast_equals_reference(dims, size, recurrence) -> None:
    fast = CrissCrossAttention(C, recurrence=recurrence, dims=dims, dtype=DT)
    _randomize(fast)
    ref = CrissCrossAttention(C, recurrence=recurrence, impl="reference", dims=dims, dtype=DT)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, C, *size, dtype=DT)
    cot = torch.randn_like(x)
    assert _rel(_outputs_and_grads(fast, x, cot), _outputs_and_grads(ref, x, cot)) <= 1e-10
    with torch.no_grad():
        assert float((fast(x) - x).abs().max()) > 1e-2


@pytest.mark.parametrize("size", [(6, 5), (1, 1), (2, 3, 4), (9,)])
def test_functional_fast_equals_reference(size) -> None:
    q = torch.randn(2, 3, *size, dtype=DT, requires_grad=True)
    k = torch.randn(2, 3, *size, dtype=DT, requires_grad=True)
    v = torch.randn(2, 5, *size, dtype=DT, requires_grad=True)
    cot = torch.randn(2, 5, *size, dtype=DT)
    res = []
    for impl in ("fast", "reference"):
        y = criss_cross_aggregate(q, k, v, impl=impl)
        grads = torch.autograd.grad((y * cot).sum(), [q, k, v])
        res.append(torch.cat([y.flatten(), *(g.flatten() for g in grads)]))
    assert _rel(res[0], res[1]) <= 1e-10


# -- the paper's rule, and mmcv ------------------------------------------------------------------


def _paper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y_u = Σ_{j∈Ω_u} softmax_j(q_uᵀk_j) v_j with Ω_u = the positions that differ from u in at
    most one coordinate (its row and column in 2d), each counted once."""
    size = q.shape[2:]
    grid = list(itertools.product(*(range(s) for s in size)))
    y = torch.zeros(v.shape, dtype=v.dtype)
    for b in range(q.shape[0]):
        for u in grid:
            keys = [j for j in grid if sum(a != c for a, c in zip(u, j, strict=True)) <= 1]
            assert len(keys) == num_criss_cross_keys(size)
            logits = torch.stack(
                [torch.dot(q[(b, slice(None), *u)], k[(b, slice(None), *j)]) for j in keys]
            )
            a = torch.exp(logits - logits.max())
            a = a / a.sum()
            y[(b, slice(None), *u)] = sum(
                a[n] * v[(b, slice(None), *j)] for n, j in enumerate(keys)
            )
    return y


@pytest.mark.parametrize("size", [(4, 3), (3, 2, 3), (5,), (1, 3)])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_matches_paper_rule(size, impl) -> None:
    q, k = torch.randn(2, 3, *size, dtype=DT), torch.randn(2, 3, *size, dtype=DT)
    v = torch.randn(2, 4, *size, dtype=DT)
    assert _rel(criss_cross_aggregate(q, k, v, impl=impl), _paper(q, k, v)) <= 1e-12


def _mmcv_cca() -> type[nn.Module]:
    """mmcv's pure-PyTorch ``CrissCrossAttention``, loaded from the installed file (the
    ``mmcv.ops`` package needs compiled ops; the class needs only ``mmcv.cnn.Scale``)."""
    mmcv_cnn = pytest.importorskip("mmcv.cnn")
    spec = importlib.util.find_spec("mmcv")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mmcv is not installed")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "cc_attention.py"
    tree = ast.parse(path.read_text())
    nodes = [
        n
        for n in tree.body
        if isinstance(n, (ast.ClassDef, ast.FunctionDef))
        and n.name in ("NEG_INF_DIAG", "CrissCrossAttention")
    ]
    for n in nodes:
        n.decorator_list = []  # the registry decorator
    namespace = {"torch": torch, "nn": nn, "F": torch.nn.functional, "Scale": mmcv_cnn.Scale}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["CrissCrossAttention"]


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("size", [(5, 7), (1, 4)])
def test_matches_mmcv(impl, size) -> None:
    """Same state dict, same output as mmseg's CCHead loop over mmcv's module (R = 2)."""
    peer = _mmcv_cca()(C).double()
    ours = _randomize(CrissCrossAttention(C, impl=impl, dtype=DT))
    assert set(peer.state_dict()) == set(ours.state_dict())
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(2, C, *size, dtype=DT)
    with torch.no_grad():
        want = peer(peer(x))
        assert _rel(ours(x), want) <= 1e-12
        assert float((want - x).abs().max()) > 1e-2


# -- the map: each position's lines, itself once -------------------------------------------------


@pytest.mark.parametrize("size", [(5, 3), (2, 3, 4), (6,)])
def test_attention_map_is_the_cross(size) -> None:
    block = _randomize(CrissCrossAttention(C, dims=len(size), zero_init=False, dtype=DT))
    x = torch.randn(2, C, *size, dtype=DT)
    n = math.prod(size)
    amap = block.attention_map(x)  # (B, N, N)
    assert amap.shape == (2, n, n)
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, n, dtype=DT), rtol=0, atol=1e-12)
    coords = torch.stack(torch.unravel_index(torch.arange(n), size), dim=1)  # (N, D)
    cross = (coords[:, None, :] != coords[None, :, :]).sum(-1) <= 1  # (N, N)
    assert bool((amap[:, ~cross] == 0).all())
    assert bool((amap[:, cross] > 0).all())
    assert int(cross[0].sum()) == num_criss_cross_keys(size)
    # the map of each step reproduces that step's aggregation
    h = x
    for step in range(2):
        w = block.attention_map(x, step=step)
        v = block.value_conv(h).flatten(2)  # (B, C, N)
        y = torch.einsum("bij,bcj->bci", w, v).reshape(h.shape)
        with torch.no_grad():
            torch.testing.assert_close(block.attend(h), y, rtol=1e-12, atol=1e-12)
            h = block.gamma(y) + h
    rows = block.attention_map(x, queries=[n - 1, 0, 2])
    torch.testing.assert_close(rows, amap[:, [n - 1, 0, 2]], rtol=0, atol=0)
    assert block.layout(size).num_keys == n


def test_joint_weights_count_the_self_position_once() -> None:
    q, k = torch.randn(2, 3, 4, 5, dtype=DT), torch.randn(2, 3, 4, 5, dtype=DT)
    w = criss_cross_weights(q, k)  # (B, H, W, H + W)
    assert w.shape == (2, 4, 5, 9)
    for h, i in itertools.product(range(4), range(5)):
        assert float(w[:, h, i, h].abs().max()) == 0.0  # the column's self entry is masked
        assert bool((w[:, h, i, 4 + i] > 0).all())  # the row keeps it
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5, dtype=DT), rtol=0, atol=1e-12)


def test_recurrence_shares_the_weights() -> None:
    two = _randomize(CrissCrossAttention(C, recurrence=2, dtype=DT))
    one = CrissCrossAttention(C, recurrence=1, dtype=DT)
    one.load_state_dict(two.state_dict())
    x = torch.randn(2, C, 4, 5, dtype=DT)
    with torch.no_grad():
        assert torch.equal(two(x), one(one(x)))
        torch.testing.assert_close(two.residual(x), two(x) - x, rtol=1e-12, atol=1e-12)


# -- identity at init ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_fresh_block_is_identity(dims, impl) -> None:
    for dtype in (torch.float32, DT):
        block = CrissCrossAttention(32, impl=impl, dims=dims, dtype=dtype)
        x = torch.randn(2, 32, *([3] * dims), dtype=dtype) * 10
        assert torch.equal(block(x), x)
        _randomize(block)
        block.reset_parameters()
        assert torch.equal(block(x), x)
    assert block.gamma.scale.item() == 0.0
    other = CrissCrossAttention(32, zero_init=False, dims=dims)
    assert other.gamma.scale.item() == 1.0
    x = torch.randn(2, 32, *([3] * dims))
    assert not torch.equal(other(x), x)


def test_parameter_names_match_mmcv() -> None:
    names = {n: tuple(p.shape) for n, p in CrissCrossAttention(64).named_parameters()}
    assert names == {
        "query_conv.weight": (8, 64, 1, 1),
        "query_conv.bias": (8,),
        "key_conv.weight": (8, 64, 1, 1),
        "key_conv.bias": (8,),
        "value_conv.weight": (64, 64, 1, 1),
        "value_conv.bias": (64,),
        "gamma.scale": (),
    }
    assert CrissCrossAttention(4).inner_channels == 1
    assert isinstance(CrissCrossAttention(16, dims=3).value_conv, nn.Conv3d)


# -- the fast path never forms the joint tensor --------------------------------------------------


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


@pytest.mark.parametrize("size", [(5, 7), (3, 4, 6), (9,)])
def test_fast_path_never_forms_the_joint_tensor(size, monkeypatch) -> None:
    """No tensor with a (ΣS_d) or (ΣS_d − D + 1) dimension, nor an N×N one, in forward and
    backward of the fast path; the reference has the joint (B, *S, ΣS_d) tensor."""
    # 1d runs the library's softmax attention; its query-blocked CPU kernel (C' ≠ C) holds
    # blocks of chunk × N logits: make them smaller than N here, as they are for large inputs
    monkeypatch.setattr(nonlocalnet.functional, "ATTENTION_CHUNK_ELEMENTS", 3 * size[0])
    n, joint = math.prod(size), sum(size)
    banned = {joint, num_criss_cross_keys(size)} if len(size) > 1 else set()
    assert not banned & {1, C, C // 8, *size, *(s * t for s, t in itertools.combinations(size, 2))}

    def offending(block: nn.Module) -> list[str]:
        x = torch.randn(1, C, *size, dtype=DT, requires_grad=True)
        with _Shapes() as rec:
            block(x).backward(torch.randn_like(x))
        return [
            f"{f}{s}"
            for f, s in rec.seen
            if banned & set(s) or (n, n) in set(itertools.pairwise(s))
        ]

    fast = _randomize(CrissCrossAttention(C, dims=len(size), dtype=DT))
    assert offending(fast) == []
    ref = CrissCrossAttention(C, dims=len(size), impl="reference", dtype=DT)
    assert offending(ref) != []


# -- torch.compile and ONNX ---------------------------------------------------------------------


def test_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    block = _randomize(CrissCrossAttention(16))
    x = torch.randn(2, 16, 5, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = compiled(x1), block(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    (g1,), (g2,) = torch.autograd.grad(y1.sum(), [x1]), torch.autograd.grad(y2.sum(), [x2])
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    block = _randomize(CrissCrossAttention(16))
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dims", [2, 3])
def test_onnx_export_matches_torch(dims, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    block = _randomize(CrissCrossAttention(16, dims=dims)).eval()
    x = torch.randn(2, 16, *((5, 6) if dims == 2 else (3, 4, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True)
    path = tmp_path / "cca.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = block(x)
    assert float((want - x).abs().max()) > 1e-2
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


# -- bfloat16 -----------------------------------------------------------------------------------


def test_bfloat16_autocast_close_to_float32() -> None:
    block = _randomize(CrissCrossAttention(16, zero_init=False), 0.2)
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
        ({"recurrence": 0}, "recurrence must be a positive int, got 0"),
        ({"inner_channels": 0}, "inner_channels must be a positive int"),
        ({"impl": "cuda"}, "unknown impl 'cuda'"),
        ({"dims": 0}, "unknown dims 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CrissCrossAttention(16, **kwargs)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        CrissCrossAttention(0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_inputs(dims) -> None:
    block = CrissCrossAttention(8, dims=dims)
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
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 2\), got 2"):
        block.attention_map(good, step=2)
    with pytest.raises(ValueError, match=rf"\[0, {3**dims}\)"):
        block.attention_map(good, queries=[-1])


def test_bad_functional_inputs() -> None:
    q, v = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    with pytest.raises(ValueError, match="key must have the shape of query"):
        criss_cross_aggregate(q, q[:, :2], v)
    with pytest.raises(ValueError, match=r"value must be \(B, C_v, \*S\)"):
        criss_cross_aggregate(q, q, v[..., :4])
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        criss_cross_aggregate(q[0, 0], q[0, 0], v[0, 0])
    with pytest.raises(TypeError, match="floating-point"):
        criss_cross_aggregate(q.long(), q, v)
    with pytest.raises(ValueError, match="unknown impl"):
        criss_cross_aggregate(q, q, v, impl="x")
