"""EMAU and em_attention: fast == reference == the official formula ≈ mmseg, bases maintenance,
the stopped gradient, identity at init, no N×N tensor, compile, ONNX, errors."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nonlocalnet.layers.ema import EMAU, em_attention, l2_normalise

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
C, K = 6, 4
SIZES = {1: [(7,), (1,)], 2: [(5, 3), (1, 4)], 3: [(3, 2, 5)]}
CASES = [(dims, size) for dims, sizes in SIZES.items() for size in sizes]


def _make(impl: str = "fast", dims: int = 2, **kw) -> EMAU:
    return EMAU(C, num_bases=K, impl=impl, dims=dims, dtype=DT, **kw)


def _randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * cot).sum(), [x, *params])
    return torch.cat([y.detach().flatten()] + [g.flatten() for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# -- fast == reference --------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "size"), CASES)
@pytest.mark.parametrize("detach_em", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_fast_equals_reference(dims, size, detach_em, train) -> None:
    fast = _randomize(_make("fast", dims, detach_em=detach_em)).train(train)
    ref = _make("reference", dims, detach_em=detach_em).train(train)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, C, *size, dtype=DT)
    cot = torch.randn_like(x)
    got, want = _outputs_and_grads(fast, x, cot), _outputs_and_grads(ref, x, cot)
    assert _rel(got, want) <= 1e-10
    # the bases moved (training) or stayed (eval) alike
    assert _rel(fast.mu, ref.mu) <= 1e-10
    with torch.no_grad():
        assert float((fast.residual(x)).abs().max()) > 1e-2


@pytest.mark.parametrize("num_stages", [1, 3])
def test_functional_fast_equals_reference(num_stages) -> None:
    x = torch.randn(2, 5, 17, dtype=DT, requires_grad=True)
    mu0 = l2_normalise(torch.randn(2, 5, 3, dtype=DT), 1).requires_grad_(True)
    res = []
    for impl in ("fast", "reference"):
        outs = em_attention(x, mu0, num_stages=num_stages, impl=impl)
        loss = sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=DT).reshape(o.shape)).sum() for o in outs
        )
        grads = torch.autograd.grad(loss, [x, mu0])
        res.append(
            torch.cat([*(o.detach().flatten() for o in outs), *(g.flatten() for g in grads)])
        )
    assert _rel(res[0], res[1]) <= 1e-10


# -- the official formula, and mmseg ------------------------------------------------------------


def _official_em(x: torch.Tensor, mu: torch.Tensor, stages: int) -> tuple[torch.Tensor, ...]:
    """EM written per basis: z_nk = e^{x_n·μ_k} / Σ_k', μ_k = Σ_n z_nk x_n / (ε + Σ_n z_nk),
    μ_k ← μ_k / (ε + ‖μ_k‖)."""
    for _ in range(stages):
        logits = torch.einsum("bcn,bck->bnk", x, mu)
        z = torch.exp(logits) / torch.exp(logits).sum(dim=2, keepdim=True)
        new = torch.empty_like(mu)
        for k in range(mu.shape[2]):
            m = (z[:, :, k][:, None, :] * x).sum(dim=2) / (1e-6 + z[:, :, k].sum(dim=1))[:, None]
            new[:, :, k] = m / (1e-6 + torch.sqrt((m * m).sum(dim=1, keepdim=True)))
        mu = new
    return torch.einsum("bck,bnk->bcn", mu, z), z, mu


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_em_matches_official_formula(impl) -> None:
    x = torch.randn(2, 5, 13, dtype=DT)
    mu = l2_normalise(torch.randn(2, 5, 3, dtype=DT), 1)
    for got, want in zip(
        em_attention(x, mu, num_stages=3, impl=impl), _official_em(x, mu, 3), strict=True
    ):
        assert _rel(got, want) <= 1e-12


def test_unit_matches_official_layout() -> None:
    """z = ReLU(x + BN(conv2(ReLU(x̃)))) with x̃ = EM(conv1(x), μ⁽⁰⁾), BN in eval mode."""
    block = _randomize(_make()).eval()
    x = torch.randn(2, C, 4, 5, dtype=DT)
    feats = torch.einsum("oc,bcn->bon", block.conv1.weight.flatten(1), x.flatten(2))
    feats = feats + block.conv1.bias[None, :, None]
    x_rec, z, _ = _official_em(feats, block.mu.expand(2, -1, -1), 3)
    h = torch.einsum("oc,bcn->bon", block.conv2[0].weight.flatten(1), F.relu(x_rec))
    bn = block.conv2[1]
    h = (h - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    h = h * bn.weight[:, None] + bn.bias[:, None]
    want = F.relu(x.flatten(2) + h).reshape(x.shape)
    with torch.no_grad():
        assert _rel(block(x), want) <= 1e-12
        torch.testing.assert_close(block.attention_map(x), z, rtol=1e-12, atol=1e-14)


def _mmseg_ema_module() -> type[nn.Module]:
    """mmseg's ``EMAModule``, loaded from the installed file (its package ``__init__`` needs
    compiled ops; the class needs torch alone)."""
    spec = importlib.util.find_spec("mmseg")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mmsegmentation is not installed")
    path = Path(spec.submodule_search_locations[0]) / "models" / "decode_heads" / "ema_head.py"
    tree = ast.parse(path.read_text())
    nodes = [
        n
        for n in tree.body
        if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in ("reduce_mean", "EMAModule")
    ]
    namespace = {"torch": torch, "nn": nn, "F": F, "math": math, "dist": torch.distributed}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["EMAModule"]


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_em_matches_mmseg(impl) -> None:
    """mmseg's EMAModule normalises with F.normalize (max(‖·‖, 1e-12)) where the official code
    adds ε = 1e-6: equal up to that ε, whose weight falls as the features grow."""
    peer = _mmseg_ema_module()(C, K, 3, 0.1).double().eval()
    ours = _make(impl)
    for scale, tol in ((3.0, 1e-5), (100.0, 1e-7)):
        with torch.no_grad():
            peer.bases.copy_(ours.mu)
            feats = torch.randn(2, C, 6, 7, dtype=DT) * scale
            want = peer(feats)
            mu0 = ours.mu.repeat(2, 1, 1)
            got, _, _ = em_attention(feats.flatten(2), mu0, num_stages=3, impl=impl)
        assert _rel(got.reshape(want.shape), want) <= tol


# -- bases maintenance --------------------------------------------------------------------------


def test_bases_move_by_moving_average_in_training_only() -> None:
    block = _randomize(_make(momentum=0.9))
    x = torch.randn(3, C, 4, 5, dtype=DT)
    mu0 = block.mu.clone()
    with torch.no_grad():
        _, _, mu_t = block.em(x)
    block.eval()
    block(x)
    assert torch.equal(block.mu, mu0)  # eval: untouched
    block.train()
    block.residual(x)
    assert torch.equal(block.mu, mu0)  # the branch alone does not update
    block(x)
    torch.testing.assert_close(
        block.mu, 0.9 * mu0 + 0.1 * mu_t.mean(0, keepdim=True), rtol=1e-13, atol=1e-15
    )
    assert not torch.equal(block.mu, mu0)


def test_bases_and_responsibilities_are_normalised() -> None:
    block = _randomize(_make())
    x = torch.randn(2, C, 5, 5, dtype=DT)
    x_rec, z, mu = block.em(x)
    torch.testing.assert_close(z.sum(-1), torch.ones(2, 25, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(mu.norm(dim=1), torch.ones(2, K, dtype=DT), rtol=1e-5, atol=0)
    torch.testing.assert_close(block.mu.norm(dim=1), torch.ones(1, K, dtype=DT), rtol=1e-5, atol=0)
    assert z.shape == (2, 25, K) and x_rec.shape == x.shape
    rows = block.attention_map(x, queries=[24, 3])
    torch.testing.assert_close(rows, z[:, [24, 3]], rtol=1e-12, atol=1e-14)


def test_detached_em_sends_no_gradient_through_the_bases() -> None:
    """Official: EM and the reconstruction without autograd, so conv1 is frozen and the gradient
    reaches x through the identity only: dz/dx = 1[z > 0]."""
    block = _randomize(_make())
    assert not any(p.requires_grad for p in block.conv1.parameters())
    assert all(p.requires_grad for p in block.conv2.parameters())
    x = torch.randn(2, C, 4, 5, dtype=DT, requires_grad=True)
    out = block(x)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(gx, (out > 0).to(DT))
    live = _randomize(_make(detach_em=False))
    assert all(p.requires_grad for p in live.conv1.parameters())
    out = live(x)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert not torch.equal(gx, (out > 0).to(DT))


# -- identity at init ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_fresh_unit_is_identity_on_nonnegative_inputs(dims, impl) -> None:
    for dtype in (torch.float32, DT):
        block = EMAU(32, impl=impl, dims=dims, dtype=dtype)
        x = torch.randn(2, 32, *([3] * dims), dtype=dtype) * 10
        assert torch.equal(block(x.relu()), x.relu())  # what it receives after a ReLU
        assert torch.equal(block(x), x.relu())  # ReLU(x + 0)
        _randomize(block)
        block.reset_parameters()
        block.eval()
        assert torch.equal(block(x.relu()), x.relu())
    official = EMAU(32, zero_init=False, dims=dims)
    assert torch.equal(official.conv2[1].weight, torch.ones(32))
    x = torch.randn(2, 32, *([3] * dims)).relu()
    assert not torch.equal(official(x), x)


def test_names_and_init() -> None:
    block = EMAU(64)
    names = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert names == {
        "conv1.weight": (64, 64, 1, 1),
        "conv1.bias": (64,),
        "conv2.0.weight": (64, 64, 1, 1),
        "conv2.1.weight": (64,),
        "conv2.1.bias": (64,),
    }
    assert tuple(block.mu.shape) == (1, 64, 64) and "mu" in block.state_dict()
    assert block.num_bases == 64 and block.num_stages == 3 and block.momentum == 0.9
    std = block.conv2[0].weight.detach().std().item()
    assert abs(std - math.sqrt(2 / 64)) < 0.1 * math.sqrt(2 / 64)  # N(0, 2/C)
    assert isinstance(EMAU(8, dims=3).conv2[1], nn.BatchNorm3d)


# -- no N×N tensor --------------------------------------------------------------------------------


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


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_no_position_by_position_tensor(impl) -> None:
    """Neither path forms an N×N tensor: the N×K responsibilities are the whole map."""
    block = _randomize(_make(impl, detach_em=False))
    x = torch.randn(1, C, 5, 7, dtype=DT, requires_grad=True)  # N = 35
    with _Shapes() as rec:
        block(x).backward(torch.randn_like(x))
    pairs = [s for _, s in rec.seen if (35, 35) in set(itertools.pairwise(s))]
    assert pairs == []
    assert any(K in s and 35 in s for _, s in rec.seen)  # the N×K map is there


# -- torch.compile and ONNX ---------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_compile_fullgraph_matches_eager(train) -> None:
    torch._dynamo.reset()
    block = _randomize(EMAU(16, num_bases=8, zero_init=False), 0.2).train(train)
    twin = EMAU(16, num_bases=8).train(train)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 16, 5, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = compiled(x1), twin(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.mu, twin.mu, rtol=1e-5, atol=1e-6)  # the buffer update
    (g1,), (g2,) = torch.autograd.grad(y1.sum(), [x1]), torch.autograd.grad(y2.sum(), [x2])
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    block = _randomize(EMAU(16, num_bases=8, zero_init=False), 0.2).eval()
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5
        )


def test_onnx_export_matches_torch(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    block = _randomize(EMAU(16, num_bases=8, zero_init=False), 0.2).eval()
    x = torch.randn(2, 16, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True)
    path = tmp_path / "emau.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = block(x)
    assert float((want - x.relu()).abs().max()) > 1e-2
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


# -- bfloat16 -----------------------------------------------------------------------------------


def test_bfloat16_autocast_close_to_float32() -> None:
    block = _randomize(EMAU(16, num_bases=8, zero_init=False), 0.2).eval()
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
        ({"num_bases": 0}, "num_bases must be a positive int, got 0"),
        ({"num_stages": 0}, "num_stages must be a positive int, got 0"),
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\], got 1.5"),
        ({"momentum": True}, "momentum must be a number"),
        ({"impl": "em"}, "unknown impl 'em'"),
        ({"dims": 4}, "unknown dims 4"),
    ],
)
def test_bad_constructor_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EMAU(8, **kwargs)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        EMAU(0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_inputs(dims) -> None:
    block = EMAU(8, num_bases=4, dims=dims)
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
    with pytest.raises(ValueError, match=rf"\[0, {3**dims}\)"):
        block.attention_map(good, queries=[3**dims])


def test_bad_functional_inputs() -> None:
    x, mu = torch.randn(2, 5, 9), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="same B and C"):
        em_attention(x, mu[:, :4], num_stages=1)
    with pytest.raises(ValueError, match="num_stages must be a positive int"):
        em_attention(x, mu, num_stages=0)
    with pytest.raises(ValueError, match="unknown impl"):
        em_attention(x, mu, num_stages=1, impl="x")
