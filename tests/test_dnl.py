"""DisentangledNonLocal: fast == reference == the paper's formula == mmseg, the disentanglement
(the unary term carries the query-independent part), identity at init, no N×N tensor on the fast
path, compile, ONNX, errors."""

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

from nonlocalnet import NonLocal2d
from nonlocalnet.analysis import query_independence
from nonlocalnet.layers.dnl import (
    DisentangledNonLocal1d,
    DisentangledNonLocal2d,
    DisentangledNonLocal3d,
    DisentangledNonLocalNd,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
C, CI = 6, 4
SIZES = {1: [(7,), (2,)], 2: [(5, 3), (1, 4)], 3: [(3, 2, 5)]}
CASES = [(dims, size) for dims, sizes in SIZES.items() for size in sizes]
#: (pairwise, temperature, use_scale)
FORMS = [
    ("embedded_gaussian", None, None),  # mmseg's DNLHead: τ = 0.05, scaled by C'^-1/2
    ("embedded_gaussian", 1.0, False),
    ("dot_product", None, None),
]


def _make(impl: str = "fast", dims: int = 2, form=FORMS[0], **kw) -> DisentangledNonLocalNd:
    pairwise, temperature, use_scale = form
    return DisentangledNonLocalNd(
        C,
        CI,
        pairwise=pairwise,
        temperature=temperature,
        use_scale=use_scale,
        impl=impl,
        dims=dims,
        dtype=DT,
        **kw,
    )


def _randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Random parameters (zero-initialised ones included) and BN running statistics."""
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


def _conv(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv on (B, C, N) tokens, written out."""
    y = torch.einsum("oc,bcn->bon", conv.weight.flatten(1), t)
    return y if conv.bias is None else y + conv.bias[None, :, None]


# -- fast == reference --------------------------------------------------------------------------


@pytest.mark.parametrize(("dims", "size"), CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_fast_equals_reference(dims, size, form, norm, train) -> None:
    fast = _randomize(_make("fast", dims, form, norm=norm, zero_init=False)).train(train)
    ref = _make("reference", dims, form, norm=norm).train(train)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, C, *size, dtype=DT)
    cot = torch.randn_like(x)
    assert _rel(_outputs_and_grads(fast, x, cot), _outputs_and_grads(ref, x, cot)) <= 1e-10
    with torch.no_grad():
        assert float((fast(x) - x).abs().max()) > 1e-2  # the branch is not trivially zero


# -- reference == the paper's formula, and == mmseg ---------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_matches_paper_formula(form, impl) -> None:
    """ω_ij = softmax_j(s(q_i − μ_q)ᵀ(k_j − μ_k)/τ) + softmax_j(w_mᵀx_j), one query at a time."""
    block = _randomize(_make(impl, 2, form, norm=False))
    x = torch.randn(2, C, 4, 3, dtype=DT)
    xs = x.flatten(2)  # (B, C, N)
    q, k, g = _conv(block.theta, xs), _conv(block.phi, xs), _conv(block.g, xs)  # (B, C', N)
    q = q - q.mean(dim=2, keepdim=True)
    k = k - k.mean(dim=2, keepdim=True)
    mask = _conv(block.conv_mask, xs)[:, 0]  # (B, N)
    n = xs.shape[2]
    pairwise, temperature, use_scale = form
    y = torch.zeros(2, CI, n, dtype=DT)
    for b in range(2):
        unary = torch.exp(mask[b]) / torch.exp(mask[b]).sum()  # (N,)
        for i in range(n):
            logits = torch.stack([torch.dot(q[b, :, i], k[b, :, j]) for j in range(n)])
            if pairwise == "embedded_gaussian":
                s = (CI**-0.5 if use_scale in (None, True) else 1.0) / (temperature or 0.05)
                pair = torch.exp(s * logits) / torch.exp(s * logits).sum()
            else:
                pair = logits / n
            y[b, :, i] = ((pair + unary)[None, :] * g[b]).sum(dim=1)
    want = xs + _conv(block.conv_out, y)
    with torch.no_grad():
        assert _rel(block(x), want.reshape(x.shape)) <= 1e-12


def _mmseg_dnl() -> type[nn.Module]:
    """mmseg's ``DisentangledNonLocal2d``, loaded from the installed file (its package
    ``__init__`` needs compiled ops; the class itself needs only mmcv's ``NonLocal2d``)."""
    mmcv_cnn = pytest.importorskip("mmcv.cnn")
    spec = importlib.util.find_spec("mmseg")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mmsegmentation is not installed")
    path = Path(spec.submodule_search_locations[0]) / "models" / "decode_heads" / "dnl_head.py"
    tree = ast.parse(path.read_text())
    nodes = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DisentangledNonLocal2d"
    ]
    namespace = {"torch": torch, "nn": nn, "NonLocal2d": mmcv_cnn.NonLocal2d}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["DisentangledNonLocal2d"]


