"""Pretrained starts without a converter: ``nonlocalnet.models.weights``.

A torchvision ResNet (random weights, random BatchNorm statistics) or a checkpoint of this
library goes into any model: inflated into video networks, into the ResNet inside segmentation
and detection models, the inserted blocks and heads new (blocks still the identity), the ImageNet
classifier dropped, anything else refused with the keys named. Checkpoints of other
implementations are pointed to ``nonlocalnet.convert``.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nonlocalnet.models import create_model, create_segmentation_model, inserted_blocks
from nonlocalnet.models.weights import (
    META_FORMAT,
    META_MODEL,
    META_OVERRIDES,
    META_REPORT,
    PEER_SOURCES,
    WeightsError,
    load_pretrained,
    read_weights,
    stored_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tv_resnet(depth: int, **kw) -> nn.Module:
    net = getattr(torchvision.models, f"resnet{depth}")(**kw)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                last = name.endswith(("bn3", "bn2")) and "layer" in name
                m.weight.uniform_(0.1, 0.3) if last else m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    net = tv_resnet(18)
    path = tmp_path_factory.mktemp("tv") / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)
    return net, path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# -- into video networks ------------------------------------------------------------------------


def test_a_torchvision_resnet50_starts_nl_c2d_and_training_starts(tmp_path) -> None:
    net = tv_resnet(50)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    model = create_model("nl_c2d_r50")
    report = load_pretrained(model, path)
    summary = report.summary()
    assert summary.startswith(f"nl_c2d_r50 <- {path} (torchvision): loaded 318 keys")
    assert "(53 inflated from 2D)" in summary
    assert "new 67 (layer2 (res3) NL blocks: 26, layer3 (res4) NL blocks: 39, fc: 2)" in summary
    assert "dropped 2 (fc.bias, fc.weight)" in summary
    assert (
        report.dropped[0][1]
        == "classifier of another shape ((1000, 2048) vs the model's (400, 2048))"
    )
    w = net.state_dict()["layer1.0.conv1.weight"]  # C2D: 1x1x1, the 2D kernel as it is
    assert torch.equal(model.layer1[0].conv1.weight[:, :, 0], w)
    for name, block in inserted_blocks(model).items():
        z = torch.randn(1, block.channels, 2, 4, 4)
        with torch.no_grad():
            assert torch.equal(block.eval()(z), z), name  # zero-initialised: the identity
    # training starts: one SGD step moves the NL blocks' zero-initialised BN scale
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clip, labels = torch.randn(2, 3, 8, 64, 64), torch.tensor([3, 7])
    loss = F.cross_entropy(model(clip), labels)
    loss.backward()
    assert torch.isfinite(loss)
    gamma = model.layer2[1].after.norm.weight
    assert float(gamma.grad.abs().sum()) > 0
    optim.step()
    assert float(gamma.detach().abs().sum()) > 0


def test_i3d_from_a_file_equals_the_2d_network_on_inner_frames(r18, tmp_path) -> None:
    """A 3x1x1 I3D ResNet-18 (basic blocks: the first 3x3 inflated to 3x3x3 in res2)."""
    net, path = r18
    model = create_model(
        "i3d_r50", depth=18, inflation_pattern=[[1, 0], [0, 0], [0, 0], [0, 0]]
    ).double()
    report = load_pretrained(model, path)
    assert len(report.inflated) == 20 and report.new == ["fc.weight", "fc.bias"]
    w = net.state_dict()["layer1.0.conv1.weight"].double()  # float32, divided in float64
    assert torch.equal(model.layer1[0].conv1.weight[:, :, 1], w / 3)
    model.eval()
    frame = torch.randn(1, 3, 40, 44, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, 40, -1, -1).contiguous()  # (B, C, T, H, W)
    net = copy.deepcopy(net).double()  # the fixture's network stays float32
    with torch.no_grad():
        c2 = model.forward_stages(clip)[0]  # 40 -> conv1 20 -> pool1 10 frames
        x = net.maxpool(net.relu(net.bn1(net.conv1(frame))))
        ref = net.layer1(x)
        for t in range(2, 8):  # conv1 (5 taps) and the 3x3x3 conv reach two frames
            assert rel(c2[:, :, t], ref) <= 1e-10
        assert rel(c2[:, :, 0], ref) > 1e-6


# -- into the ResNet inside a model -------------------------------------------------------------


def test_a_segmentation_backbone(r18) -> None:
    net, path = r18
    model = create_segmentation_model(depth=18, head="nl", num_classes=3, head_channels=16)
    report = load_pretrained(model, path)
    assert "a ResNet's keys loaded into model.backbone" in report.notes
    assert {k for k, _ in report.dropped} == {"fc.weight", "fc.bias"}
    assert report.new and all(k.startswith(("head.", "aux_head.")) for k in report.new)
    assert report.dropped[0][1] == "the model has no such classifier"
    ours = model.backbone.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(ours[k], v), k
    assert "backbone layer2 (res3)" in report.table()


class Detector(nn.Module):
    """A model holding a ResNet at backbone.body, with parts of its own around it."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = body
        self.backbone.fpn = nn.Conv2d(512, 8, 1)
        self.rpn = nn.Conv2d(8, 3, 1)


