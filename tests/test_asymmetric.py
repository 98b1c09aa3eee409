"""PyramidPooling, APNB and AFNB: pyramid sizes, formulas, fast == reference, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet import AFNB, APNB, PyramidPooling

SIZES = {1: (9,), 2: (5, 7), 3: (2, 5, 6)}


def _randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Random parameters and BN running statistics; eval mode (BN uses them, no dropout)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module.eval()


def _outputs_and_grads(module: nn.Module, inputs: tuple, cot: torch.Tensor) -> torch.Tensor:
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)
    y = module(*inputs)
    grads = torch.autograd.grad((y * cot).sum(), [*inputs, *module.parameters()])
    return torch.cat([y.detach().flatten()] + [g.flatten() for g in grads])


def _fast_vs_reference(make, inputs: tuple) -> float:
    fast = _randomize(make("fast")).double()
    ref = make("reference").double().eval()
    ref.load_state_dict(fast.state_dict())
    inputs = tuple(t.double() for t in inputs)
    cot = torch.randn_like(fast(*inputs))
    a = _outputs_and_grads(fast, inputs, cot)
    b = _outputs_and_grads(ref, inputs, cot)
    return float((a - b).norm() / b.norm())


# -- pyramid pooling -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 7), (20, 24), (8, 8), (1, 1)])
def test_pyramid_has_110_samples_at_default_bins(size) -> None:
    x = torch.randn(2, 3, *size)
    p = PyramidPooling()
    assert p(x).shape == (2, 3, 110)
    assert p.num_samples(size) == 110


def test_pyramid_values_are_block_means() -> None:
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    s = PyramidPooling((1, 3, 6, 8))(x)
    torch.testing.assert_close(s[:, :, 0], x.mean(dim=(2, 3)))
    offset = 1
    for b in (3, 6, 8):
        k = 24 // b
        means = x.reshape(2, 3, b, k, b, k).mean(dim=(3, 5)).flatten(2)  # row major over bins
        torch.testing.assert_close(s[:, :, offset : offset + b * b], means)
        offset += b * b


def test_pyramid_1d_and_3d() -> None:
    x1 = torch.randn(2, 3, 16, dtype=torch.float64)
    s1 = PyramidPooling((1, 2, 4), dims=1)(x1)
    assert s1.shape == (2, 3, 7)
    torch.testing.assert_close(s1[:, :, 1:3], x1.reshape(2, 3, 2, 8).mean(-1))
    x3 = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    keep = PyramidPooling(dims=3)
    assert keep(x3).shape == (2, 3, 4 * 110) and keep.num_samples((4, 6, 6)) == 440
    # time kept: each bin gives T·b² samples, frame by frame
    torch.testing.assert_close(keep(x3)[:, :, :4], x3.mean(dim=(3, 4)))
    frame2 = F.adaptive_avg_pool2d(x3[:, :, 2], 3).flatten(2)
    torch.testing.assert_close(keep(x3)[:, :, 4 + 2 * 9 : 4 + 3 * 9], frame2)
    pooled = PyramidPooling(dims=3, pool_time=True)
    assert pooled(x3).shape == (2, 3, 110) and pooled.num_samples((4, 6, 6)) == 110
    torch.testing.assert_close(
        pooled(x3), PyramidPooling(dims=2)(x3.mean(dim=2)), rtol=1e-12, atol=1e-12
    )


# -- APNB ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 7), (20, 24)])
def test_apnb_map_has_110_columns(size) -> None:
    block = _randomize(APNB(16, key_channels=8, value_channels=8))
    x = torch.randn(2, 16, *size)
    m = block.attention_map(x)
    n = size[0] * size[1]
    assert m.shape == (2, n, 110)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, n))
    assert block(x).shape == (2, 16, *size)
    rows = block.attention_map(x, queries=[3, 0])
    torch.testing.assert_close(rows, m[:, [3, 0]])


APNB_OPTIONS = [
    (1, True, False),
    (2, True, False),
    (2, False, False),
    (3, True, False),
    (3, False, True),
]


@pytest.mark.parametrize(("dims", "share", "pool_time"), APNB_OPTIONS)
def test_apnb_fast_equals_reference(dims, share, pool_time) -> None:
    x = torch.randn(2, 6, *SIZES[dims])

    def make(impl: str) -> APNB:
        return APNB(
            6,
            out_channels=5,
            key_channels=4,
            value_channels=3,
            bins=(1, 2, 3),
            share_query_key=share,
            impl=impl,
            dims=dims,
            pool_time=pool_time,
        )

    assert _fast_vs_reference(make, (x,)) <= 1e-10


def _conv(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])
    return torch.einsum("oc,bcn->bon", w, t) + conv.bias[None, :, None]


def _bn(bn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm on (B, C, N), written out."""
    inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (t - bn.running_mean[None, :, None]) * inv[None, :, None] + bn.bias[None, :, None]


