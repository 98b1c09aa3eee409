"""2D ResNets: torchvision keys/shapes, parameter counts, dilation, frozen BN, checkpointing,
the deep stem, the pool1 padding, torch.fx tracing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nonlocalnet.models import create_model, create_resnet
from nonlocalnet.models.resnet import FrozenBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")


FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(depth: int) -> dict[str, tuple[int, ...]]:
    """key -> shape from torchvision's own definition (see fixtures/make_torchvision_keys.py)."""
    out = {}
    for line in (FIXTURES / f"resnet{depth}_torchvision_keys.txt").read_text().splitlines():
        key, _, shape = line.partition(" ")
        out[key] = tuple(int(s) for s in shape.split(",") if s)
    return out


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_torchvision_keys_and_shapes(depth):
    expected = _fixture(depth)
    with torch.device("meta"):
        model = create_model(f"resnet{depth}")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys, same order
    assert got == expected


def test_torchvision_checkpoint_loads_strict():
    # a checkpoint with torchvision's keys and shapes (values random) loads with strict=True
    # and its values end up in the right places
    expected = _fixture(18)
    state = {k: torch.randn(s) if s else torch.tensor(7) for k, s in expected.items()}
    model = create_model("resnet18")
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(
        model.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"]
    )
    torch.testing.assert_close(model.fc.bias, state["fc.bias"])


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet50", 25_557_032), ("resnet101", 44_549_160), ("resnet18", 11_689_512)],
)
def test_parameter_counts(name, params):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_gc_r16_adds_2_52m_params():
    with torch.device("meta"):
        base = sum(p.numel() for p in create_model("resnet50").parameters())
        gc = sum(p.numel() for p in create_model("gc_resnet50").parameters())
        gc4 = sum(p.numel() for p in create_model("gc_resnet50_r4").parameters())
    assert abs((gc - base) - 2.52e6) <= 0.02e6
    assert gc - base == 2_521_741  # c3: 4x33,889 + c4: 6x133,313 + c5: 3x528,769
    assert gc4 > gc


@pytest.mark.parametrize(("os", "size"), [(32, 2), (16, 4), (8, 8)])
def test_output_stride_by_dilation(os, size):
    model = create_resnet(depth=50, output_stride=os, num_classes=0).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 2048, size, size)
    if os == 8:
        # torchvision's semantics: layer3 block 0 keeps dilation 1, later blocks 2; layer4 2 then 4
        assert model.layer3[0].conv2.dilation == (1, 1)
        assert model.layer3[1].conv2.dilation == (2, 2)
        assert model.layer4[0].conv2.dilation == (2, 2)
        assert model.layer4[2].conv2.dilation == (4, 4)
        assert model.layer4[0].conv2.stride == (1, 1)


def test_frozen_bn_equals_bn_in_eval_and_has_no_grad():
    torch.manual_seed(1)
    bn_model = create_resnet(
        block="bottleneck", layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), num_classes=3
    )
    # give BN non-trivial statistics and affine parameters
    for m in bn_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    frozen = create_resnet(
        block="bottleneck",
        layers=(1, 1, 1, 1),
        widths=(4, 8, 8, 8),
        num_classes=3,
        norm="frozen_bn",
    )
    result = frozen.load_state_dict(bn_model.state_dict(), strict=True)
    assert not result.missing_keys
    assert isinstance(frozen.bn1, FrozenBatchNorm)
    x = torch.randn(2, 3, 32, 32)
    bn_model.eval()
    frozen.train()  # frozen statistics even in training mode
    torch.testing.assert_close(frozen(x), bn_model(x), rtol=1e-5, atol=1e-5)
    names = {n for n, _ in frozen.named_parameters()}
    assert not any("bn" in n for n in names)


def test_grad_checkpointing_same_values_and_grads():
    kw = {"block": "basic", "layers": (2, 1, 1, 1), "widths": (4, 8, 8, 8), "num_classes": 3}
    a = create_resnet(**kw)
    b = create_resnet(grad_checkpointing=True, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_matches_a_hand_written_forward():
    # the forward is torchvision's: check one bottleneck against the formula
    model = create_resnet(
        block="bottleneck", layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), num_classes=3
    ).eval()
    blk = model.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = torch.relu(blk.bn1(blk.conv1(x)))
    out = torch.relu(blk.bn2(blk.conv2(out)))
    out = blk.bn3(blk.conv3(out))
    torch.testing.assert_close(blk(x), torch.relu(out + blk.downsample(x)))
    assert blk.conv2.stride == (2, 2) and blk.conv1.stride == (1, 1)  # stride on the 3x3 (v1.5)


def test_bad_input():
    model = create_model("resnet_tiny")
    with pytest.raises(ValueError, match=r"4-d tensor \(B, C, H, W\), got shape \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="depth must be one of"):
        create_resnet(depth=42)
    with pytest.raises(ValueError, match="layers must be 4 positive ints"):
        create_resnet(block="basic", layers=(1, 0, 1, 1))
    with pytest.raises(ValueError, match="unknown norm"):
        create_resnet(norm="gn")


@pytest.mark.parametrize(
    ("name", "spatial"),
    [
        ("resnet_tiny", [(16, 16), (8, 8), (4, 4), (2, 2)]),
        # c2d_tiny on 8x32x32: res2 at 8 frames (before pool2), 4 frames from res3 on
        ("c2d_tiny", [(8, 8, 8), (4, 4, 4), (4, 2, 2), (4, 1, 1)]),
    ],
)
def test_forward_stages_are_the_stage_outputs(name, spatial):
    model = create_model(name).eval()
    seen = {}
    for k, stage in enumerate(model.stages()):
        stage.register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, o))
    x = torch.randn(2, *model.default_input)
    with torch.no_grad():
        stages = model.forward_stages(x)
        features = model.forward_features(x)
        logits = model(x)
    assert [tuple(s.shape[2:]) for s in stages] == spatial
    assert [s.shape[1] for s in stages] == [8, 16, 32, 64]
    assert all(stages[k] is seen[k] for k in range(4))  # the stage outputs themselves
    assert torch.equal(features, stages[-1])
    torch.testing.assert_close(logits, model.forward_head(stages[-1]), rtol=0, atol=0)


