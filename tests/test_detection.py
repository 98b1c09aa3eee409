"""Mask R-CNN / Faster R-CNN on our ResNet-FPN: builds, losses, outputs, identity of fresh blocks,
torchvision's state_dict and outputs, parameter counts of the papers, freezing and norms, stage
features and fx tracing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    MaskRCNN,
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from nonlocalnet import GlobalContext, NonLocalNd
from nonlocalnet.models.builders import create_resnet
from nonlocalnet.models.detection import (
    DETECTION_MODELS,
    ResNetFeatures,
    create_detection_backbone,
    create_detection_model,
    detection_gc_placement,
    detection_nl_placement,
)
from nonlocalnet.models.resnet import FrozenBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")

#: small images and few proposals keep a ResNet-50 Mask R-CNN at about a second per pass.
SMALL = {
    "min_size": 128,
    "max_size": 160,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 5,
    "box_score_thresh": 0.0,
}
R50 = [name for name, (kw, _) in DETECTION_MODELS.items() if kw["depth"] == 50]
R101 = [name for name, (kw, _) in DETECTION_MODELS.items() if kw["depth"] == 101]
MASK_LOSSES = {
    "loss_classifier",
    "loss_box_reg",
    "loss_mask",
    "loss_objectness",
    "loss_rpn_box_reg",
}


def _build(name: str, **overrides) -> nn.Module:
    kw, _ = DETECTION_MODELS[name]
    return create_detection_model(**{**kw, **SMALL, **overrides})


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _images(g: torch.Generator) -> list[torch.Tensor]:
    return [torch.rand(3, 128, 160, generator=g), torch.rand(3, 112, 144, generator=g)]


def _targets(masks: bool) -> list[dict[str, torch.Tensor]]:
    out = []
    for (h, w), box, label in (
        ((128, 160), (10, 12, 70, 90), 3),
        ((112, 144), (40, 20, 120, 100), 7),
    ):
        x1, y1, x2, y2 = box
        t = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label])}
        if masks:
            m = torch.zeros(1, h, w, dtype=torch.uint8)
            m[0, y1:y2, x1:x2] = 1
            t["masks"] = m
        out.append(t)
    return out


@torch.no_grad()
def _randomise_norms(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine values, so that the mapping of every key matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, FrozenBatchNorm)):
            n = m.running_mean.numel()
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))


def _assert_same_outputs(a: list[dict], b: list[dict], atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        assert len(x["boxes"]) > 0
        for k in x:
            assert x[k].shape == y[k].shape, k
            torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0.0, msg=k)


# -- registry, placement, parameter counts -------------------------------------------------------


def test_registry_names_and_published_numbers() -> None:
    expected = {
        f"{p}{head}_r{d}_fpn{s}"
        for head in ("maskrcnn", "faster_rcnn")
        for d in (50, 101)
        for p, s in (("", ""), ("gc_", ""), ("gc_", "_r4"), ("nl_", ""))
    }
    assert set(DETECTION_MODELS) == expected
    desc = {name: d for name, (_, d) in DETECTION_MODELS.items()}
    assert "37.2/33.8" in desc["maskrcnn_r50_fpn"]
    assert "39.4/35.7" in desc["gc_maskrcnn_r50_fpn"]
    assert "39.7/35.9" in desc["gc_maskrcnn_r50_fpn"]
    assert "39.9/36.2" in desc["gc_maskrcnn_r50_fpn_r4"]
    assert DETECTION_MODELS["gc_maskrcnn_r50_fpn_r4"][0] == {
        "arch": "mask_rcnn",
        "depth": 50,
        "blocks": "gc",
        "gc_ratio": 0.25,
    }


def test_placements_follow_the_papers() -> None:
    assert detection_nl_placement(50) == [[], [], [4], []]  # res4 has 6 blocks: before block 5
    assert detection_nl_placement(101) == [[], [], [21], []]  # 23 blocks: before block 22
    assert detection_gc_placement(50) == [[], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2]]
    with pytest.raises(ValueError, match="bottleneck"):
        detection_nl_placement(18)


def test_gc_and_nl_parameter_counts_on_a_plain_resnet50() -> None:
    plain = _params(create_resnet(depth=50, num_classes=0))
    for ratio, added in ((1 / 16, 2_521_741), (1 / 4, 10_000_909)):
        gc = create_resnet(
            depth=50,
            num_classes=0,
            gc_placement=detection_gc_placement(50),
            gc_kwargs={"ratio": ratio, "pooling": "att", "fusion": ("add",)},
        )
        assert _params(gc) - plain == added
    nl = create_resnet(depth=50, num_classes=0, nonlocal_placement=detection_nl_placement(50))
    assert _params(nl) - plain == _params(NonLocalNd(1024, dims=2))


#: torchvision's parameter counts of the baselines (``maskrcnn_resnet50_fpn``: 44,401,393).
BASELINE_PARAMS = {
    ("mask_rcnn", 50): 44_401_393,
    ("faster_rcnn", 50): 41_755_286,
    ("mask_rcnn", 101): 63_341_297,
    ("faster_rcnn", 101): 60_695_190,
}
#: R101 models built in the default suite (one per kind of block); the others are slow.
R101_QUICK = ["gc_maskrcnn_r101_fpn", "nl_maskrcnn_r101_fpn"]


@pytest.fixture(scope="module")
def baseline_keys() -> dict[tuple[str, int], set[str]]:
    cache: dict[tuple[str, int], set[str]] = {}
    return cache


@pytest.mark.parametrize(
    "name",
    [
        n if n in R50 or n in R101_QUICK else pytest.param(n, marks=pytest.mark.slow)
        for n in DETECTION_MODELS
    ],
)
def test_every_model_builds_with_its_blocks(name: str, baseline_keys: dict) -> None:
    kw, _ = DETECTION_MODELS[name]
    model = create_detection_model(**kw)
    arch, depth, blocks = kw["arch"], kw["depth"], kw.get("blocks")
    assert isinstance(model, MaskRCNN if arch == "mask_rcnn" else FasterRCNN)
    assert (model.roi_heads.mask_head is not None) == (arch == "mask_rcnn")
    added = _params(model) - BASELINE_PARAMS[(arch, depth)]
    body = model.backbone.body
    gcs = [n for n, m in body.named_modules() if isinstance(m, GlobalContext)]
    nls = [n for n, m in body.named_modules() if isinstance(m, NonLocalNd)]
    if blocks is None:
        assert added == 0 and not gcs and not nls
    elif blocks == "gc":
        layers = (4, 6, 3) if depth == 50 else (4, 23, 3)
        assert gcs == [
            f"layer{s}.{i}.gc" for s, n in zip((2, 3, 4), layers, strict=True) for i in range(n)
        ]
        assert all(
            m.ratio == kw["gc_ratio"] and m.pooling == "att" and m.fusion == ("add",)
            for m in body.modules()
            if isinstance(m, GlobalContext)
        )
        if depth == 50:
            assert added == {1 / 16: 2_521_741, 1 / 4: 10_000_909}[kw["gc_ratio"]]
    else:
        assert nls == [f"layer3.{4 if depth == 50 else 21}.after"]
        assert added == _params(NonLocalNd(1024, dims=2))
    if (arch, depth) not in baseline_keys:  # blocks add keys only
        baseline_keys[(arch, depth)] = set(
            create_detection_model(arch=arch, depth=depth).state_dict()
        )
    keys = set(model.state_dict())
    assert {k for k in keys if ".gc." not in k and ".after." not in k} == baseline_keys[
        (arch, depth)
    ]


# -- forward -------------------------------------------------------------------------------------


@torch.no_grad()
def _calibrate_norms(model: nn.Module) -> None:
    """Running statistics from one batch: a randomly initialised ResNet-101 with BN statistics
    (0, 1) grows its activations to ~1e5 and its RPN then proposes nothing."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    batch, _ = model.transform(_images(torch.Generator().manual_seed(9)))  # normalised, padded
    model.backbone(batch.tensors)
    for m in norms:
        m.momentum = 0.1


