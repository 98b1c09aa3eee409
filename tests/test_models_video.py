"""Video ResNets: C2D/I3D structure, parameter counts, inflation from 2D, speed, compile."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from nonlocalnet.models import (
    create_model,
    create_resnet,
    create_video_resnet,
    inflate_state_dict,
    load_2d_checkpoint,
)
from nonlocalnet.models.video_resnet import official_inflation_pattern

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_parameter_counts():
    # C2D R101 is ResNet-101 with a 400-way classifier: 44,549,160 - 2,049,000 + 819,600
    assert _params(_meta("c2d_r101")) == 43_319_760
    assert abs(_params(_meta("c2d_r101")) - 43.3e6) < 0.05e6
    i3d = _params(_meta("i3d_r50"))
    nl_i3d = _params(_meta("nl_i3d_r50", pairwise="dot_product"))
    assert abs(i3d - 28.0e6) < 0.05e6  # mmaction2: 28.0M
    assert abs(nl_i3d - 35.4e6) <= 0.01 * 35.4e6  # mmaction2: 35.4M
    # 5 NL blocks: 2 at 512 channels (526,592 each) and 3 at 1024 (2,101,760 each)
    assert nl_i3d - i3d == 2 * 526_592 + 3 * 2_101_760


def test_default_input_and_classes():
    model = _meta("nl_c2d_r50")
    assert model.default_input == (3, 32, 224, 224)
    assert model.fc.out_features == 400


def test_c2d_temporal_structure_paper_table1():
    # 32x224x224: conv1 (t stride 2) -> 16, pool1 -> 8 at res2, pool2 -> 4 from res3 on
    model = _meta("c2d_r50")
    sizes = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda m, a, o, n=name: sizes.__setitem__(n, o.shape[2:])
        )
    model(torch.zeros(1, 3, 32, 224, 224, device="meta"))
    assert sizes == {
        "conv1": (16, 112, 112),
        "layer1": (8, 56, 56),
        "layer2": (4, 28, 28),
        "layer3": (4, 14, 14),
        "layer4": (4, 7, 7),
    }
    assert all(
        k == 1 for m in model.modules() if isinstance(m, torch.nn.Conv3d) for k in m.kernel_size[:1]
    )


def test_i3d_inflation_pattern():
    assert official_inflation_pattern((3, 4, 6, 3)) == [
        [1, 1, 1],
        [1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0],
        [0, 1, 0],
    ]
    i3d = _meta("i3d_r50")
    assert i3d.conv1.kernel_size == (5, 7, 7)
    t = [[blk.conv1.kernel_size[0] for blk in stage] for stage in i3d.stages()]
    assert t == [[3, 3, 3], [3, 1, 3, 1], [3, 1, 3, 1, 3, 1], [1, 3, 1]]
    assert all(blk.conv2.kernel_size == (1, 3, 3) for stage in i3d.stages() for blk in stage)
    i3d3 = _meta("i3d_r50_3x3x3")
    t = [[blk.conv2.kernel_size[0] for blk in stage] for stage in i3d3.stages()]
    assert t == [[3, 3, 3], [3, 1, 3, 1], [3, 1, 3, 1, 3, 1], [1, 3, 1]]
    assert all(blk.conv1.kernel_size == (1, 1, 1) for stage in i3d3.stages() for blk in stage)
    r101 = _meta("i3d_r101")
    assert [blk.conv1.kernel_size[0] for blk in r101.layer3] == [
        3 if i % 2 == 0 else 1 for i in range(23)
    ]


def _tiny_2d():
    return create_resnet(
        block="bottleneck",
        layers=(1, 2, 1, 1),
        widths=(4, 8, 8, 16),
        stem_channels=8,
        num_classes=7,
    )


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


def test_c2d_from_2d_checkpoint_same_logits_on_identical_frames():
    """C2D (all temporal kernels 1) from a 2D checkpoint: exactly the 2D net on one frame.

    Every convolution sees one frame; temporal max/avg pooling over identical frames is the
    identity; so the logits equal the 2D logits (eval mode), for a real ImageNet-style stem.
    """
    net2d = _tiny_2d()
    _randomise_bn(net2d)
    c2d = create_video_resnet(
        block="bottleneck",
        layers=(1, 2, 1, 1),
        widths=(4, 8, 8, 16),
        stem_channels=8,
        num_classes=7,
    )
    result = load_2d_checkpoint(c2d, net2d.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    net2d.eval()
    c2d.eval()
    frame = torch.randn(2, 3, 48, 48)
    clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1)  # (B, C, T, H, W), identical frames
    torch.testing.assert_close(c2d(clip), net2d(frame), rtol=1e-5, atol=1e-5)


def test_i3d_from_2d_checkpoint_exact_on_centre_frames():
    """I3D from a 2D checkpoint on identical frames: exact where zero temporal padding is unseen.

    An inflated t-kernel (weights w/t) sums t copies of the same frame = the 2D kernel, except
    within t//2 frames of either end, where the zero padding drops terms. With no temporal
    striding or pooling (so frames stay aligned), conv1 (5 frames, reach 2) and 5 inflated 3x1x1
    convolutions (reach 1 each) leave frames [7, T-7) exact. This test proves that the inflated
    weights reproduce the 2D features there (res5 output, before pooling), and that the edge
    frames do differ (so the statement is not vacuous).
    """
    net2d = _tiny_2d()
    _randomise_bn(net2d)
    i3d = create_video_resnet(
        block="bottleneck",
        layers=(1, 2, 1, 1),
        widths=(4, 8, 8, 16),
        stem_channels=8,
        num_classes=7,
        inflation="3x1x1",
        inflation_pattern=[[1], [1, 1], [1], [1]],
        conv1_stride=(1, 2, 2),
        pool1_kernel=(1, 3, 3),
        pool1_stride=(1, 2, 2),
        pool2_temporal=1,
    )
    state, skipped = inflate_state_dict(net2d.state_dict(), i3d)
    assert skipped == []
    torch.testing.assert_close(
        state["conv1.weight"].sum(2), net2d.conv1.weight
    )  # w/t summed over t
    assert state["conv1.weight"].shape == (8, 3, 5, 7, 7)
    i3d.load_state_dict(state, strict=True)
    net2d.eval()
    i3d.eval()
    T = 18
    frame = torch.randn(1, 3, 48, 48)
    clip = frame.unsqueeze(2).expand(-1, -1, T, -1, -1).contiguous()
    with torch.no_grad():
        f2d = net2d.forward_features(frame)  # (1, C, h, w)
        f3d = i3d.forward_features(clip)  # (1, C, T, h, w)
    reach = 2 + 5  # conv1, then layer1.0, layer2.0, layer2.1, layer3.0, layer4.0
    for t in range(reach, T - reach):
        torch.testing.assert_close(f3d[:, :, t], f2d, rtol=1e-5, atol=1e-5)
    assert (f3d[:, :, 0] - f2d).abs().max() > 1e-3
    assert (f3d[:, :, reach - 1] - f2d).abs().max() > 1e-6  # the reach is tight


def test_inflate_skips_mismatched_head():
    net2d = create_model("resnet_tiny")  # 10 classes
    c2d = create_model("c2d_tiny", num_classes=4)
    state, skipped = inflate_state_dict(net2d.state_dict(), c2d)
    assert set(skipped) == {"fc.weight", "fc.bias", "conv1.weight"}  # conv1 is 7x7 vs 1x5x5
    result = c2d.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias", "conv1.weight"}


def test_tiny_models_fast():
    for name in ("c2d_tiny", "nl_c2d_tiny"):
        model = create_model(name)
        x = torch.randn(1, 3, 8, 32, 32)
        model(x).sum().backward()  # warm-up
        start = time.perf_counter()
        model(x).sum().backward()
        assert time.perf_counter() - start < 1.0, name


def test_video_builder_options():
    model = create_video_resnet(
        block="basic",
        layers=(1, 1, 1, 1),
        widths=(4, 4, 8, 8),
        stem_channels=4,
        in_channels=1,
        num_classes=2,
        conv1_kernel=(3, 3, 3),
        conv1_stride=(1, 1, 1),
        pool1_kernel=None,
        pool2_temporal=1,
        inflation="3x3x3",
        dropout=0.2,
        nonlocal_placement=[[0], [], [], []],
        nonlocal_kwargs={"pairwise": "dot_product", "extent": "time"},
    )
    assert model.conv1.kernel_size == (3, 3, 3)
    assert model.layer1[0].after.pairwise == "dot_product"
    assert model.layer1[0].after.extent == "time"
    assert model.layer1[0].conv1.kernel_size == (3, 3, 3)  # basic blocks: first conv inflated
    out = model(torch.randn(2, 1, 4, 16, 16))
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown inflation"):
        create_video_resnet(inflation="2x1x1")
    with pytest.raises(ValueError, match=r"5-d tensor \(B, C, T, H, W\)"):
        model(torch.randn(2, 1, 16, 16))
    c2d = create_model("c2d_tiny")  # pool2 halves time
    assert c2d.min_frames() == 2 and c2d.frames_at_res5(8) == 4
    with pytest.raises(ValueError, match=r"1 frames is too short.*at least 2 frames"):
        c2d(torch.randn(1, 3, 1, 32, 32))
    with torch.device("meta"):
        # conv1 (k1, s2): 7 -> 4, pool1 (k2, s2): 4 -> 2, pool2 (k2): 2 -> 1
        assert create_model("c2d_r50").min_frames() == 7


def test_torch_compile_video_model():
    """Graph capture of the whole NL C2D (forward hooks of the inserted blocks included)."""
    model = create_model("nl_c2d_tiny").eval()
    x = torch.randn(1, 3, 8, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        model.layer2[0].after.norm.weight.fill_(0.5)  # the compiled NL block really runs
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor_training_step():
    """Inductor (about a minute of compilation on 2 busy cores): forward and gradients."""
    model = create_model("nl_c2d_tiny")
    with torch.no_grad():
        model.layer2[0].after.norm.weight.fill_(0.5)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    # absolute tolerance relative to the largest gradient: a conv bias followed by BN has a
    # gradient that is zero up to rounding, which differs between the two programs
    scale = max(float(q.grad.abs().max()) for q in reference.parameters())
    pairs = zip(model.named_parameters(), reference.named_parameters(), strict=True)
    for (n, p), (_, q) in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_torch_export_keeps_inserted_blocks():
    model = create_model("nl_c2d_tiny").eval()
    with torch.no_grad():
        model.layer3[0].after.norm.weight.fill_(0.5)
    x = torch.randn(1, 3, 8, 32, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_load_2d_checkpoint_from_file(tmp_path):
    net2d = _tiny_2d()
    path = tmp_path / "imagenet.pt"
    torch.save({"model": net2d.state_dict(), "step": 3}, path)
    nl_c2d = create_video_resnet(
        block="bottleneck",
        layers=(1, 2, 1, 1),
        widths=(4, 8, 8, 16),
        stem_channels=8,
        num_classes=7,
        nonlocal_placement=[[], [1], [], []],
    )
    result = load_2d_checkpoint(nl_c2d, str(path))
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("layer2.1.after.") for k in result.missing_keys)
    torch.testing.assert_close(nl_c2d.layer3[0].conv2.weight[:, :, 0], net2d.layer3[0].conv2.weight)


def test_pool1_padding_of_the_official_nets():
    """The official Caffe2 pool1 (2x3x3, stride 2) pads 0: 112 -> 55 (ours by default: 56)."""
    with torch.device("meta"):
        default = create_model("i3d_r50")
        official = create_model("i3d_r50", pool1_padding=(0, 0, 0))
    assert default.maxpool.padding == (0, 1, 1) and official.maxpool.padding == (0, 0, 0)
    assert set(default.state_dict()) == set(official.state_dict())  # the same weights
    x = torch.randn(1, 64, 16, 112, 112, device="meta")
    assert default.maxpool(x).shape[2:] == (8, 56, 56)
    assert official.maxpool(x).shape[2:] == (8, 55, 55)
    assert official.frames_at_res5(32) == 4 and official.min_frames() == 7
    tiny = create_model("c2d_tiny", pool1_padding=0)
    clip = torch.randn(1, 3, 8, 33, 33)
    with torch.no_grad():
        pooled = tiny.maxpool(tiny.forward_stem(clip))
        torch.testing.assert_close(
            pooled, torch.nn.functional.max_pool3d(tiny.forward_stem(clip), (1, 3, 3), (1, 2, 2))
        )
