"""The non-local block under torch.compile, ONNX export, channels_last and bfloat16 autocast."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from nonlocalnet import NonLocal2d, NonLocal3d
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


@pytest.mark.parametrize("pairwise", ["gaussian", "embedded_gaussian", "dot_product"])
def test_onnx_export_matches_torch(pairwise: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    block = _block(pairwise).eval()
    x = torch.randn(2, 8, 5, 6)
    path = tmp_path / f"nl_{pairwise}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (x,), dynamo=True)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = block(x)
    assert float((want - x).abs().max()) > 1e-2
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
    # Gradients through train-mode BatchNorm lose more (measured up to 8e-2 with either path):
    # the fast path must be no less accurate than the reference under the same autocast.
    _, ref_res_err, ref_grad_err = _autocast_errors(pairwise, "reference")
    assert res_err <= 1.5 * ref_res_err
    assert grad_err <= 1.5 * ref_grad_err
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
