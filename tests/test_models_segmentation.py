"""Segmentation networks: dilated backbone, heads, aux output, upsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nonlocalnet.layers.asymmetric import AFNB, APNB
from nonlocalnet.models import create_model, create_segmentation_model

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {
    "block": "basic",
    "layers": (1, 1, 2, 1),
    "widths": (8, 16, 32, 64),
    "stem_channels": 8,
    "head_channels": 16,
    "num_classes": 4,
}


@pytest.mark.parametrize(("os", "size"), [(8, 8), (16, 4)])
def test_output_stride(os, size):
    model = create_segmentation_model(output_stride=os, **TINY).eval()
    feats = {}
    model.backbone.layer4.register_forward_hook(lambda m, a, o: feats.setdefault("c5", o))
    model.backbone.layer3.register_forward_hook(lambda m, a, o: feats.setdefault("c4", o))
    out = model(torch.randn(1, 3, 64, 64))["out"]
    assert out.shape == (1, 4, 64, 64)
    assert feats["c5"].shape[-2:] == (size, size)
    assert feats["c4"].shape[-2:] == (8 if os == 8 else 4, 8 if os == 8 else 4)


def test_train_returns_aux_eval_does_not_and_upsampling_is_bilinear():
    model = create_segmentation_model(head="fcn", **TINY)
    assert model.aux_weight == 0.4
    x = torch.randn(2, 3, 48, 40)
    model.train()
    out = model(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 4, 48, 40)
    model.eval()
    out = model(x)
    assert set(out) == {"out"}
    # the logits are the head's output at 1/8 resolution, bilinearly upsampled
    b = model.backbone
    with torch.no_grad():
        c5 = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        low = model.head(c5)
    assert low.shape[-2:] == (6, 5)
    expected = F.interpolate(low, size=(48, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["out"], expected)
    no_aux = create_segmentation_model(aux=False, **TINY).train()
    assert set(no_aux(x)) == {"out"}


def test_ann_head_wiring():
    model = create_segmentation_model(
        head="ann", head_kwargs={"key_channels": 8, "value_channels": 8}, **TINY
    ).eval()
    assert isinstance(model.head.fusion, AFNB) and isinstance(model.head.context, APNB)
    seen = {}
    model.head.fusion.register_forward_hook(
        lambda m, a, o: seen.update(low=a[0].shape, high=a[1].shape, out=o.shape)
    )
    model.head.context.register_forward_hook(lambda m, a, o: seen.update(ctx=a[0].shape))
    model(torch.randn(1, 3, 64, 64))
    assert seen["low"] == (1, 32, 8, 8)  # stage 4 (layer3)
    assert seen["high"] == (1, 64, 8, 8)  # stage 5 (layer4)
    assert seen["out"] == (1, 64, 8, 8)
    assert seen["ctx"] == (1, 16, 8, 8)  # after the 3x3 conv to head_channels


def test_zoo_segmentation_defaults():
    with torch.device("meta"):
        ann = create_model("ann_r101_os8")
    assert ann.num_classes == 19
    assert ann.head.fusion.key_channels == 256
    assert ann.head.conv[0].out_channels == 512
    assert ann.backbone.layer4[0].conv2.stride == (1, 1)
    # an ImageNet ResNet-101 checkpoint fits the backbone (only the unused fc differs)
    with torch.device("meta"):
        r101 = create_model("resnet101")
    result = ann.backbone.load_state_dict(r101.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]


def test_bad_input_and_options():
    model = create_segmentation_model(**TINY)
    with pytest.raises(ValueError, match="4-d tensor"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="unknown head"):
        create_segmentation_model(head="psp", **TINY)
    with pytest.raises(ValueError, match="unknown output_stride"):
        create_segmentation_model(output_stride=32, **TINY)
    with pytest.raises(ValueError, match="takes no head_kwargs"):
        create_segmentation_model(head="fcn", head_kwargs={"ratio": 0.25}, **TINY)


def test_backbone_runs_through_forward_stages():
    """The network takes stages 4 and 5 from ``ResNet.forward_stages`` (so the backbone's own
    options, such as gradient checkpointing, apply)."""
    model = create_segmentation_model(head="ann", **TINY).train()
    calls = []
    stages = model.backbone.forward_stages
    model.backbone.forward_stages = lambda x: calls.append(x.shape) or stages(x)
    x = torch.randn(1, 3, 32, 32)
    out = model(x)
    assert calls == [x.shape]
    del model.backbone.forward_stages
    checkpointed = create_segmentation_model(head="ann", **TINY).train()
    checkpointed.load_state_dict(model.state_dict())
    checkpointed.backbone.grad_checkpointing = True
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = checkpointed(x)
    for k in ("out", "aux"):
        torch.testing.assert_close(a[k], b[k])
    assert out["out"].shape == (1, 4, 32, 32)


def test_deep_stem_backbone():
    """deep_stem gives the backbone mmseg ResNetV1c's stem (backbone.stem.*), nothing else."""
    deep = create_segmentation_model(deep_stem=True, **TINY)
    plain = create_segmentation_model(**TINY)
    keys, plain_keys = set(deep.state_dict()), set(plain.state_dict())
    assert {k for k in keys - plain_keys} == {
        k for k in keys if k.startswith("backbone.stem.")
    } and "backbone.stem.6.weight" in keys
    assert plain_keys - keys == {
        k for k in plain_keys if k.startswith(("backbone.conv1.", "backbone.bn1."))
    }
    assert deep.eval()(torch.randn(1, 3, 33, 35))["out"].shape == (1, 4, 33, 35)


@pytest.mark.parametrize("head", ["nl", "gc"])
def test_concat_input_head(head):
    """conv_cat (3x3 conv, BN, ReLU) of [head input, block-path output], then the classifier."""
    model = create_segmentation_model(head=head, concat_input=True, **TINY).eval()
    h = model.head
    assert h.conv_cat[0].in_channels == 64 + 16 and h.conv_cat[0].out_channels == 16
    with torch.no_grad():
        for m in h.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(2, 64, 5, 7)
        out = h.conv_out(h.block(h.conv_in(x)))
        fused = h.conv_cat(torch.cat([x, out], dim=1))
        torch.testing.assert_close(h(x), h.classifier(fused), rtol=0, atol=0)
        assert not torch.allclose(h(x), h.classifier(out))
    plain = create_segmentation_model(head=head, **TINY)
    assert plain.head.conv_cat is None
    assert {k for k in model.state_dict()} - set(plain.state_dict()) == {
        k for k in model.state_dict() if k.startswith("head.conv_cat.")
    }
    with pytest.raises(ValueError, match="concat_input applies to block heads"):
        create_segmentation_model(head="ann", concat_input=True, **TINY)