def test_the_resnet_of_a_detector_and_frozen_norms(r18) -> None:
    net, path = r18
    model = Detector(create_model("resnet18", num_classes=0, norm="frozen_bn"))
    report = load_pretrained(model, path)
    assert report.model == "Detector"
    assert set(report.new) == {"backbone.fpn.weight", "backbone.fpn.bias", "rpn.weight", "rpn.bias"}
    assert any("20 BatchNorm step counters" in n for n in report.notes)
    assert torch.equal(model.backbone.body.bn1.running_var, net.bn1.running_var)
    two = nn.ModuleDict({"a": create_model("resnet18"), "b": create_model("resnet18")})
    with pytest.raises(WeightsError, match=r"holds 2 ResNets \(a, b\)"):
        load_pretrained(two, path)


def test_an_old_torchvision_file_without_step_counters(r18) -> None:
    net, _ = r18
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = create_model("resnet18")
    report = load_pretrained(model, state)
    assert not report.new and not report.dropped and len(report.loaded) == 122
    assert int(model.bn1.num_batches_tracked) == 0
    x = torch.randn(1, 3, 35, 41)
    with torch.no_grad():
        assert rel(model.eval()(x), net(x)) <= 1e-6


# -- refusals -----------------------------------------------------------------------------------


def test_a_checkpoint_of_another_architecture_is_refused(r18) -> None:
    net, path = r18
    with pytest.raises(WeightsError, match="is a checkpoint of another architecture than resnet50"):
        load_pretrained(create_model("resnet50"), path)
    state = net.state_dict()
    missing = {k: v for k, v in state.items() if k != "layer2.1.bn1.running_var"}
    with pytest.raises(
        WeightsError, match=r"lacks 1 of resnet18's backbone keys .*: layer2\.1\.bn1\.running_var"
    ):
        load_pretrained(create_model("resnet18"), missing)
    shaped = {**state, "layer3.0.conv2.weight": torch.zeros(256, 256, 1, 1)}
    with pytest.raises(
        WeightsError,
        match=r"layer3\.0\.conv2\.weight \(256, 256, 1, 1\) vs model \(256, 256, 3, 3\)",
    ):
        load_pretrained(create_model("resnet18"), shaped)
    with pytest.raises(WeightsError, match="holds no tensors"):
        load_pretrained(create_model("resnet18"), {})
    with pytest.raises(WeightsError, match=r"conv1\.weight is ndarray"):
        load_pretrained(
            create_model("resnet18"), {**state, "conv1.weight": state["conv1.weight"].numpy()}
        )


def test_the_torchvision_format_takes_a_torchvision_resnet_only() -> None:
    state = create_model("nl_c2d_tiny").state_dict()
    with pytest.raises(
        WeightsError,
        match=r"26 key\(s\) are not a torchvision ResNet's: layer2\.0\.after\..*source='nonlocalnet'",
    ):
        load_pretrained(create_model("nl_c2d_tiny"), state)
    report = load_pretrained(create_model("nl_c2d_tiny"), state, source="nonlocalnet")
    assert not report.new and not report.dropped and len(report.loaded) == len(state)


def test_peer_sources_point_to_the_converters(r18) -> None:
    from nonlocalnet.convert import SOURCES

    assert set(PEER_SOURCES) == set(SOURCES) - {"torchvision"}
    _, path = r18
    for source in PEER_SOURCES:
        with pytest.raises(ValueError) as err:
            load_pretrained(create_model("resnet18"), path, source=source)
        message = str(err.value)
        assert f"nonlocalnet.convert.create_model(name, weights=..., source={source!r})" in message
        assert (
            f"nonlocalnet convert --from {source} IN --model NAME --out OUT.safetensors" in message
        )
    with pytest.raises(
        ValueError, match="unknown checkpoint source 'tv'; expected 'torchvision' or"
    ):
        load_pretrained(create_model("resnet18"), path, source="tv")


