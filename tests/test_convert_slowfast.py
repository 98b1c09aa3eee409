"""SlowFast's own ResNet (the ``slowfast`` 1.0 release on PyPI, facebookresearch/SlowFast code of
December 2019) converted and compared with ours in float64.

The release requires detectron2, which has no distribution for this environment, so the Makefile
installs it without dependencies (plus fvcore and yacs, which its model builder and config use);
detectron2 is imported only by the AVA detection head (``ROIAlign``), stood in here by
torchvision's. Its video head pools a window fixed by ``DATA.CROP_SIZE`` and applies softmax at
test time: the logits are compared at the configured size, the res5 features at every size.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torchvision
from torch import nn

from nonlocalnet.convert import convert_state_dict

pytest.importorskip("fvcore")
pytest.importorskip("yacs")
if importlib.util.find_spec("slowfast") is None:
    pytest.skip("slowfast is not installed (make test installs it)", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slowfast_builder():
    layers = types.ModuleType("detectron2.layers")
    layers.ROIAlign = torchvision.ops.RoIAlign
    package = types.ModuleType("detectron2")
    package.layers = layers
    saved = {k: sys.modules.get(k) for k in ("detectron2", "detectron2.layers")}
    sys.modules.update({"detectron2": package, "detectron2.layers": layers})
    try:
        from slowfast.config.defaults import get_cfg
        from slowfast.models.video_model_builder import ResNetModel

        yield get_cfg, ResNetModel
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _randomise(model: nn.Module) -> None:
    """BN statistics and affine terms away from their init, the NL output convs non-zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.Conv3d) and "nonlocal" in name:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)


@pytest.mark.parametrize(
    ("arch", "instantiation", "expected"),
    [("i3d", "softmax", "nl_i3d_r50"), ("c2d", "dot_product", "nl_c2d_r50")],
)
def test_slowfast_resnet_with_nonlocal_blocks(slowfast_builder, arch, instantiation, expected):
    get_cfg, resnet_model = slowfast_builder
    cfg = get_cfg()
    cfg.MODEL.ARCH = arch
    cfg.RESNET.DEPTH = 50
    cfg.MODEL.NUM_CLASSES = 5
    cfg.DATA.INPUT_CHANNEL_NUM = [3]
    cfg.DATA.NUM_FRAMES = 8
    cfg.DATA.CROP_SIZE = 64
    cfg.NONLOCAL.LOCATION = [[[]], [[1, 3]], [[1, 3, 5]], [[]]]  # the NL paper's 5 blocks
    cfg.NONLOCAL.GROUP = [[1], [1], [1], [1]]
    cfg.NONLOCAL.INSTANTIATION = instantiation
    torch.manual_seed(0)
    theirs = resnet_model(cfg)
    _randomise(theirs)
    theirs = theirs.double().eval()
    theirs.head.act = nn.Identity()  # the logits (softmax at test time in SlowFast)

    conv = convert_state_dict(
        {"model_state": theirs.state_dict(), "epoch": 1}, "slowfast", instantiation=instantiation
    )
    assert conv.model_name == expected
    ours = conv.model.double().eval()
    ours.load_state_dict(conv.state_dict)

    def their_features(x: torch.Tensor) -> torch.Tensor:
        y = theirs.s2(theirs.s1([x]))
        y[0] = theirs.pathway0_pool(y[0])
        return theirs.s5(theirs.s4(theirs.s3(y)))[0]

    def our_features(x: torch.Tensor) -> torch.Tensor:
        y = ours.maxpool(ours.relu(ours.bn1(ours.conv1(x))))
        y = ours.layer1(y)
        if getattr(ours, "pool2", None) is not None:
            y = ours.pool2(y)
        return ours.layer4(ours.layer3(ours.layer2(y)))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    with torch.no_grad():
        x = torch.randn(1, 3, 8, 64, 64, dtype=torch.float64)
        want = theirs([x])
        assert want.abs().max() > 1.0  # not a near-zero output
        assert rel(ours(x), want) <= 1e-10
        for size in [(8, 57, 71), (6, 45, 39)]:  # odd sizes: the stem and the pools
            x = torch.randn(1, 3, *size, dtype=torch.float64)
            assert rel(our_features(x), their_features(x)) <= 1e-10