def _softmax_attention(q, k, v, d):
    """q (B, K, N), k (B, K, S), v (B, V, S) -> (B, V, N): Σ_s softmax_s(qᵀk/√d) v_s."""
    logits = torch.einsum("bkn,bks->bns", q, k) / d**0.5
    w = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    return torch.einsum("bns,bvs->bvn", w, v)


@pytest.mark.parametrize("share", [True, False])
def test_apnb_reference_matches_formula(share: bool) -> None:
    block = _randomize(APNB(6, 5, 4, 3, share_query_key=share, impl="reference")).double()
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    xs = x.flatten(2)  # (B, C, N)

    def pyramid(t):  # (B, C, H, W) -> (B, C, 110)
        return torch.cat([F.adaptive_avg_pool2d(t, b).flatten(2) for b in (1, 3, 6, 8)], 2)

    def proj(seq, t):
        return torch.relu(_bn(seq[1], _conv(seq[0], t)))

    q = proj(block.f_query, xs)
    k = pyramid(proj(block.f_key, xs).reshape(2, 4, 9, 10))
    v = pyramid(_conv(block.f_value, xs).reshape(2, 3, 9, 10))
    context = _conv(block.conv_out, _softmax_attention(q, k, v, 4))  # (B, C, N)
    fused = _conv(block.fusion[0], torch.cat([context, xs], 1))
    expected = torch.relu(_bn(block.fusion[1], fused)).reshape(2, 5, 9, 10)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.residual(x), context.reshape(2, 6, 9, 10))


def test_apnb_structure_and_zero_init() -> None:
    block = APNB(32)
    assert block.f_query is block.f_key
    assert isinstance(block.f_key[1], nn.BatchNorm2d) and isinstance(block.f_key[2], nn.ReLU)
    assert block.key_channels == 256 and block.value_channels == 256
    assert isinstance(block.fusion[3], nn.Dropout2d) and block.fusion[3].p == 0.05
    assert block.fusion[0].in_channels == 64 and block.out_channels == 32
    keys = set(block.state_dict())
    assert {"f_key.0.weight", "f_query.0.weight", "f_value.weight", "conv_out.weight"} <= keys
    x = torch.randn(2, 32, 6, 5)
    assert torch.equal(block.residual(x), torch.zeros_like(x))
    block.eval()
    torch.testing.assert_close(block(x), block.fusion(torch.cat([torch.zeros_like(x), x], 1)))
    separate = APNB(32, share_query_key=False)
    assert separate.f_query is not separate.f_key
    n_shared = sum(p.numel() for p in block.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate - n_shared == 32 * 256 + 256 + 2 * 256  # one more conv + BN


def test_apnb_3d_and_1d_maps() -> None:
    x3 = torch.randn(1, 8, 3, 4, 5)
    assert APNB(8, key_channels=4, value_channels=4, dims=3).attention_map(x3).shape == (
        1,
        60,
        330,
    )
    pooled = APNB(8, key_channels=4, value_channels=4, dims=3, pool_time=True)
    assert pooled.attention_map(x3).shape == (1, 60, 110)
    x1 = torch.randn(1, 8, 30)
    assert APNB(8, key_channels=4, value_channels=4, dims=1).attention_map(x1).shape == (1, 30, 18)


# -- AFNB ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_afnb_fast_equals_reference(dims: int) -> None:
    high_size = SIZES[dims]
    low_size = tuple(s + 2 for s in high_size)
    low, high = torch.randn(2, 5, *low_size), torch.randn(2, 7, *high_size)

    def make(impl: str) -> AFNB:
        return AFNB(5, 7, 4, key_channels=3, value_channels=2, bins=(1, 2), impl=impl, dims=dims)

    assert _fast_vs_reference(make, (low, high)) <= 1e-10


def test_afnb_reference_matches_formula() -> None:
    block = _randomize(AFNB(5, 7, 4, 3, 2, impl="reference")).double()
    low = torch.randn(2, 5, 12, 10, dtype=torch.float64)
    high = torch.randn(2, 7, 6, 5, dtype=torch.float64)
    lows, highs = low.flatten(2), high.flatten(2)

    def pyramid(t):
        return torch.cat([F.adaptive_avg_pool2d(t, b).flatten(2) for b in (1, 3, 6, 8)], 2)

    q = torch.relu(_bn(block.f_query[1], _conv(block.f_query[0], highs)))
    k = torch.relu(_bn(block.f_key[1], _conv(block.f_key[0], lows)))
    k = pyramid(k.reshape(2, 3, 12, 10))
    v = pyramid(_conv(block.f_value, lows).reshape(2, 2, 12, 10))
    context = _conv(block.conv_out, _softmax_attention(q, k, v, 3))  # (B, 4, N_high)
    expected = _bn(block.fusion[1], _conv(block.fusion[0], torch.cat([context, highs], 1)))
    torch.testing.assert_close(
        block(low, high), expected.reshape(2, 4, 6, 5), rtol=1e-12, atol=1e-12
    )
    m = block.attention_map(low, high)
    assert m.shape == (2, 30, 110)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 30, dtype=torch.float64))