def _to_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> mmseg's, as the module docstring says."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("theta", "phi", "g", "conv_out"):
            key = f"{head}.conv.{rest}"
        elif head == "norm":
            key = f"conv_out.bn.{rest}"
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("mode", "temperature"), [("embedded_gaussian", 0.25), ("dot_product", None)]
)
@pytest.mark.parametrize("train", [True, False])
def test_matches_mmseg(mode, temperature, train) -> None:
    """Same weights, same output as mmseg's DNL (τ = 0.25 here: mmseg divides by a float32
    tensor τ, and 0.25 is exact in float32, 0.05 is not)."""
    peer_cls = _mmseg_dnl()
    kwargs = {"temperature": temperature if temperature is not None else 0.05}
    c = 2 * CI  # mmseg's C' = C / reduction
    peer = peer_cls(c, reduction=2, use_scale=True, norm_cfg={"type": "BN"}, mode=mode, **kwargs)
    peer = peer.double().train(train)
    ours = DisentangledNonLocal2d(
        c, pairwise=mode, temperature=temperature, zero_init=False, dtype=DT
    )
    ours = _randomize(ours).train(train)
    mapped = _to_mmseg(ours.state_dict())
    assert set(mapped) == set(peer.state_dict())  # every tensor has its counterpart
    peer.load_state_dict(mapped)
    x = torch.randn(2, c, 5, 4, dtype=DT)
    with torch.no_grad():
        want = peer(x.clone())
        assert _rel(ours(x), want) <= 1e-12
        assert float((want - x).abs().max()) > 1e-2


# -- the disentanglement: the unary term carries the query-independent part --------------------


class _Term(nn.Module):
    """One term of the DNL map, for :func:`query_independence`."""

    def __init__(self, block: DisentangledNonLocalNd, term: str) -> None:
        super().__init__()
        self.block, self.term = block, term

    def attention_map(self, x, queries=None):
        return self.block.attention_map(x, queries, term=self.term)

    def residual(self, x):
        return self.block.residual(x)

    def layout(self, size):
        return self.block.layout(size)


def _twins(
    x: torch.Tensor, theta_channels: slice = slice(None)
) -> tuple[NonLocal2d, DisentangledNonLocalNd]:
    """An embedded-Gaussian NL block and a DNL block (τ = 1, same scale s) with the same θ, φ,
    g, W_z, whose unary projection is w_m = s·W_φᵀμ_q, b_m = s·μ_qᵀb_φ for the input ``x``
    (sample 0): then w_mᵀx_j + b_m = s·μ_qᵀk_j. θ reads only ``theta_channels``."""
    nl = _randomize(NonLocal2d(C, CI, use_scale=True, norm=False, zero_init=False, dtype=DT))
    dnl = _make("fast", 2, ("embedded_gaussian", 1.0, True), norm=False)
    with torch.no_grad():
        kept = nl.theta.weight[:, theta_channels].clone()
        nl.theta.weight.zero_()
        nl.theta.weight[:, theta_channels] = kept
        for name in ("theta", "phi", "g", "conv_out"):
            getattr(dnl, name).weight.copy_(getattr(nl, name).weight)
            getattr(dnl, name).bias.copy_(getattr(nl, name).bias)
        s = CI**-0.5
        mu_q = _conv(nl.theta, x.flatten(2)).mean(dim=2)[0]  # (C',)
        w_phi = nl.phi.weight.flatten(1)  # (C', C)
        dnl.conv_mask.weight.copy_((s * w_phi.T @ mu_q).reshape(dnl.conv_mask.weight.shape))
        dnl.conv_mask.bias.fill_(float(s * mu_q @ nl.phi.bias))
    return nl, dnl


def test_query_independent_nl_map_lives_in_the_unary_term() -> None:
    """Constructed input: θ reads only channels that are constant over the positions, so every
    query is the same and the NL map is query-independent. DNL's whitened term is then uniform
    (it carries nothing) and its unary term is the whole NL map."""
    x = torch.randn(1, C, 5, 4, dtype=DT)
    x[:, :3] = torch.randn(1, 3, 1, 1, dtype=DT)  # channels 0-2: the same at every position
    nl, dnl = _twins(x, theta_channels=slice(0, 3))  # θ(x_i) = W_θ[:, :3] a + b_θ for all i
    nl_map = nl.attention_map(x)  # (1, N, N)
    pair = dnl.attention_map(x, term="pairwise")
    unary = dnl.attention_map(x, term="unary")
    torch.testing.assert_close(pair, torch.full_like(pair, 1 / 20), rtol=0, atol=1e-12)
    torch.testing.assert_close(unary, nl_map, rtol=1e-10, atol=1e-12)
    assert float(nl_map.max() / nl_map.min()) > 2  # and that map is far from uniform
    # GCNet's analysis: the NL map and DNL's unary term are query-independent, the inputs not
    gen = torch.Generator().manual_seed(0)
    assert query_independence(nl, x, 200, gen).attention_distance <= 1e-12
    qi_unary = query_independence(_Term(dnl, "unary"), x, 200, gen)
    assert qi_unary.attention_distance == 0.0
    assert qi_unary.input_distance > 0.05