def test_forward_stages_with_grad_checkpointing():
    kw = {"block": "basic", "layers": (2, 1, 2, 1), "widths": (4, 8, 8, 8), "num_classes": 0}
    a = create_resnet(**kw)
    b = create_resnet(grad_checkpointing=True, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    sa, sb = a.forward_stages(x), b.forward_stages(x)
    for ta, tb in zip(sa, sb, strict=True):
        torch.testing.assert_close(ta, tb)
    sum(t.square().sum() for t in sa).backward()
    sum(t.square().sum() for t in sb).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_deep_stem_has_the_keys_and_shapes_of_mmseg_resnetv1c():
    # mmseg ResNetV1c (deep_stem=True, stem_channels=64): backbone.stem.{0,1,3,4,6,7}
    model = create_resnet(depth=50, deep_stem=True)
    stem = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("stem.")}
    bn = ("weight", "bias", "running_mean", "running_var")
    expected = {"stem.0.weight": (32, 3, 3, 3), "stem.3.weight": (32, 32, 3, 3)}
    expected["stem.6.weight"] = (64, 32, 3, 3)
    for i, c in (("1", 32), ("4", 32), ("7", 64)):
        expected.update({f"stem.{i}.{n}": (c,) for n in bn})
        expected[f"stem.{i}.num_batches_tracked"] = ()
    assert stem == expected
    plain = create_resnet(depth=50)
    rest = {k for k in plain.state_dict() if not k.startswith(("conv1.", "bn1."))}
    assert set(model.state_dict()) - set(stem) == rest  # every other key unchanged
    assert not hasattr(model, "conv1") and model.deep_stem is True


def test_deep_stem_forward_is_three_convs_then_the_max_pooling():
    model = create_resnet(depth=18, deep_stem=True, num_classes=3).double().eval()
    with torch.no_grad():
        for m in model.stem:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 37, 41, dtype=torch.float64)

    def conv_bn_relu(x, conv, bn, stride):
        y = torch.nn.functional.conv2d(x, conv.weight, stride=stride, padding=1)
        return torch.relu(
            torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        )

    s = model.stem
    with torch.no_grad():
        y = conv_bn_relu(conv_bn_relu(conv_bn_relu(x, s[0], s[1], 2), s[3], s[4], 1), s[6], s[7], 1)
        torch.testing.assert_close(model.forward_stem(x), y, rtol=0, atol=1e-12)
        y = torch.nn.functional.max_pool2d(y, 3, 2, 1)
        torch.testing.assert_close(model.layer1(y), model.forward_stages(x)[0], rtol=0, atol=0)


def test_deep_stem_bad_input():
    from nonlocalnet.models.resnet import ResNet

    with pytest.raises(ValueError, match="deep_stem is a 2D stem"):
        ResNet("basic", (1, 1, 1, 1), dims=3, deep_stem=True)
    with pytest.raises(ValueError, match="even stem_channels"):
        ResNet("basic", (1, 1, 1, 1), stem_channels=7, deep_stem=True)


def test_pool1_padding():
    """torchvision pads the 3x3 max pooling by 1 (37 -> 19 -> 10); padding 0 floors (37 -> 19
    -> 9), as the official Caffe2 video nets."""
    from nonlocalnet.models.resnet import ResNet

    x = torch.randn(1, 3, 37, 41)
    default = ResNet("basic", (1, 1, 1, 1), num_classes=0)
    unpadded = ResNet("basic", (1, 1, 1, 1), num_classes=0, pool1_padding=0)
    unpadded.load_state_dict(default.state_dict())
    assert default.maxpool.padding == (1, 1) and unpadded.maxpool.padding == (0, 0)
    with torch.no_grad():
        stem = default.forward_stem(x)  # (1, 64, 19, 21)
        assert default.maxpool(stem).shape[-2:] == (10, 11)
        pooled = unpadded.maxpool(stem)
        assert pooled.shape[-2:] == (9, 10)
        torch.testing.assert_close(
            pooled, torch.nn.functional.max_pool2d(stem, 3, 2), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match=r"pool1_padding must lie in \[0, kernel // 2\]"):
        ResNet("basic", (1, 1, 1, 1), pool1_padding=2)
    with pytest.raises(ValueError, match="pool1_padding must be an int or 2 ints"):
        ResNet("basic", (1, 1, 1, 1), pool1_padding=(0, 0, 0))


def test_fx_traces_the_resnet():
    """torchvision's create_feature_extractor traces the network (the input checks stand aside
    while torch.fx traces) and returns the stage outputs of forward_stages."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = create_model("resnet_tiny").eval()
    nodes = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5", "fc": "logits"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        out = extractor(x)
        for got, want in zip(
            [out[k] for k in ("c2", "c3", "c4", "c5")], model.forward_stages(x), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(out["logits"], model(x), rtol=0, atol=0)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    # outside tracing the checks still run
    with pytest.raises(ValueError, match=r"4-d tensor \(B, C, H, W\)"):
        model(torch.randn(3, 37, 45))
