"""timm (installed): NonLocalAttn, GlobalContext ('gc' and 'gca') and a GC ResNet, converted.

Each test builds timm's own module with random weights, converts its state_dict, and compares
the outputs in float64, eval mode, on odd spatial sizes, with ≤ 1e-10 relative error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nonlocalnet.convert import ConversionError, convert_state_dict
from nonlocalnet.convert._core import supported_gc_options

timm = pytest.importorskip("timm")
from timm.layers import GlobalContext as TimmGC  # noqa: E402
from timm.layers import NonLocalAttn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_LN_EPS = "norm_eps" in supported_gc_options()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def randomise(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Random weights everywhere, BN statistics included (timm zero-inits the last BN)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, std)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    """Without GlobalContext(norm_eps=...): the eps is set on the built modules."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


def converted(state, **kw):
    conv = convert_state_dict(state, "timm", **kw)
    conv.model.double().eval().load_state_dict(conv.state_dict)
    return conv


@pytest.mark.parametrize("size", [(7, 9), (8, 8)])
@pytest.mark.parametrize("use_scale", [True, False])
def test_nonlocal_attn(size, use_scale) -> None:
    theirs = randomise(NonLocalAttn(48, use_scale=use_scale)).double().eval()
    conv = converted(theirs.state_dict(), use_scale=use_scale)
    ours = conv.model
    assert ours.inner_channels == 8 and ours.sub_sample is False  # rd_ratio 1/8, divisor 8
    assert conv.report.exact
    if use_scale:
        assert any("sqrt(C'/C)" in n for n in conv.report.notes)
    x = torch.randn(2, 48, *size, dtype=torch.float64)
    with torch.no_grad():
        assert rel(ours(x), theirs(x)) <= 1e-10


@pytest.mark.parametrize("fuse", ["gc", "gca", "both"])
def test_global_context(fuse) -> None:
    kw = {"gc": {}, "gca": {"fuse_add": True, "fuse_scale": False}, "both": {"fuse_add": True}}
    theirs = randomise(TimmGC(64, **kw[fuse])).double().eval()
    conv = converted(theirs.state_dict())
    want = {"gc": ("mul",), "gca": ("add",), "both": ("mul", "add")}[fuse]
    assert conv.model.fusion == want
    assert conv.report.block_options["gc.norm_eps"] == 1e-6
    if not HAS_LN_EPS:
        assert not conv.report.exact and "norm_eps" in conv.report.inexact[0]
        set_layer_norm_eps(conv.model, 1e-6)
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


@pytest.mark.skipif(not HAS_LN_EPS, reason="GlobalContext has no norm_eps option yet")
def test_global_context_exact_through_the_overrides() -> None:
    theirs = randomise(TimmGC(64)).double().eval()
    conv = converted(theirs.state_dict())
    assert conv.report.exact
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


@pytest.mark.parametrize("attn", ["gca", pytest.param("gc", marks=pytest.mark.slow)])
def test_gc_resnet(attn) -> None:
    """timm's ResNet-50 with GC in every bottleneck (its se slot = our gc slot)."""
    from timm.models.resnet import Bottleneck, ResNet

    theirs = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=10, block_args={"attn_layer": attn})
    randomise(theirs, std=0.05).double().eval()
    conv = converted(theirs.state_dict())
    assert conv.model_name == "gc_resnet50"
    assert conv.overrides["gc_placement"] == [
        [0, 1, 2],
        [0, 1, 2, 3],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2],
    ]
    assert conv.overrides["gc_kwargs"]["fusion"] == (["add"] if attn == "gca" else ["mul"])
    if not HAS_LN_EPS:
        set_layer_norm_eps(conv.model, 1e-6)
    x = torch.randn(1, 3, 39, 45, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


def test_deep_stem_resnets_are_refused() -> None:
    theirs = timm.create_model("resnet50d", pretrained=False)
    with pytest.raises(ConversionError, match="deep-stem"):
        convert_state_dict(theirs.state_dict(), "timm")


def test_unknown_attention_module_is_refused() -> None:
    from timm.models.resnet import Bottleneck, ResNet

    theirs = ResNet(Bottleneck, [3, 4, 6, 3], block_args={"attn_layer": "se"})
    with pytest.raises(ConversionError, match="neither NonLocalAttn nor GlobalContext"):
        convert_state_dict(theirs.state_dict(), "timm")