def test_nl_map_factorises_into_the_two_terms() -> None:
    """On any input: softmax_j(s q_iᵀk_j) = normalise_j(whitened_ij · unary_j) when the unary
    projection is s·μ_qᵀk_j (DNL's eq.: the constant-in-j terms cancel in the softmax)."""
    x = torch.randn(1, C, 5, 4, dtype=DT)
    nl, dnl = _twins(x)
    nl_map = nl.attention_map(x)
    prod = dnl.attention_map(x, term="pairwise") * dnl.attention_map(x, term="unary")
    torch.testing.assert_close(nl_map, prod / prod.sum(-1, keepdim=True), rtol=1e-10, atol=1e-14)
    gen = torch.Generator().manual_seed(0)
    assert query_independence(_Term(dnl, "unary"), x, 200, gen).attention_distance == 0.0
    assert query_independence(_Term(dnl, "pairwise"), x, 200, gen).attention_distance > 1e-3


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_whitened_logits_have_no_query_independent_part(dims) -> None:
    """Σ_i (q_i − μ_q)ᵀ(k_j − μ_k) = 0 for every key j: no unary component is left in them."""
    block = _randomize(_make("fast", dims))
    x = torch.randn(2, C, *SIZES[dims][0], dtype=DT) + 3.0
    with torch.no_grad():
        q, k, _, _ = block.embed(x)
        raw = block.theta(x).flatten(2).transpose(1, 2) @ block.phi(x).flatten(2)  # unwhitened
    logits = q @ k.transpose(1, 2)  # (B, N, N)
    scale = float(logits.abs().max())
    assert float(logits.mean(dim=1).abs().max()) <= 1e-13 * scale
    assert float(raw.mean(dim=1).abs().max()) > 1e-2 * float(raw.abs().max())


