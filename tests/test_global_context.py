"""SimplifiedNonLocal, GlobalContext and SqueezeExcite: formulas, fast == reference, special cases."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet import GlobalContext, NonLocal1d, NonLocal2d, SimplifiedNonLocal, SqueezeExcite
from nonlocalnet.layers.global_context import attention_pool

SIZES = {1: (7,), 2: (4, 5), 3: (2, 3, 4)}


def _randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Random values for every parameter (zero-initialised ones included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _all_outputs_and_grads(module: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """Forward output and the gradients of <output, cot> w.r.t. x and every parameter, as one vector."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((y * cot).sum(), [x, *params])
    return torch.cat([y.detach().flatten()] + [g.flatten() for g in grads])


def _fast_vs_reference(make, x: torch.Tensor) -> float:
    fast = _randomize(make("fast")).double()
    ref = make("reference").double()
    ref.load_state_dict(fast.state_dict())
    x = x.double()
    cot = torch.randn_like(fast(x))
    a = _all_outputs_and_grads(fast, x, cot)
    b = _all_outputs_and_grads(ref, x, cot)
    return float((a - b).norm() / b.norm())


# -- fast == reference ----------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_snl_fast_equals_reference(dims: int) -> None:
    x = torch.randn(2, 6, *SIZES[dims])
    err = _fast_vs_reference(lambda impl: SimplifiedNonLocal(6, impl=impl, dims=dims), x)
    assert err <= 1e-10


GC_OPTIONS = list(
    itertools.product(["att", "avg"], [("add",), ("mul",), ("mul", "add")], [True, False])
)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("pooling", "fusion", "layer_norm"), GC_OPTIONS)
def test_gc_fast_equals_reference(dims, pooling, fusion, layer_norm) -> None:
    x = torch.randn(2, 8, *SIZES[dims])

    def make(impl: str) -> GlobalContext:
        return GlobalContext(
            8,
            ratio=1 / 4,
            pooling=pooling,
            fusion=fusion,
            layer_norm=layer_norm,
            impl=impl,
            dims=dims,
        )

    assert _fast_vs_reference(make, x) <= 1e-10


def test_attention_pool_fast_equals_reference_and_formula() -> None:
    x = torch.randn(3, 5, 11, dtype=torch.float64)
    logits = torch.randn(3, 11, dtype=torch.float64) * 3
    w = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    expected = torch.stack([sum(w[b, j] * x[b, :, j] for j in range(11)) for b in range(3)])
    for impl in ("fast", "reference"):
        torch.testing.assert_close(
            attention_pool(x, logits, impl=impl), expected, rtol=1e-12, atol=1e-12
        )


# -- reference against the formulas written out -----------------------------------------------