def _check_forward(name: str) -> None:
    kw, _ = DETECTION_MODELS[name]
    masks = kw["arch"] == "mask_rcnn"
    if kw["depth"] == 50:
        model = _build(name)
    else:
        model = _build(name, norm="bn", trainable_layers=5)
        _calibrate_norms(model)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = model(_images(g), _targets(masks))
    assert set(losses) == (MASK_LOSSES if masks else MASK_LOSSES - {"loss_mask"})
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(_images(g))
    assert len(out) == 2
    for o, (h, w) in zip(out, ((128, 160), (112, 144)), strict=True):
        n = len(o["boxes"])
        assert 0 < n <= SMALL["box_detections_per_img"]
        assert (
            o["boxes"].shape == (n, 4) and o["labels"].shape == (n,) and o["scores"].shape == (n,)
        )
        assert (o["boxes"][:, 2:] >= o["boxes"][:, :2]).all()
        assert (o["boxes"][:, 2] <= w).all() and (o["boxes"][:, 3] <= h).all()
        assert ((o["labels"] >= 1) & (o["labels"] < 91)).all()
        if masks:
            assert o["masks"].shape == (n, 1, h, w)
            assert ((o["masks"] >= 0) & (o["masks"] <= 1)).all()
        else:
            assert "masks" not in o