def test_afnb_structure() -> None:
    block = AFNB(1024, 2048, 512)
    assert block.f_query[0].in_channels == 2048 and block.f_key[0].in_channels == 1024
    assert block.f_value.in_channels == 1024 and block.conv_out.out_channels == 512
    assert block.fusion[0].in_channels == 512 + 2048 and len(block.fusion) == 3
    assert not any(isinstance(m, nn.ReLU) for m in block.fusion)
    assert block.conv_out.weight.abs().sum() == 0


# -- precision and compilation ---------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bfloat16_autocast_close_to_float32(dims: int) -> None:
    x = torch.randn(2, 16, *SIZES[dims])
    apnb = _randomize(APNB(16, 12, 8, 8, dims=dims), 0.2)
    afnb = _randomize(AFNB(16, 16, 12, 8, 8, dims=dims), 0.2)
    for block, inputs in ((apnb, (x,)), (afnb, (x.flip(1), x))):
        y32 = block(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = block(*inputs)
        err = (y16.float() - y32).abs().max() / y32.abs().max()
        assert err <= 2e-2, (type(block).__name__, float(err))


def test_torch_compile_matches_eager() -> None:
    x = torch.randn(2, 16, 6, 7)
    apnb = _randomize(APNB(16, 12, 8, 8), 0.2)
    compiled = torch.compile(apnb, fullgraph=True)
    torch.testing.assert_close(compiled(x), apnb(x), rtol=1e-5, atol=1e-5)
    afnb = _randomize(AFNB(16, 8, 12, 8, 8), 0.2)
    low = torch.randn(2, 16, 9, 9)
    compiled = torch.compile(afnb, fullgraph=True, backend="aot_eager")  # graph capture only
    torch.testing.assert_close(compiled(low, x[:, :8]), afnb(low, x[:, :8]), rtol=1e-6, atol=1e-6)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PyramidPooling(()), "non-empty"),
        (lambda: PyramidPooling(8), "non-empty sequence"),
        (lambda: PyramidPooling((1, 0)), "each bin must be a positive int"),
        (lambda: PyramidPooling(dims=4), "unknown dims 4"),
        (lambda: APNB(0), "channels must be a positive int"),
        (lambda: APNB(8, key_channels=0), "key_channels must be a positive int"),
        (lambda: APNB(8, dropout=1.5), r"dropout must be a probability in \[0, 1\)"),
        (lambda: APNB(8, impl="flash"), "unknown impl 'flash'"),
        (lambda: APNB(8, dims=5), "unknown dims 5"),
        (lambda: APNB(8, bins=(2, -1)), "each bin"),
        (lambda: AFNB(8, 0, 4), "high_channels must be a positive int"),
        (lambda: AFNB(8, 8, 4, dropout=-0.1), "dropout"),
    ],
)
def test_bad_constructor_arguments(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs() -> None:
    apnb = APNB(8, key_channels=4, value_channels=4)
    with pytest.raises(ValueError, match="APNB: input must have 8 channels"):
        apnb(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match=r"4-d tensor \(B, C, H, W\), got 5-d"):
        apnb(torch.randn(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="empty dimension"):
        apnb(torch.randn(1, 8, 4, 0))
    with pytest.raises(TypeError, match="floating-point"):
        apnb(torch.ones(1, 8, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"query indices must lie in \[0, 16\)"):
        apnb.attention_map(torch.randn(1, 8, 4, 4), queries=[16])
    with pytest.raises(ValueError, match="PyramidPooling: input must be a 3-d"):
        PyramidPooling(dims=1)(torch.randn(1, 2, 3, 3))
    afnb = AFNB(8, 12, 4, 4, 4)
    low, high = torch.randn(2, 8, 6, 6), torch.randn(2, 12, 3, 3)
    assert afnb(low, high).shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="AFNB: low must have 8 channels"):
        afnb(high, high)
    with pytest.raises(ValueError, match="AFNB: high must have 12 channels"):
        afnb(low, low)
    with pytest.raises(ValueError, match=r"same batch size, got 2 .* and 1"):
        afnb(low, high[:1])
    with pytest.raises(ValueError, match="AFNB: high must be a 4-d"):
        afnb(low, high[0])


# -- cost -----------------------------------------------------------------------------------


def _counted_macs(name: str, channels: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """(whole block, attention branch) multiply-adds of one forward, reference path, meta tensors."""
    from nonlocalnet import create_block
    from nonlocalnet.models.flops import count_macs

    kw = (
        {"inner_channels": width}
        if name == "nl"
        else {"key_channels": width, "value_channels": width}
    )
    block = create_block(name, channels, impl="reference", device="meta", **kw).eval()
    x = torch.empty(1, channels, *size, device="meta")
    with torch.no_grad():
        total = count_macs(block, x)
        branch = count_macs(block.residual, x) if name == "apnb" else total
    return total, branch


@pytest.mark.parametrize(
    ("channels", "width", "size"), [(2048, 256, (128, 256)), (64, 16, (16, 32))]
)
def test_cost_closed_forms(channels: int, width: int, size: tuple[int, int]) -> None:
    """NL vs APNB multiply-adds, counted on meta tensors (no compute), against closed forms."""
    n, c, d, s = size[0] * size[1], channels, width, 110
    nl_macs, _ = _counted_macs("nl", c, d, size)
    apnb_total, apnb_branch = _counted_macs("apnb", c, d, size)
    # NL: θ, φ, g, W_z (4·N·C·d) + QKᵀ and PV (2·N²·d)
    assert nl_macs == 4 * n * c * d + 2 * n * n * d
    # APNB: shared f_key/f_query, f_value, conv_out (3·N·C·d) + QKᵀ and PV over S (2·N·S·d)
    assert apnb_branch == 3 * n * c * d + 2 * n * s * d
    assert apnb_total - apnb_branch == n * 2 * c * c  # the concat fusion conv on top


def test_cost_claims_at_the_cityscapes_size() -> None:
    """ANN's claim at 128×256, C = 2048, key/value 256: ~11× fewer multiply-adds, 4 GiB map."""
    nl_macs, _ = _counted_macs("nl", 2048, 256, (128, 256))
    _, apnb_branch = _counted_macs("apnb", 2048, 256, (128, 256))
    assert nl_macs / apnb_branch >= 10  # 11.6×: the non-local part, as the paper compares
    n = 128 * 256
    nl_map, apnb_map = n * n * 4, n * 110 * 4  # float32 bytes
    assert nl_map == 4 * 2**30 and apnb_map / 2**20 == pytest.approx(13.75)
    assert nl_map / apnb_map >= 100


# -- low precision: sums that float16 cannot hold --------------------------------------------


def _scaled(module: nn.Module) -> nn.Module:
    """Weights of unit gain (std 1/√fan_in) and BN statistics at identity, eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn_like(p) / fan_in**0.5)
    return module.eval()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_float16_large_inputs_stay_finite(dims: int, impl: str) -> None:
    """float16 sums that leave its range (65504): logits ~1e5 (1d, 2d: inputs ~300), pyramid
    averages over 4096 positions a frame (3d, the float16 adaptive_avg_pool3d sums in float16).
    They gave inf and NaN; accumulated in float32 the blocks stay within float16 rounding of
    the float64 result."""
    size, magnitude = {1: ((40,), 300), 2: ((12, 12), 300), 3: ((2, 64, 64), 30)}[dims]
    x = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(0)) * magnitude
    apnb = _scaled(APNB(16, 12, 8, 8, dims=dims, impl=impl, zero_init=False))
    afnb = _scaled(AFNB(16, 16, 12, 8, 8, dims=dims, impl=impl, zero_init=False))
    for block, inputs in ((apnb, (x,)), (afnb, (x.flip(1), x))):
        with torch.no_grad():
            want = block.double()(*(t.double() for t in inputs))
            got = block.half()(*(t.half() for t in inputs))
            maps = block.attention_map(*(t.half() for t in inputs))
        assert got.dtype == torch.float16
        assert bool(torch.isfinite(got).all()), type(block).__name__
        assert float((got.double() - want).norm() / want.norm()) <= 5e-3
        assert maps.dtype == torch.float32 and bool(torch.isfinite(maps).all())
        torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps[..., 0]))


def test_pyramid_pooling_averages_in_float32() -> None:
    x = torch.full((1, 2, 8, 64, 64), 60000.0, dtype=torch.float16)  # float16 max is 65504
    x[:, :, ::2] = 50000.0
    for dt in (torch.float16, torch.bfloat16):
        s = PyramidPooling((1, 2), dims=3, pool_time=True)(x.to(dt))
        assert s.dtype == dt
        want = torch.full((1, 2, 5), 55000.0)
        torch.testing.assert_close(s.float(), want, rtol=4e-3, atol=0)


# -- dtype of the input ------------------------------------------------------------------------


def test_input_dtype_must_be_the_parameters() -> None:
    def msg(block: str, name: str) -> str:
        return (
            rf"^{block}: {name} dtype torch\.float64 differs from the parameters' torch\.float32; "
            rf"call block\.to\(torch\.float64\) or cast the {name} to torch\.float32$"
        )

    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    apnb = APNB(8, key_channels=4, value_channels=4)
    with pytest.raises(TypeError, match=msg("APNB", "input")):
        apnb(x)
    with pytest.raises(TypeError, match=msg("APNB", "input")):
        apnb.attention_map(x)
    afnb = AFNB(8, 8, 4, 4, 4)
    with pytest.raises(TypeError, match=msg("AFNB", "low")):
        afnb(x, x.float())
    with pytest.raises(TypeError, match=msg("AFNB", "high")):
        afnb(x.float(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert apnb(x.bfloat16()).shape == x.shape
        assert afnb(x.float(), x.bfloat16()).shape == (2, 4, 5, 5)
    assert apnb.double()(x).dtype == torch.float64


def test_training_batch_norm_needs_two_values() -> None:
    apnb = APNB(8, key_channels=4, value_channels=4)
    with pytest.raises(ValueError, match=r"APNB: a BatchNorm in training mode.*\(1, 8, 1, 1\)"):
        apnb(torch.randn(1, 8, 1, 1))
    assert apnb.eval()(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)
    with pytest.raises(ValueError, match="AFNB: a BatchNorm in training mode"):
        AFNB(8, 8, 4, 4, 4)(torch.randn(1, 8, 3, 3), torch.randn(1, 8, 1, 1))
