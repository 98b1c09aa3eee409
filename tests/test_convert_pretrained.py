"""Pretrained starts: a torchvision ResNet (random weights) loaded into video and segmentation nets.

On a static clip (every frame the same image) the inflated network computes the 2D network
frame by frame: exactly for C2D, and for I3D on the frames the zero temporal padding does not
reach. Inserted blocks keep their zero initialisation, so they are the identity.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from nonlocalnet.convert import load_pretrained
from nonlocalnet.models import create_model, inserted_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def tv_resnet(depth: int, **kw) -> torch.nn.Module:
    net = getattr(torchvision.models, f"resnet{depth}")(**kw)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.1, 0.3) if name.endswith("bn3") else m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.double().eval()


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    net = tv_resnet(50)
    path = tmp_path_factory.mktemp("tv") / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    return net, path


def tv_stages(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        out.append(x)
    return out


def test_c2d_equals_the_2d_network_frame_by_frame(r50_file) -> None:
    net, path = r50_file
    model = create_model("nl_c2d_r50").double().eval()
    report = load_pretrained(model, path)
    assert len(report.loaded) == 318 and len(report.inflated) == 53
    assert sorted(k for k, _ in report.dropped) == ["fc.bias", "fc.weight"]
    nl_keys = [k for k in report.new if ".after." in k]
    assert len(nl_keys) == 5 * 13 and set(report.new) - set(nl_keys) == {"fc.weight", "fc.bias"}
    frame = torch.randn(1, 3, 32, 36, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1).contiguous()  # (B, C, T, H, W)
    with torch.no_grad():
        ours = model.forward_stages(clip)
        ref = tv_stages(net, frame)
        for a, b in zip(ours, ref, strict=True):
            for t in range(a.shape[2]):
                assert rel(a[:, :, t], b) <= 1e-10
        for name, block in inserted_blocks(model).items():
            c = block.channels
            z = torch.randn(1, c, 2, 4, 4, dtype=torch.float64)
            assert torch.equal(block(z), z), name


def _clean_frames(frames: int, model: torch.nn.Module) -> list[slice]:
    """Per stage, the frames the zero temporal padding does not reach (I3D 3x1x1, official)."""
    reach = 1  # conv1 (5 taps, stride 2) then pool1 (2, stride 2): one frame at each end
    t = frames // 4
    out = []
    for s, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        if s == 1:  # pool2 halves time
            t, reach = t // 2, -(-reach // 2)
        reach += sum(int(b.conv1.kernel_size[0] == 3) for b in layer)
        out.append(slice(reach, t - reach))
    return out


@pytest.mark.parametrize("frames,stages", [(48, 1), (160, 4)])
def test_i3d_equals_the_2d_network_on_inner_frames(r50_file, frames, stages) -> None:
    net, path = r50_file
    model = create_model("i3d_r50").double().eval()
    report = load_pretrained(model, path)
    assert report.new == ["fc.weight", "fc.bias"] and len(report.inflated) == 53
    frame = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()
    clean = _clean_frames(frames, model)
    with torch.no_grad():
        ours = model.forward_stages(clip)
        ref = tv_stages(net, frame)
        for s in range(stages):
            inner = ours[s][:, :, clean[s]]
            assert inner.shape[2] >= 1
            for t in range(inner.shape[2]):
                assert rel(inner[:, :, t], ref[s]) <= 1e-10
            edge = ours[s][:, :, 0]
            assert rel(edge, ref[s]) > 1e-6  # the padding does reach the first frame


def test_gc_blocks_start_as_the_identity(r50_file) -> None:
    net, path = r50_file
    model = create_model("gc_resnet50").double().eval()
    report = load_pretrained(model, path)
    assert not report.dropped and all(".gc." in k for k in report.new)
    x = torch.randn(1, 3, 35, 41, dtype=torch.float64)
    with torch.no_grad():
        assert rel(model(x), net(x)) <= 1e-10


@pytest.mark.slow
def test_segmentation_backbone_is_the_dilated_2d_network(tmp_path) -> None:
    net = tv_resnet(101)
    path = tmp_path / "resnet101.pth"
    torch.save(net.state_dict(), path)
    model = create_model("ann_r101_os8").double().eval()
    report = load_pretrained(model, path)
    assert {k for k, _ in report.dropped} == {"fc.weight", "fc.bias"}
    assert all(k.startswith(("head.", "aux_head.")) for k in report.new)
    assert len(report.loaded) == len(net.state_dict()) - 2
    dilated = tv_resnet(101, replace_stride_with_dilation=[False, True, True])
    dilated.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 41, 47, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(model.backbone.forward_stages(x), tv_stages(dilated, x), strict=True):
            assert rel(a, b) <= 1e-10


def test_segmentation_backbone_r50(r50_file) -> None:
    net, path = r50_file
    model = create_model("ann_r50_os8").double().eval()
    load_pretrained(model, path)
    dilated = tv_resnet(50, replace_stride_with_dilation=[False, True, True])
    dilated.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 41, 47, dtype=torch.float64)
    with torch.no_grad():
        assert rel(model.backbone.forward_features(x), tv_stages(dilated, x)[-1]) <= 1e-10


def test_load_2d_checkpoint_refuses_a_checkpoint_that_loads_nothing() -> None:
    from nonlocalnet.models import load_2d_checkpoint

    model = create_model("c2d_tiny")
    foreign = {
        "backbone.conv1.conv.weight": torch.zeros(8, 3, 5, 5),
        "cls_head.fc.weight": torch.zeros(2),
    }
    with pytest.raises(ValueError, match="none of the 2 tensors of the checkpoint fits ResNet"):
        load_2d_checkpoint(model, foreign)
    with pytest.raises(ValueError, match="none of the 0 tensors"):
        load_2d_checkpoint(model, {})