def test_attention_map_terms_and_reconstruction() -> None:
    block = _randomize(_make("fast", 2, norm=False, zero_init=False))
    x = torch.randn(2, C, 5, 3, dtype=DT)
    both = block.attention_map(x)
    pair = block.attention_map(x, term="pairwise")
    unary = block.attention_map(x, term="unary")
    assert both.shape == pair.shape == unary.shape == (2, 15, 15)
    torch.testing.assert_close(both, pair + unary, rtol=0, atol=0)
    torch.testing.assert_close(both.sum(-1), torch.full((2, 15), 2.0, dtype=DT), rtol=0, atol=1e-12)
    assert torch.equal(unary[:, 0], unary[:, 7])  # one row for every query
    _, _, v, _ = block.embed(x)
    y = (both @ v).transpose(1, 2).reshape(2, CI, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(block.nonlocal_op(x), y, rtol=1e-12, atol=1e-12)
    rows = block.attention_map(x, queries=[14, 2, 2], chunk_size=2)
    torch.testing.assert_close(rows, both[:, [14, 2, 2]], rtol=1e-12, atol=1e-14)
    assert block.layout((5, 3)).num_keys == 15


# -- identity at init ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product"])
def test_fresh_block_is_identity(dims, norm, pairwise) -> None:
    for dtype in (torch.float32, DT):
        block = DisentangledNonLocalNd(16, pairwise=pairwise, norm=norm, dims=dims, dtype=dtype)
        x = torch.randn(2, 16, *([3] * dims), dtype=dtype) * 10
        assert torch.equal(block(x), x)
        block.eval()
        assert torch.equal(block(x), x)
        _randomize(block)
        block.reset_parameters()
        assert torch.equal(block(x), x)
    fresh = DisentangledNonLocalNd(16, norm=norm, dims=dims)
    assert fresh.theta.weight.abs().sum() > 0 and fresh.conv_mask.weight.abs().sum() > 0
    assert not torch.equal(DisentangledNonLocalNd(16, zero_init=False, dims=dims)(x.float()), x)


def test_submodules_and_defaults() -> None:
    block = DisentangledNonLocal2d(64)
    names = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert names == {
        "theta.weight": (32, 64, 1, 1),
        "theta.bias": (32,),
        "phi.weight": (32, 64, 1, 1),
        "phi.bias": (32,),
        "g.weight": (32, 64, 1, 1),
        "g.bias": (32,),
        "conv_mask.weight": (1, 64, 1, 1),
        "conv_mask.bias": (1,),
        "conv_out.weight": (64, 32, 1, 1),  # no bias before the norm, as mmseg
        "norm.weight": (64,),
        "norm.bias": (64,),
    }
    assert block.scale == pytest.approx(32**-0.5 / 0.05, rel=1e-15)
    assert DisentangledNonLocal2d(64, use_scale=False).scale == pytest.approx(20.0, rel=1e-15)
    assert DisentangledNonLocal2d(64, pairwise="dot_product").scale == 1.0
    assert DisentangledNonLocal2d(64, norm=False).conv_out.bias is not None
    assert isinstance(DisentangledNonLocal3d(8).norm, nn.BatchNorm3d)
    assert DisentangledNonLocal1d(8).dims == 1


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


def _map_shaped(block: nn.Module, x: torch.Tensor, n: int) -> list[str]:
    x = x.clone().requires_grad_(True)
    with _Shapes() as rec:
        block(x).backward(torch.randn_like(x))
    return [f"{f}{s}" for f, s in rec.seen if (n, n) in set(itertools.pairwise(s))]


@pytest.mark.parametrize("form", FORMS)
def test_fast_path_never_forms_the_map(form) -> None:
    x = torch.randn(1, C, 5, 7, dtype=DT)  # N = 35
    fast = _randomize(_make("fast", 2, form, zero_init=False))
    assert _map_shaped(fast, x, 35) == []
    ref = _make("reference", 2, form)
    assert _map_shaped(ref, x, 35) != []  # the check does see a materialised map


# -- torch.compile and ONNX ---------------------------------------------------------------------


def _float_block(**kw) -> DisentangledNonLocalNd:
    torch.manual_seed(0)
    block = DisentangledNonLocal2d(8, zero_init=False, temperature=0.5, **kw)
    return _randomize(block, 0.3).eval()


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product"])
def test_compile_fullgraph_matches_eager(pairwise) -> None:
    torch._dynamo.reset()
    kw = {"temperature": None} if pairwise == "dot_product" else {}
    block = DisentangledNonLocal2d(8, pairwise=pairwise, zero_init=False, **kw)
    block = _randomize(block, 0.3).train()
    x = torch.randn(2, 8, 5, 6)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = compiled(x1), block(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    (g1,), (g2,) = torch.autograd.grad(y1.sum(), [x1]), torch.autograd.grad(y2.sum(), [x2])
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    block = _float_block()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5
        )


def test_onnx_export_matches_torch(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    block = _float_block()
    x = torch.randn(2, 8, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True)
    path = tmp_path / "dnl.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = block(x)
    assert float((want - x).abs().max()) > 1e-2
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


# -- bfloat16 -----------------------------------------------------------------------------------


def test_bfloat16_autocast_close_to_float32() -> None:
    block = _randomize(DisentangledNonLocal2d(16, zero_init=False, temperature=0.5), 0.2).train()
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
        ({"pairwise": "gaussian"}, "unknown pairwise 'gaussian'"),
        ({"pairwise": "concatenation"}, "unknown pairwise"),
        ({"temperature": 0.0}, "temperature must be a positive finite number, got 0.0"),
        ({"temperature": -1}, "temperature must be a positive"),
        ({"temperature": math.inf}, "temperature must be a positive finite"),
        ({"pairwise": "dot_product", "temperature": 0.05}, "apply to pairwise='embedded_gaussian'"),
        ({"pairwise": "dot_product", "use_scale": True}, "apply to pairwise='embedded_gaussian'"),
        ({"impl": "flash"}, "unknown impl 'flash'"),
        ({"dims": 4}, "unknown dims 4"),
        ({"inner_channels": 0}, "inner_channels must be a positive int"),
    ],
)
def test_bad_constructor_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DisentangledNonLocalNd(8, **kwargs)


def test_bad_constructor_types() -> None:
    with pytest.raises(ValueError, match="channels must be a positive int"):
        DisentangledNonLocal2d(0)
    with pytest.raises(TypeError, match="norm"):
        DisentangledNonLocal2d(8, norm="batch")
    with pytest.raises(TypeError, match="dims is fixed to 2"):
        DisentangledNonLocal2d(8, dims=3)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bad_inputs(dims) -> None:
    block = DisentangledNonLocalNd(8, dims=dims)
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
    n = 3**dims
    with pytest.raises(ValueError, match=rf"\[0, {n}\)"):
        block.attention_map(good, queries=[n])
    with pytest.raises(ValueError, match="unknown term 'query'"):
        block.attention_map(good, term="query")
    with pytest.raises(ValueError, match="chunk_size"):
        block.attention_map(good, chunk_size=0)