@pytest.mark.parametrize("name", R50)
def test_r50_train_losses_and_eval_outputs(name: str) -> None:
    _check_forward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", R101)
def test_r101_train_losses_and_eval_outputs(name: str) -> None:
    _check_forward(name)


@pytest.mark.parametrize("blocks", ["gc", "nl"])
def test_gradient_reaches_the_blocks(blocks: str) -> None:
    model = _build(f"{blocks}_maskrcnn_r50_fpn")
    model.train()
    losses = model(_images(torch.Generator().manual_seed(0)), _targets(True))
    sum(losses.values()).backward()
    body = model.backbone.body
    if blocks == "gc":
        last = [m.transform_add[-1] for m in body.modules() if isinstance(m, GlobalContext)]
    else:
        last = [m.norm for m in body.modules() if isinstance(m, NonLocalNd)]
    assert len(last) == (13 if blocks == "gc" else 1)
    for m in last:  # zero-initialised, so the first gradient flows into these only
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert body.conv1.weight.grad is None  # frozen stem
    assert body.layer2[0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name", ["gc_maskrcnn_r50_fpn", "gc_maskrcnn_r50_fpn_r4", "nl_maskrcnn_r50_fpn"]
)
def test_fresh_blocks_leave_the_baseline_unchanged(name: str) -> None:
    base = _build("maskrcnn_r50_fpn")
    _randomise_norms(base)
    model = _build(name)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".gc." in k or ".after." in k for k in result.missing_keys)
    base.eval()
    model.eval()
    x = _images(torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_same_outputs(base(x), model(x))


# -- torchvision's weights -----------------------------------------------------------------------


def test_torchvision_maskrcnn_state_dict_loads_strictly_and_gives_equal_outputs() -> None:
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL)
    _randomise_norms(tv)
    x = _images(torch.Generator().manual_seed(3))
    tv.eval()
    with torch.no_grad():
        expected = tv(x)

    # the torchvision checkpoint (BatchNorm2d, num_batches_tracked) into the default (FrozenBN)
    ours = _build("maskrcnn_r50_fpn")
    assert (
        str(ours.load_state_dict(tv.state_dict(), strict=True)) == "<All keys matched successfully>"
    )
    ours.eval()
    with torch.no_grad():
        feats_tv = tv.backbone(
            torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
        )
        feats = ours.backbone(torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(4)))
    assert list(feats) == list(feats_tv) == ["0", "1", "2", "3", "pool"]
    for k in feats:  # BatchNorm2d vs x * scale + shift: equal up to float32 rounding
        assert (feats[k] - feats_tv[k]).abs().max() <= 1e-5 * feats_tv[k].abs().max()

    # same norm modules as torchvision's weights=None model: bit-identical detections
    ours_bn = _build("maskrcnn_r50_fpn", norm="bn", trainable_layers=5)
    ours_bn.load_state_dict(tv.state_dict(), strict=True)
    ours_bn.eval()
    with torch.no_grad():
        _assert_same_outputs(ours_bn(x), expected)