# -- files --------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_files_that_cannot_be_read_safely(tmp_path, r18) -> None:
    _, path = r18
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"cut\.pth: cannot be read safely with torch\.load"):
        load_pretrained(create_model("resnet18"), cut)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Evil(marker)}, evil)
    with pytest.raises(WeightsError, match="weights_only"):
        load_pretrained(create_model("resnet18"), evil)
    assert not marker.exists()
    blobs = tmp_path / "c2_model.pkl"
    blobs.write_bytes(pickle.dumps({"blobs": {"conv1_w": _Evil(marker)}}, protocol=2))
    with pytest.raises(WeightsError, match=r"Caffe2 pickle converts with nonlocalnet\.convert"):
        read_weights(blobs)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="not found"):
        read_weights(tmp_path / "nope.pth")
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 3)}, st)
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:-5])
    with pytest.raises(WeightsError, match="cannot read the safetensors file"):
        read_weights(tmp_path / "cut.safetensors")


def test_a_training_checkpoint_of_this_library(tmp_path) -> None:
    trained = create_model("nl_c2d_tiny")
    with torch.no_grad():
        trained.layer2[0].after.norm.weight.fill_(0.5)
    path = tmp_path / "checkpoint_00000100.pt"
    torch.save({"model": trained.state_dict(), "step": 100, "optimizer": {"state": {}}}, path)
    model = create_model("nl_c2d_tiny")
    report = load_pretrained(model, path, source="nonlocalnet")
    assert not report.new and len(report.loaded) == len(trained.state_dict())
    assert float(model.layer2[0].after.norm.weight.detach()[0]) == 0.5


def test_a_converted_file_says_where_the_model_differs(tmp_path) -> None:
    from safetensors.torch import save_file

    from nonlocalnet.convert import create_model as create_converted

    floor = {"nonlocal_kwargs": {"sub_sample_rounding": "floor"}}
    source = create_model("nl_c2d_tiny", **floor)
    path = tmp_path / "nl.safetensors"
    meta = {
        META_FORMAT: "nonlocalnet",
        META_MODEL: "nl_c2d_tiny",
        META_OVERRIDES: json.dumps(floor),
        META_REPORT: json.dumps({"block_options": {"nl.sub_sample_rounding": "floor"}}),
        "nonlocalnet.source": "mmaction2",
    }
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path, metadata=meta)
    _, stored = read_weights(path)
    assert stored_model(stored) == ("nl_c2d_tiny", floor)
    report = load_pretrained(create_model("nl_c2d_tiny"), path, source="nonlocalnet")
    assert "converted for 'nl_c2d_tiny' from a mmaction2 checkpoint" in report.notes
    assert len(report.inexact) == 2
    assert all("sub_sample_rounding is 'ceil', the source's 'floor'" in r for r in report.inexact)
    exact = load_pretrained(create_model("nl_c2d_tiny", **floor), path, source="nonlocalnet")
    assert not exact.inexact
    rebuilt = create_converted(weights=path, source="nonlocalnet")
    assert rebuilt.layer2[0].after.sub_sample_rounding == "floor"
    assert not rebuilt.load_report.inexact


def test_the_error_classes() -> None:
    from nonlocalnet.convert import ConversionError

    assert issubclass(WeightsError, ValueError) and issubclass(ConversionError, WeightsError)


@pytest.mark.parametrize("out_indices", [(2, 3), (1, 2, 3, 4)])
def test_stage_features_of_a_pretrained_network(r18, out_indices) -> None:
    """The checkpoint loads into the whole network before ``features_only`` keeps its first
    stages: a file with layer4 and fc loads into ``out_indices=(2, 3)`` too."""
    net, path = r18
    features = create_model(
        "resnet18", features_only=True, out_indices=out_indices, weights=str(path)
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    got = features(x)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        want = []
        for i, stage in enumerate(stages, start=1):
            y = stage(y)
            if i in out_indices:
                want.append(y)
    assert len(got) == len(want)
    assert all(torch.allclose(g, w, atol=1e-5, rtol=1e-4) for g, w in zip(got, want, strict=True))
    assert features.load_report is not None