def _conv1x1(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv on (B, C, N) tokens, written out."""
    w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])
    return torch.einsum("oc,bcn->bon", w, t) + conv.bias[None, :, None]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_snl_reference_matches_formula(dims: int) -> None:
    block = _randomize(SimplifiedNonLocal(4, impl="reference", dims=dims)).double()
    x = torch.randn(2, 4, *SIZES[dims], dtype=torch.float64)
    xs = x.flatten(2)  # (B, C, N)
    logits = _conv1x1(block.conv_mask, xs)[:, 0]  # (B, N)
    w = torch.exp(logits - logits.max(-1, keepdim=True).values)
    w = w / w.sum(-1, keepdim=True)
    c = (xs * w[:, None, :]).sum(-1)  # (B, C)
    z = xs + _conv1x1(block.conv_value, c[:, :, None])  # broadcast over positions
    torch.testing.assert_close(block(x), z.reshape(x.shape), rtol=1e-12, atol=1e-12)


def _transform_formula(seq: nn.Sequential, c: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    t = _conv1x1(seq[0], c)  # (B, C·r, 1)
    if layer_norm:
        mu = t.mean(dim=(1, 2), keepdim=True)
        var = ((t - mu) ** 2).mean(dim=(1, 2), keepdim=True)
        ln = seq[1]
        t = (t - mu) / torch.sqrt(var + ln.eps) * ln.weight.reshape(1, -1, 1) + ln.bias.reshape(
            1, -1, 1
        )
    t = torch.clamp(t, min=0)
    return _conv1x1(seq[3], t)  # (B, C, 1)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("pooling", "fusion", "layer_norm"), GC_OPTIONS)
def test_gc_reference_matches_formula(dims, pooling, fusion, layer_norm) -> None:
    block = GlobalContext(
        8,
        ratio=1 / 4,
        pooling=pooling,
        fusion=fusion,
        layer_norm=layer_norm,
        impl="reference",
        dims=dims,
    )
    block = _randomize(block).double()
    x = torch.randn(2, 8, *SIZES[dims], dtype=torch.float64)
    xs = x.flatten(2)  # (B, C, N)
    if pooling == "att":
        logits = _conv1x1(block.conv_mask, xs)[:, 0]
        w = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    else:
        w = torch.full(xs.shape[::2], 1.0 / xs.shape[2], dtype=torch.float64)
    c = (xs * w[:, None, :]).sum(-1)[:, :, None]  # (B, C, 1)
    z = xs
    if "mul" in fusion:
        z = z * torch.sigmoid(_transform_formula(block.transform_mul, c, layer_norm))
    if "add" in fusion:
        z = z + _transform_formula(block.transform_add, c, layer_norm)
    torch.testing.assert_close(block(x), z.reshape(x.shape), rtol=1e-12, atol=1e-12)


def test_fusion_order_is_multiply_first() -> None:
    a = _randomize(GlobalContext(8, fusion=("add", "mul"), ratio=1 / 4))
    b = GlobalContext(8, fusion=("mul", "add"), ratio=1 / 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 3, 3)
    assert a.fusion == ("mul", "add")
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = a.context(x)
    expected = x * torch.sigmoid(a.transform_mul(c)) + a.transform_add(c)
    # the fast path runs the transforms as matrix products on the (B, C) context: the same
    # numbers up to float32 rounding
    torch.testing.assert_close(a(x), expected, rtol=1e-6, atol=1e-6)


# -- special cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gc_avg_mul_without_layer_norm_is_squeeze_excite(dims: int) -> None:
    gc = _randomize(
        GlobalContext(16, ratio=1 / 4, pooling="avg", fusion=("mul",), layer_norm=False, dims=dims)
    )
    se = SqueezeExcite(16, ratio=1 / 4, dims=dims)
    with torch.no_grad():
        se.fc1.weight.copy_(gc.transform_mul[0].weight)
        se.fc1.bias.copy_(gc.transform_mul[0].bias)
        se.fc2.weight.copy_(gc.transform_mul[3].weight)
        se.fc2.bias.copy_(gc.transform_mul[3].bias)
    x = torch.randn(2, 16, *SIZES[dims])
    assert torch.equal(gc(x), se(x))
    # and the SE block is what its formula says
    s = se.fc2.weight.flatten(1) @ F.relu(
        se.fc1.weight.flatten(1) @ x.flatten(2).mean(-1).T + se.fc1.bias[:, None]
    )
    s = s + se.fc2.bias[:, None]  # (C, B)
    expected = x * torch.sigmoid(s.T).reshape(2, 16, *([1] * dims))
    torch.testing.assert_close(se(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("nl_cls", "size"), [(NonLocal1d, (9,)), (NonLocal2d, (4, 5))])
def test_snl_is_nl_with_query_independent_map(nl_cls, size) -> None:
    """An embedded-Gaussian NL whose θ(x_i) is a constant has one map for every query: SNL."""
    c = 6
    snl = _randomize(SimplifiedNonLocal(c, dims=len(size))).double()
    nl = nl_cls(c, inner_channels=c, use_scale=False, norm=False).double()
    _randomize(nl)
    with torch.no_grad():
        # θ(x_i) = e_0 for every i, so θ_iᵀφ_j = φ_0(x_j) = W_k x_j + b_k (row 0 of φ).
        nl.theta.weight.zero_()
        nl.theta.bias.zero_()
        nl.theta.bias[0] = 1.0
        nl.phi.weight[0].copy_(snl.conv_mask.weight[0])
        nl.phi.bias[0] = snl.conv_mask.bias[0]
        # g = identity, so y_i = Σ_j w_j x_j = c; W_z = W_v.
        nl.g.weight.copy_(torch.eye(c, dtype=torch.float64).reshape(nl.g.weight.shape))
        nl.g.bias.zero_()
        nl.conv_out.weight.copy_(snl.conv_value.weight)
        nl.conv_out.bias.copy_(snl.conv_value.bias)
    x = torch.randn(2, c, *size, dtype=torch.float64)
    torch.testing.assert_close(nl(x), snl(x), rtol=1e-12, atol=1e-12)
    # the NL map is the SNL map, repeated for every query
    maps = nl.attention_map(x)  # (B, N, N)
    torch.testing.assert_close(maps, snl.attention_map(x).expand_as(maps), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fresh_blocks(dims: int) -> None:
    x = torch.randn(2, 32, *SIZES[dims])
    assert torch.equal(SimplifiedNonLocal(32, dims=dims)(x), x)
    assert torch.equal(GlobalContext(32, dims=dims)(x), x)
    assert torch.equal(GlobalContext(32, pooling="avg", dims=dims)(x), x)
    # multiplication by sigmoid(0) = 1/2, as the official code
    assert torch.equal(GlobalContext(32, fusion=("mul",), dims=dims)(x), x * 0.5)
    assert torch.equal(GlobalContext(32, fusion=("mul", "add"), dims=dims)(x), x * 0.5)


def test_zero_init_survives_and_is_optional() -> None:
    gc = GlobalContext(32)
    assert gc.transform_add[3].weight.abs().sum() == 0 and gc.transform_add[3].bias.abs().sum() == 0
    assert gc.transform_add[0].weight.abs().sum() > 0
    assert gc.conv_mask.weight.abs().sum() > 0
    gc2 = GlobalContext(32, zero_init=False)
    assert gc2.transform_add[3].weight.abs().sum() > 0
    snl = SimplifiedNonLocal(32)
    assert snl.conv_value.weight.abs().sum() == 0 and snl.conv_value.bias.abs().sum() == 0
    x = torch.randn(1, 32, 3, 3)
    assert not torch.equal(SimplifiedNonLocal(32, zero_init=False)(x), x)
    _randomize(gc)
    gc.reset_parameters()
    assert torch.equal(gc(x), x)


def test_parameter_names_match_mmcv_layout() -> None:
    gc = GlobalContext(64, fusion=("mul", "add"))
    names = dict(gc.named_parameters())
    assert names["conv_mask.weight"].shape == (1, 64, 1, 1)
    assert names["transform_add.0.weight"].shape == (4, 64, 1, 1)
    assert names["transform_add.1.weight"].shape == (4, 1, 1)  # LayerNorm([C·r, 1, 1])
    assert names["transform_add.3.weight"].shape == (64, 4, 1, 1)
    assert names["transform_mul.3.bias"].shape == (64,)
    assert "conv_mask.weight" not in dict(GlobalContext(64, pooling="avg").named_parameters())
    assert GlobalContext(64, dims=3).transform_add[1].weight.shape == (4, 1, 1, 1)
    snl = dict(SimplifiedNonLocal(8, dims=1).named_parameters())
    assert snl["conv_mask.weight"].shape == (1, 8, 1) and snl["conv_value.weight"].shape == (
        8,
        8,
        1,
    )
    # r = 1/16 on 1024 channels: 2·1024·64 + 64 + 1024 (convs) + 2·64 (LN) + 1024 + 1 (mask)
    assert (
        sum(p.numel() for p in GlobalContext(1024).parameters())
        == 2 * 1024 * 64 + 64 + 1024 + 128 + 1025
    )


def test_attention_map() -> None:
    snl = _randomize(SimplifiedNonLocal(8))
    x = torch.randn(2, 8, 3, 4)
    m = snl.attention_map(x)
    assert m.shape == (2, 1, 12)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 1))
    logits = snl.conv_mask(x).flatten(1)
    torch.testing.assert_close(m[:, 0], torch.softmax(logits, -1))
    rows = snl.attention_map(x, queries=[0, 5, 11])
    assert rows.shape == (2, 3, 12) and torch.equal(rows[:, 2], m[:, 0])
    gc = GlobalContext(8, pooling="avg", ratio=1 / 4)
    torch.testing.assert_close(gc.attention_map(x), torch.full((2, 1, 12), 1 / 12))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        snl.attention_map(x, queries=[12])


# -- precision and compilation ---------------------------------------------------------------


def _blocks(dims: int = 2) -> list[nn.Module]:
    return [
        _randomize(SimplifiedNonLocal(32, dims=dims), 0.2),
        _randomize(GlobalContext(32, ratio=1 / 4, fusion=("mul", "add"), dims=dims), 0.2),
        _randomize(SqueezeExcite(32, ratio=1 / 4, dims=dims), 0.2),
    ]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bfloat16_autocast_close_to_float32(dims: int) -> None:
    x = torch.randn(2, 32, *SIZES[dims])
    for block in _blocks(dims):
        y32 = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = block(x)
        err = (y16.float() - y32).abs().max() / y32.abs().max()
        assert err <= 2e-2, (type(block).__name__, float(err))


def test_layer_norm_and_softmax_run_in_float32_under_autocast() -> None:
    gc = _randomize(GlobalContext(32, ratio=1 / 4), 0.2)
    # a large common offset: LayerNorm in bfloat16 would lose the variation entirely
    x = torch.randn(2, 32, 4, 4) + 50.0
    c = gc.context(x)
    h = gc.transform_add[0](c)
    ln = gc.transform_add[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(h + 1000.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, F.layer_norm(h + 1000.0, ln.normalized_shape, ln.weight, ln.bias)
    )
    # bfloat16 parameters and input: LN computed in float32, returned in bfloat16
    ln16 = GlobalContext(32, ratio=1 / 4).to(torch.bfloat16).transform_add[1]
    t = torch.randn(2, 8, 1, 1, dtype=torch.bfloat16) + 1000
    assert ln16(t).dtype == torch.bfloat16
    ref = F.layer_norm(t.float(), ln16.normalized_shape)
    torch.testing.assert_close(ln16(t).float(), ref, atol=1e-2, rtol=1e-2)
    # softmax of bfloat16 logits sums to 1 in float32
    snl = SimplifiedNonLocal(32).to(torch.bfloat16)
    m = snl.attention_map(torch.randn(1, 32, 30, 30, dtype=torch.bfloat16))
    assert m.dtype == torch.float32
    torch.testing.assert_close(m.sum(-1), torch.ones(1, 1), atol=1e-6, rtol=0)


def test_torch_compile_matches_eager() -> None:
    x = torch.randn(2, 32, 5, 6)
    gc, snl, se = _blocks()
    compiled = torch.compile(gc, fullgraph=True)
    torch.testing.assert_close(compiled(x), gc(x), rtol=1e-5, atol=1e-5)
    for block in (snl, se):  # graph capture only (no C++ build), to keep the suite fast
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-6, atol=1e-6)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GlobalContext(16, pooling="max"), "unknown pooling 'max'"),
        (lambda: GlobalContext(16, fusion=("sum",)), "unknown fusion 'sum'"),
        (lambda: GlobalContext(16, fusion=()), "non-empty"),
        (lambda: GlobalContext(16, fusion=("add", "add")), "distinct"),
        (lambda: GlobalContext(16, ratio=0), r"ratio must be a number in \(0, 1\]"),
        (lambda: GlobalContext(8, ratio=1 / 16), "channels \\* ratio must be >= 1"),
        (lambda: GlobalContext(16, impl="slow"), "unknown impl 'slow'"),
        (lambda: GlobalContext(16, dims=4), "unknown dims 4"),
        (lambda: SimplifiedNonLocal(0), "channels must be a positive int"),
        (lambda: SimplifiedNonLocal(16, dims=0), "unknown dims 0"),
        (lambda: SimplifiedNonLocal(16, impl="x"), "unknown impl"),
        (lambda: SqueezeExcite(16, ratio=2), "ratio"),
        (lambda: SqueezeExcite(3.5), "channels must be a positive int"),
    ],
)
def test_bad_constructor_arguments(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("cls", [SimplifiedNonLocal, GlobalContext, SqueezeExcite])
def test_bad_inputs(cls) -> None:
    block = cls(16)
    with pytest.raises(ValueError, match="must have 16 channels"):
        block(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"must be a 4-d tensor \(B, C, H, W\), got 3-d"):
        block(torch.randn(1, 16, 4))
    with pytest.raises(ValueError, match="empty dimension"):
        block(torch.randn(1, 16, 0, 4))
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(1, 16, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        block([[1.0]])
    with pytest.raises(ValueError, match=r"5-d tensor \(B, C, T, H, W\)"):
        cls(16, dims=3)(torch.randn(1, 16, 4, 4))


# -- timm's LayerNorm eps ----------------------------------------------------------------------


@pytest.mark.parametrize(("fuse_add", "fuse_scale"), [(True, False), (False, True), (True, True)])
def test_norm_eps_reproduces_timm(fuse_add: bool, fuse_scale: bool) -> None:
    """timm's GlobalContext (LayerNorm2d, eps 1e-6) with its weights copied: equal with
    norm_eps=1e-6, not with the default 1e-5 (mmcv's)."""
    timm_gc = pytest.importorskip("timm.layers.global_context")
    c = 16
    theirs = timm_gc.GlobalContext(c, fuse_add=fuse_add, fuse_scale=fuse_scale, rd_ratio=1 / 4)
    theirs = _randomize(theirs.double(), 0.3)
    with torch.no_grad():  # a small bottleneck variance, where eps matters
        for mlp in (theirs.mlp_add, theirs.mlp_scale):
            if mlp is not None:
                mlp.fc1.weight.mul_(0.01)
                mlp.fc1.bias.mul_(0.01)
    fusion = tuple(f for f, on in (("add", fuse_add), ("mul", fuse_scale)) if on)
    x = torch.randn(2, c, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        want = theirs(x)
    errs = {}
    for eps in (1e-6, 1e-5):
        kw = {} if eps == 1e-5 else {"norm_eps": eps}
        ours = GlobalContext(c, ratio=1 / 4, fusion=fusion, dtype=torch.float64, **kw)
        assert ours.transform_add is None or ours.transform_add[1].eps == eps
        state = {
            "conv_mask.weight": theirs.conv_attn.weight,
            "conv_mask.bias": theirs.conv_attn.bias,
        }
        for ours_name, mlp in (
            ("transform_add", theirs.mlp_add),
            ("transform_mul", theirs.mlp_scale),
        ):
            if mlp is None:
                continue
            state |= {
                f"{ours_name}.0.weight": mlp.fc1.weight,
                f"{ours_name}.0.bias": mlp.fc1.bias,
                f"{ours_name}.1.weight": mlp.norm.weight.reshape(-1, 1, 1),
                f"{ours_name}.1.bias": mlp.norm.bias.reshape(-1, 1, 1),
                f"{ours_name}.3.weight": mlp.fc2.weight,
                f"{ours_name}.3.bias": mlp.fc2.bias,
            }
        ours.load_state_dict(state)
        with torch.no_grad():
            errs[eps] = float((ours(x) - want).abs().max() / want.abs().max())
    assert errs[1e-6] <= 1e-12
    assert errs[1e-5] > 1e-4


def test_norm_eps_default_and_bad_values() -> None:
    assert GlobalContext(32).transform_add[1].eps == 1e-5  # PyTorch's, mmcv's
    gc = GlobalContext(32, norm_eps=1e-6, fusion=("mul", "add"))
    assert gc.transform_mul[1].eps == gc.transform_add[1].eps == 1e-6 and gc.norm_eps == 1e-6
    assert "norm_eps=1e-06" in repr(gc)
    for bad in (0, -1e-5, float("nan"), "1e-6", True):
        with pytest.raises(ValueError, match="GlobalContext: norm_eps must be a positive number"):
            GlobalContext(32, norm_eps=bad)


# -- dtype of the input ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SimplifiedNonLocal, GlobalContext, SqueezeExcite])
def test_input_dtype_must_be_the_parameters(cls) -> None:
    block = cls(16)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    msg = (
        rf"^{cls.__name__}: input dtype torch\.float64 differs from the parameters' "
        rf"torch\.float32; call block\.to\(torch\.float64\) or cast the input to torch\.float32$"
    )
    with pytest.raises(TypeError, match=msg):
        block(x)
    if hasattr(block, "attention_map"):
        with pytest.raises(TypeError, match=msg):
            block.attention_map(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x.bfloat16()).shape == x.shape
    assert block.double()(x).dtype == torch.float64


def test_bad_flags() -> None:
    with pytest.raises(TypeError, match="GlobalContext: layer_norm must be a bool, got 'yes'"):
        GlobalContext(16, layer_norm="yes")
    with pytest.raises(ValueError, match="GlobalContext: fusion must be 'add', 'mul' or a"):
        GlobalContext(16, fusion=3)
    with pytest.raises(ValueError, match="GlobalContext: unknown fusion 'sum'"):
        GlobalContext(16, fusion=("sum",))
    with pytest.raises(ValueError, match="SimplifiedNonLocal: unknown dims 0"):
        SimplifiedNonLocal(16, dims=0)
    with pytest.raises(TypeError, match="SimplifiedNonLocal: zero_init must be a bool"):
        SimplifiedNonLocal(16, zero_init=None)


def test_attention_maps_are_float32_for_half_inputs() -> None:
    x = torch.randn(1, 16, 4, 4, dtype=torch.bfloat16)
    for block in (SimplifiedNonLocal(16), GlobalContext(16), GlobalContext(16, pooling="avg")):
        m = block.to(torch.bfloat16).attention_map(x)
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.sum(-1), torch.ones(1, 1), atol=1e-6, rtol=0)