def test_same_modules_as_torchvision_with_frozen_bn() -> None:
    """torchvision's pretrained-backbone recipe (FrozenBatchNorm2d, 3 trainable layers): same keys
    in the same order, the same frozen parameters, identical outputs, strict both ways."""
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    tv = MaskRCNN(backbone, num_classes=91, **SMALL)
    _randomise_norms(tv)
    ours = _build("maskrcnn_r50_fpn")
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(tv.state_dict())
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained == [n for n, p in tv.named_parameters() if p.requires_grad]
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in trained)
    x = _images(torch.Generator().manual_seed(5))
    tv.eval()
    ours.eval()
    with torch.no_grad():
        _assert_same_outputs(ours(x), tv(x))


def test_torchvision_faster_rcnn_state_dict_loads_strictly() -> None:
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = create_detection_model(arch="faster_rcnn")
    assert (
        str(ours.load_state_dict(tv.state_dict(), strict=True)) == "<All keys matched successfully>"
    )


# -- freezing and norms --------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["bn", "sync_bn"])
def test_trained_stages_update_statistics_frozen_stages_do_not(norm: str) -> None:
    backbone = create_detection_backbone(norm=norm, trainable_layers=3)
    body = backbone.body
    bn_type = nn.SyncBatchNorm if norm == "sync_bn" else nn.BatchNorm2d
    assert isinstance(body.bn1, FrozenBatchNorm)
    assert all(not isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm) for m in body.layer1.modules())
    assert isinstance(body.layer2[0].bn1, bn_type) and isinstance(body.layer4[2].bn3, bn_type)
    before1 = body.layer1[0].bn1.running_mean.clone()
    before2 = body.layer2[0].bn1.running_mean.clone()
    backbone.train()
    backbone(torch.rand(2, 3, 64, 64))
    assert torch.equal(body.layer1[0].bn1.running_mean, before1)
    assert not torch.equal(body.layer2[0].bn1.running_mean, before2)
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "layer1")) for n in frozen)


def test_trainable_layers_counts_from_the_top() -> None:
    for k, first_trained in ((0, None), (1, "layer4"), (3, "layer2"), (5, "conv1")):
        body = create_detection_backbone(trainable_layers=k).body
        trained = [n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad]
        assert (trained[0] if trained else None) == first_trained
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        create_detection_backbone(trainable_layers=6)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="arch"):
        create_detection_model(arch="retinanet")
    with pytest.raises(ValueError, match="blocks"):
        create_detection_model(blocks="ann")
    with pytest.raises(ValueError, match="norm"):
        create_detection_model(norm="group")
    with pytest.raises(ValueError, match="bottleneck"):
        create_detection_model(depth=18)
    with pytest.raises(ValueError, match="num_classes"):
        create_detection_model(num_classes=1)
    with pytest.raises(ValueError, match="gc_kwargs"):
        create_detection_model(gc_kwargs={"pooling": "avg"})


# -- stage features and fx ----------------------------------------------------------------------


