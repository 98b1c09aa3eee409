"""The blocks under torch.compile, ONNX export, torch.fx feature extraction, channels_last,
bfloat16 autocast and float16."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from nonlocalnet import NonLocal2d, NonLocal3d
from nonlocalnet import functional as NLF
from nonlocalnet.functional import PAIRWISE


def _block(pairwise: str, channels: int = 8, cls=NonLocal2d, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    block = cls(channels, pairwise=pairwise, zero_init=False, **kw)
    with torch.no_grad():
        for p in block.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 4
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
        if block.norm is not None:
            block.norm.running_mean.normal_()
            block.norm.running_var.uniform_(0.5, 2.0)
    return block


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


# -- torch.compile ----------------------------------------------------------------------------

# One small compile per pairwise: ~10-30 s each on 2 busy cores, so all stay in the default suite.


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_compile_fullgraph_equals_eager(pairwise: str) -> None:
    torch._dynamo.reset()
    block = _block(pairwise, sub_sample=True).eval()
    x = torch.randn(2, 8, 5, 6)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
        want = block(x)
    assert got.shape == x.shape
    assert float((want - x).abs().max()) > 1e-2  # the residual branch is not zero
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# -- ONNX -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairwise", "sub_sample"),
    [
        ("gaussian", False),
        ("embedded_gaussian", False),
        ("dot_product", False),
        ("concatenation", False),
        ("concatenation", True),
    ],
)
def test_onnx_export_matches_torch(pairwise: str, sub_sample: bool, tmp_path) -> None:
    """Every pairwise function exports; the fast concatenation's binary search (no ONNX op)
    becomes a merged sort while exporting, exact on other inputs than the traced one too."""
    ort = pytest.importorskip("onnxruntime")
    block = _block(pairwise, sub_sample=sub_sample).eval()
    x = torch.randn(2, 8, 5, 6)
    path = tmp_path / f"nl_{pairwise}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for inp in (x, torch.randn(2, 8, 5, 6) * 3):
        (got,) = session.run(None, {session.get_inputs()[0].name: inp.numpy()})
        with torch.no_grad():
            want = block(inp)
        assert float((want - inp).abs().max()) > 1e-2
        assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


# -- memory layout and dtype ------------------------------------------------------------------


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_channels_last_input(pairwise: str, impl: str) -> None:
    block = _block(pairwise, sub_sample=True, impl=impl, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    outs = []
    for inp in (x, x_cl):
        inp = inp.clone().requires_grad_(True)
        out = block(inp)
        gx, *gp = torch.autograd.grad(out, [inp, *block.parameters()], grad)
        outs.append(torch.cat([t.reshape(-1) for t in (out, gx, *gp)]))  # (total,)
    assert _rel(outs[1], outs[0]) <= 1e-12
    # and a channels_last block (weights too)
    block_cl = block.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _rel(block_cl(x_cl), block(x)) <= 1e-12


def test_channels_last_3d_input() -> None:
    block = _block("embedded_gaussian", cls=NonLocal3d, extent="space", dtype=torch.float64)
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert _rel(block(x_cl), block(x)) <= 1e-12


def _autocast_errors(pairwise: str, impl: str) -> tuple[float, float, float]:
    """Relative errors (output, residual branch, input gradient) of bf16 autocast vs float32."""
    block = _block(pairwise, channels=16, sub_sample=True, impl=impl)
    x = torch.randn(2, 16, 8, 9, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for autocast in (False, True):
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(inp)
        assert out.dtype == torch.float32  # x + bf16 residual promotes
        assert bool(torch.isfinite(out).all())
        (gx,) = torch.autograd.grad(out, inp, grad)
        results[autocast] = (out.detach(), gx)
    (out16, g16), (out32, g32) = results[True], results[False]
    assert float((out32 - x).abs().max()) > 1e-1  # the residual branch matters
    return _rel(out16, out32), _rel(out16 - x, out32 - x), _rel(g16, g32)


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_bfloat16_autocast_close_to_float32(pairwise: str) -> None:
    out_err, res_err, grad_err = _autocast_errors(pairwise, "fast")
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 ≈ 2e-3). The output stays within 2e-2
    # of float32; the residual branch alone (no x added), through three bf16 convolutions and
    # the aggregation, within 3e-2 (measured ≤ 1.3e-2).
    assert out_err <= 2e-2
    assert res_err <= 3e-2
    # Gradients through train-mode BatchNorm lose more (measured up to 8e-2 with either path).
    # The reference keeps float32 logits under autocast; the fast kernels run their products in
    # bfloat16 as autocast runs the peers' (softmax statistics in float32), so their error may
    # exceed the reference's by bfloat16's rounding of the logits (measured: gaussian residual
    # 1.0e-2 against the reference's 3.6e-3), but no more.
    _, ref_res_err, ref_grad_err = _autocast_errors(pairwise, "reference")
    assert res_err <= max(1.5 * ref_res_err, 1.5e-2)
    assert grad_err <= max(1.5 * ref_grad_err, 3e-2)
    assert grad_err <= 0.15


def test_bfloat16_parameters() -> None:
    """A block converted to bfloat16 runs on bfloat16 inputs (fast path, fused attention)."""
    block = _block("embedded_gaussian", channels=16)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        want = block(x)
        got = block.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) <= 2e-2


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_float16_large_inputs_stay_finite(pairwise: str) -> None:
    """Logits (~1e5) and kᵀv sums beyond float16's range (65504) overflowed the reference path,
    attention_map and the fast dot product to inf and NaN. Accumulated in float32, each path's
    aggregation of its own float16 tokens is within float16 rounding of the float64
    aggregation of the same tokens (the float16 rounding of the tokens themselves makes a
    softmax this peaked ill-conditioned, so it is kept out of the comparison)."""
    block = _block(pairwise, channels=16, sub_sample=True).eval()
    if pairwise in ("dot_product", "concatenation"):
        with torch.no_grad():
            # y inside float16's range; for the dot product, q (kᵀv) = M·y not
            block.g.weight.mul_(1e-4)
            block.g.bias.mul_(1e-4)
    block.half()
    x = (torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(0)) * 200).half()
    lay = block.layout(x.shape[2:])
    with torch.no_grad():
        for impl in ("fast", "reference"):
            block.impl = impl
            q, k, v = block.embed(x)
            y = NLF.aggregate(pairwise, q.double(), k.double(), v.double(), scale=block.scale)
            want = lay.unfold(y, 2)  # (B, C', *S)
            got = block.nonlocal_op(x)
            assert got.dtype == torch.float16
            assert bool(torch.isfinite(got).all()), impl
            assert _rel(got, want) <= 2e-3, impl
            assert bool(torch.isfinite(block(x)).all()), impl
        amap = block.attention_map(x)
        q, k, _ = block.embed(x)
        want_map = NLF.pairwise_weights(pairwise, q.double(), k.double(), scale=block.scale)
    assert amap.dtype == torch.float32 and bool(torch.isfinite(amap).all())
    assert _rel(amap, want_map) <= 1e-5


# -- torch.fx: create_feature_extractor ---------------------------------------------------------


def _randomize_all(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised ones too), BN statistics near identity."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def _fx_matches_eager(model: torch.nn.Module, nodes: dict, *inputs: torch.Tensor) -> None:
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    extractor = fx.create_feature_extractor(model, nodes)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(extractor, mode)()
        torch.manual_seed(0)
        with torch.no_grad():
            got = extractor(*inputs)
        torch.manual_seed(0)
        with torch.no_grad():
            want = _eager_nodes(model, nodes, *inputs)
        assert set(got) == set(want)
        for name, out in got.items():
            assert bool(torch.isfinite(out).all()) and float(out.abs().max()) > 0, (mode, name)
            assert torch.equal(out, want[name]), (mode, name)
    model.eval()


def _eager_nodes(model: torch.nn.Module, nodes: dict, *inputs: torch.Tensor) -> dict:
    """The outputs of the named submodules in an eager forward pass (forward hooks)."""
    outs, hooks = {}, []
    for path, name in nodes.items():
        module = model.get_submodule(path)
        hooks.append(module.register_forward_hook(lambda m, i, o, n=name: outs.setdefault(n, o)))
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return outs


class _Stages(torch.nn.Module):
    """A zoo ResNet up to its stages (ResNet.forward's own input check is not fx-traceable)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_stages(x)[2]  # c4


@pytest.mark.parametrize("name", ["nl_resnet50", "gc_resnet50"])
def test_feature_extractor_of_zoo_resnets(name: str) -> None:
    """create_feature_extractor traces the NL and GC ResNets of the zoo: same c4 as eager."""
    from nonlocalnet import GlobalContext, NonLocalNd
    from nonlocalnet.models import create_model

    net = _randomize_all(create_model(name))
    assert any(isinstance(m, (NonLocalNd, GlobalContext)) for m in net.modules())
    x = torch.randn(1, 3, 64, 72, generator=torch.Generator().manual_seed(1))
    _fx_matches_eager(_Stages(net), {"net.layer3": "c4"}, x)


def test_feature_extractor_of_zoo_resnet_forward() -> None:
    from nonlocalnet.models import create_model

    net = _randomize_all(create_model("nl_resnet50"))
    _fx_matches_eager(net, {"layer3": "c4"}, torch.randn(1, 3, 64, 64))


class _Holder(torch.nn.Module):
    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _PairHolder(_Holder):
    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.block(low, high)


def _fx_blocks() -> list[tuple[str, object, tuple[int, ...]]]:
    from nonlocalnet import (
        APNB,
        GlobalContext,
        NonLocalNd,
        SimplifiedNonLocal,
        SqueezeExcite,
    )

    cases = []
    for pairwise in PAIRWISE:
        for dims, extent, size in [
            (1, "spacetime", (7,)),
            (2, "spacetime", (5, 7)),
            (3, "space", (3, 5, 7)),
            (3, "time", (3, 5, 7)),
        ]:
            for rounding in ("ceil", "floor"):
                for impl in ("fast", "reference"):
                    kw = {"extent": extent, "sub_sample_rounding": rounding, "impl": impl}

                    def make(pw=pairwise, d=dims, kw=kw):
                        return NonLocalNd(8, 4, pw, sub_sample=True, dims=d, **kw)

                    cases.append((f"nl-{pairwise}-{dims}-{extent}-{rounding}-{impl}", make, size))
    for dims, size in [(1, (9,)), (2, (4, 5)), (3, (2, 3, 4))]:
        cases += [
            (f"snl-{dims}", lambda d=dims: SimplifiedNonLocal(8, dims=d), size),
            (
                f"gc-{dims}",
                lambda d=dims: GlobalContext(16, 1 / 4, fusion=("mul", "add"), dims=d),
                size,
            ),
            (f"gc-avg-{dims}", lambda d=dims: GlobalContext(16, 1 / 4, "avg", dims=d), size),
            (f"se-{dims}", lambda d=dims: SqueezeExcite(16, 1 / 4, dims=d), size),
            (f"apnb-{dims}", lambda d=dims: APNB(8, 6, 4, 4, (1, 2, 3), dims=d), size),
        ]
    return cases


@pytest.mark.parametrize(("label", "make", "size"), _fx_blocks(), ids=[c[0] for c in _fx_blocks()])
def test_feature_extractor_of_each_block(label, make, size) -> None:
    block = _randomize_all(make(), 0.3)
    channels = 16 if label.startswith(("gc", "se")) else 8
    x = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(1))
    _fx_matches_eager(_Holder(block), {"block": "out"}, x)


def test_feature_extractor_of_afnb() -> None:
    from nonlocalnet import AFNB

    for dims, low, high in [(2, (6, 7), (3, 4)), (3, (2, 6, 7), (2, 3, 4))]:
        block = _randomize_all(AFNB(6, 8, 4, 4, 4, (1, 2), dims=dims), 0.3)
        x_low = torch.randn(2, 6, *low, generator=torch.Generator().manual_seed(1))
        x_high = torch.randn(2, 8, *high, generator=torch.Generator().manual_seed(2))
        _fx_matches_eager(_PairHolder(block), {"block": "out"}, x_low, x_high)


def test_checks_skip_only_under_fx_tracing() -> None:
    """Symbolic tracing skips the input checks; eager calls and torch.compile keep them."""
    from nonlocalnet._checks import is_tracing

    assert not is_tracing(torch.zeros(1))
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(is_tracing() and is_tracing(x))
            return x

    torch.fx.symbolic_trace(Probe())
    assert seen == [True]
    block = NonLocal2d(8)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="8 channels"):
        compiled(torch.randn(1, 4, 3, 3))