def test_stage_features_feed_an_fpn() -> None:
    resnet = create_resnet(depth=50, num_classes=0, norm="frozen_bn")
    feats = ResNetFeatures(resnet, out_indices=(2, 3, 4))
    assert [d["num_chs"] for d in feats.feature_info] == [512, 1024, 2048] == feats.out_channels
    assert feats.feature_info.channels() == [512, 1024, 2048]
    assert feats.feature_info.reduction() == [8, 16, 32]
    assert feats.feature_info.module_name() == ["layer2", "layer3", "layer4"]
    assert set(feats.state_dict()) <= set(resnet.state_dict())
    x = torch.rand(1, 3, 64, 96)
    out = feats(x)
    ref = resnet.forward_stages(x)
    assert isinstance(out, list) and len(out) == 3
    for a, b in zip(out, ref[1:], strict=True):
        assert torch.equal(a, b)
    as_dict = ResNetFeatures(resnet, out_indices=(2, 3, 4), as_dict=True)(x)
    assert list(as_dict) == ["0", "1", "2"] and torch.equal(as_dict["2"], ref[3])
    dilated = create_resnet(depth=50, num_classes=0, output_stride=8)
    assert [d["reduction"] for d in ResNetFeatures(dilated).feature_info] == [4, 8, 8, 8]
    with pytest.raises(ValueError, match="out_indices"):
        ResNetFeatures(resnet, out_indices=(0, 1))
    with pytest.raises(ValueError, match="increasing"):
        ResNetFeatures(resnet, out_indices=(3, 2))
    with pytest.raises(TypeError, match="ResNet"):
        ResNetFeatures(nn.Conv2d(3, 3, 1))


def _with_random_blocks(blocks: str) -> nn.Module:
    kw = (
        {"gc_placement": detection_gc_placement(50)}
        if blocks == "gc"
        else {"nonlocal_placement": detection_nl_placement(50)}
    )
    model = create_resnet(depth=50, num_classes=0, **kw).eval()
    with torch.no_grad():
        for m in model.modules():  # blocks that are not the identity, so skipping one shows
            if isinstance(m, GlobalContext | NonLocalNd):
                for p in m.parameters():
                    p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("blocks", ["gc", "nl"])
def test_fx_feature_extractor_traces_stage_features_with_leaf_blocks(blocks: str) -> None:
    model = _with_random_blocks(blocks)
    feats = ResNetFeatures(model)
    fx = create_feature_extractor(
        feats,
        return_nodes={"layer2": "c3", "layer4": "c5"},
        tracer_kwargs={"leaf_modules": [GlobalContext, NonLocalNd]},
    )
    called = {str(n.target) for n in fx.graph.nodes if n.op == "call_module"}
    assert ("layer3.4.after" in called) if blocks == "nl" else ("layer2.0.gc" in called)
    x = torch.rand(1, 3, 64, 64)
    out, ref = fx(x), feats(x)
    assert torch.equal(out["c3"], ref[1]) and torch.equal(out["c5"], ref[3])


@pytest.mark.parametrize("leaf", [True, False])
def test_fx_feature_extractor_traces_the_resnet_itself(leaf: bool) -> None:
    """torchvision's create_feature_extractor on the ResNet (its input check and the blocks'
    step aside while tracing), with the blocks as leaves or traced through."""
    model = _with_random_blocks("gc")
    kwargs = {"leaf_modules": [GlobalContext, NonLocalNd]} if leaf else {}
    fx = create_feature_extractor(
        model, return_nodes={"layer2": "c3", "layer4": "c5"}, tracer_kwargs=kwargs
    )
    called = {str(n.target) for n in fx.graph.nodes if n.op == "call_module"}
    assert ("layer2.0.gc" in called) == leaf
    x = torch.rand(1, 3, 64, 64)
    out, ref = fx(x), model.forward_stages(x)
    assert torch.equal(out["c3"], ref[1]) and torch.equal(out["c5"], ref[3])
