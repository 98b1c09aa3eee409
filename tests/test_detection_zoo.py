"""The detection models of the zoo (``create_model(name, num_classes=...)``), the features_only
backbone API (timm's) on the zoo's ResNets, and the detectors' parameters and multiply-adds at
COCO's 800x1333."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.feature_extraction import create_feature_extractor

from nonlocalnet.layers import GlobalContext, NonLocalNd
from nonlocalnet.models import (
    check_identity,
    create_model,
    inserted_blocks,
    list_models,
    model_info,
    without_blocks,
    zoo,
)
from nonlocalnet.models.detection import DETECTION_MODELS
from nonlocalnet.models.features import ResNetFeatures
from nonlocalnet.models.flops import count_flops

pytestmark = pytest.mark.usefixtures("one_thread")

DETECTION = list_models(task="detection")
TINY = [n for n in DETECTION if n.endswith("_tiny")]
#: narrow widths and heads, small images and few regions: every registered structure (depth,
#: blocks, placement, heads) in well under a second per pass.
NARROW = {
    "widths": (8, 16, 32, 64),
    "stem_channels": 8,
    "fpn_channels": 16,
    "representation_size": 32,
    "mask_channels": 16,
    "min_size": 96,
    "max_size": 128,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 30,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 5,
    "box_score_thresh": 0.0,
}
LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def _small(name: str) -> dict:
    return {"box_score_thresh": 0.0} if name in TINY else dict(NARROW)


def _images(g: torch.Generator) -> list[torch.Tensor]:
    return [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 112, generator=g)]


def _targets(masks: bool) -> list[dict[str, torch.Tensor]]:
    out = []
    for (h, w), box, label in (((96, 128), (10, 12, 50, 60), 1), ((80, 112), (30, 20, 90, 70), 2)):
        x1, y1, x2, y2 = box
        t = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label])}
        if masks:
            m = torch.zeros(1, h, w, dtype=torch.uint8)
            m[0, y1:y2, x1:x2] = 1
            t["masks"] = m
        out.append(t)
    return out


def test_the_papers_detectors_are_registered_with_their_numbers() -> None:
    assert set(DETECTION_MODELS) | set(TINY) == set(DETECTION)
    assert "detection" in zoo.TASKS
    for name, (kwargs, description) in DETECTION_MODELS.items():
        info = model_info(name)
        assert info.task == "detection"
        assert dict(info.defaults) == kwargs, name
        # the papers' box/mask AP of the description are in the zoo's docstring
        doc = " ".join(info.doc.split())
        for figure in re.findall(r"\d+\.\d/\d+\.\d", description):
            assert figure in doc, (name, figure)
        assert info.default_input() == (3, 800, 1333)
    assert "37.2/33.8" in model_info("maskrcnn_r50_fpn").doc
    assert "39.4/35.7" in model_info("gc_maskrcnn_r50_fpn").doc
    assert "39.9/36.2" in model_info("gc_maskrcnn_r50_fpn_r4").doc
    assert "39.0/35.5" in model_info("nl_maskrcnn_r50_fpn").doc
    assert "40.8/37.1" in model_info("nl_maskrcnn_r101_fpn").doc
    assert model_info("gc_maskrcnn_r50_fpn").block_key == "gc_kwargs"
    assert model_info("nl_maskrcnn_r50_fpn").block_key == "nonlocal_kwargs"
    assert model_info("maskrcnn_r50_fpn").block_key is None


@pytest.mark.parametrize("name", DETECTION)
def test_every_detector_trains_and_detects(name: str) -> None:
    model = create_model(name, num_classes=4, **_small(name))
    masks = model_info(name).defaults["arch"] == "mask_rcnn"
    assert isinstance(model, MaskRCNN if masks else FasterRCNN)
    assert model.model_name == name
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    if masks:
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = model(_images(g), _targets(masks))
    assert set(losses) == (LOSSES | {"loss_mask"} if masks else LOSSES)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if name not in TINY:  # torchvision's recipe: stem and res2 frozen
        assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1"))
                              for n in frozen)  # fmt: skip
    for bname, block in inserted_blocks(model).items():
        assert sum(float(p.grad.abs().sum()) for p in block.parameters()) > 0, bname
    model.eval()
    with torch.no_grad():
        out = model(_images(g))
    for o, (h, w) in zip(out, ((96, 128), (80, 112)), strict=True):
        n = len(o["boxes"])
        assert set(o) == ({"boxes", "labels", "scores", "masks"} if masks else
                          {"boxes", "labels", "scores"})  # fmt: skip
        assert o["boxes"].shape == (n, 4) and o["scores"].shape == o["labels"].shape == (n,)
        assert ((o["labels"] >= 1) & (o["labels"] < 4)).all()
        if masks:
            assert o["masks"].shape == (n, 1, h, w)


@pytest.mark.parametrize("name", [n for n in DETECTION if n.startswith(("gc_", "nl_"))])
def test_fresh_blocks_of_every_detector_are_the_identity(name: str) -> None:
    model = create_model(name, num_classes=4, **_small(name))
    blocks = inserted_blocks(model)
    kinds = {type(b) for b in blocks.values()}
    assert kinds == ({GlobalContext} if name.startswith("gc_") else {NonLocalNd})
    if name.startswith("gc_") and name not in TINY:  # c3-c5 of R50 / R101
        assert len(blocks) == (13 if "_r50_" in name else 30)
    if name.startswith("nl_"):
        expected = "layer3.0" if name in TINY else "layer3.4" if "_r50_" in name else "layer3.21"
        assert list(blocks) == [f"backbone.body.{expected}.after"]
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
    assert check_identity(without_blocks(model), model, [[image]])


def test_block_options_reach_the_detectors_blocks() -> None:
    model = create_model("gc_maskrcnn_r50_fpn", ratio=1 / 4, fusion=("add", "mul"), **NARROW)
    gcs = [m for m in model.modules() if isinstance(m, GlobalContext)]
    assert gcs and all(b.ratio == 0.25 and b.fusion == ("mul", "add") for b in gcs)
    model = create_model("nl_faster_rcnn_r50_fpn", pairwise="dot_product", **NARROW)
    assert [b.pairwise for b in inserted_blocks(model).values()] == ["dot_product"]
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) 'min_sise'.*min_size"):
        create_model("maskrcnn_tiny", min_sise=64)
    with pytest.raises(TypeError, match="features_only needs an image or video ResNet"):
        create_model("maskrcnn_tiny", features_only=True)


def test_norms_freezing_and_sync_bn() -> None:
    model = create_model("gc_maskrcnn_r50_fpn", norm="sync_bn", **NARROW)
    body = model.backbone.body
    assert isinstance(body, ResNetFeatures) and body.feature_info.channels() == [32, 64, 128, 256]
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in body.layer1.modules())
    assert isinstance(body.layer2[0].bn1, nn.SyncBatchNorm)
    # in one process SyncBatchNorm is BatchNorm: the model builds, trains and evaluates
    model.train()
    losses = model(_images(torch.Generator().manual_seed(0)), _targets(True))
    assert torch.isfinite(sum(losses.values()))


# -- features_only --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n for n in list_models() if model_info(n).task in ("image", "video")]
)
def test_features_only_on_every_resnet(name: str) -> None:
    with torch.device("meta"):
        feats = create_model(name, features_only=True, out_indices=(2, 4))
    assert isinstance(feats, ResNetFeatures) and feats.model_name == name
    info = feats.feature_info
    assert info.module_name() == ["layer2", "layer4"] and len(info) == 2
    assert info.reduction() == [8, 32]
    assert info.channels(1) == feats.out_channels[1]
    assert not any(k.startswith("fc.") for k in feats.state_dict())


def test_features_only_gives_the_stage_outputs_and_feeds_torchvisions_fpn() -> None:
    model = create_model("gc_resnet50", widths=(8, 16, 32, 64), stem_channels=8).eval()
    with torch.no_grad():
        for m in inserted_blocks(model).values():  # blocks that are not the identity
            for p in m.parameters():
                p.normal_(0.0, 0.05)
    feats = create_model("gc_resnet50", features_only=True, widths=(8, 16, 32, 64),
                         stem_channels=8)  # fmt: skip
    feats.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    feats.eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = feats(x)
        ref = model.forward_stages(x)
    assert isinstance(out, list) and len(out) == 4
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    assert [o.shape[1] for o in out] == feats.feature_info.channels() == [32, 64, 128, 256]
    assert [x.shape[-1] // o.shape[-1] for o in out] == feats.feature_info.reduction()
    # torchvision's BackboneWithFPN over the features module (its children run in order)
    fpn = BackboneWithFPN(
        feats,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=feats.feature_info.channels([1, 2, 3]),
        out_channels=16,
    ).eval()
    with torch.no_grad():
        levels = fpn(x)
    assert list(levels) == ["0", "1", "2", "pool"] and levels["0"].shape == (2, 16, 8, 12)
    # torchvision's fx feature extractor traces it, through the GC blocks (no leaf modules)
    fx = create_feature_extractor(feats, return_nodes={"layer3": "c4"})
    assert any(".gc." in str(n.target) or "gc" in str(n.name) for n in fx.graph.nodes)
    with torch.no_grad():
        assert torch.equal(fx(x)["c4"], ref[2])
    with pytest.raises(ValueError, match="out_indices goes with features_only"):
        create_model("resnet_tiny", out_indices=(1, 2))
    with pytest.raises(ValueError, match="out_indices"):
        create_model("resnet_tiny", features_only=True, out_indices=(0, 5))


# -- parameters and multiply-adds at 800x1333 ------------------------------------------------------


def _report(name: str):
    with torch.device("meta"):
        model = create_model(name)
    return count_flops(model, (1, 3, 800, 1333), name=name)


def test_detector_flops_at_coco_size() -> None:
    base, gc, gc4, nl = (
        _report(n)
        for n in ("maskrcnn_r50_fpn", "gc_maskrcnn_r50_fpn", "gc_maskrcnn_r50_fpn_r4",
                  "nl_maskrcnn_r50_fpn")
    )  # fmt: skip
    # the transform's resize leaves 800x1333 and pads to a multiple of 32
    assert base.input_size == (1, 3, 800, 1344)
    assert base.params == 44_401_393
    assert gc.params - base.params == 2_521_741 and gc4.params - base.params == 10_000_909
    assert nl.params - base.params == sum(p.numel() for p in NonLocalNd(1024, dims=2).parameters())
    assert set(base.stages) == {"stem", "res2", "res3", "res4", "res5", "fpn", "rpn", "box_head",
                                "mask_head"}  # fmt: skip
    assert sum(m for _, m in base.stages.values()) == base.macs
    # box head: 1000 proposals through fc6 (256*7*7 -> 1024) and fc7 (1024 -> 1024), predictor
    fc = 256 * 49 * 1024 + 1024 * 1024 + 1024 * (91 + 91 * 4)
    assert base.stages["box_head"][1] == 1000 * fc
    # GC: about 0.1% of the multiply-adds (GCNet's Table 1); NL in res4 at 50x84 positions: more
    assert 0 < gc.macs - base.macs < 0.001 * base.macs
    assert len(gc.blocks) == 13 and gc.macs - base.macs == sum(m for _, m in gc.blocks.values())
    assert nl.macs - base.macs == nl.blocks["backbone.body.layer3.4.after"][1] > 0.05 * base.macs
    # the same backbone counts as the classification ResNet-50 on the same padded image (its
    # params differ by the BN affine values, buffers of the frozen BN)
    with torch.device("meta"):
        resnet = create_model("resnet50")
    plain = count_flops(resnet, (1, 3, 800, 1344))
    for part in ("stem", "res2", "res3", "res4", "res5"):
        assert base.stages[part][1] == plain.stages[part][1], part


def test_flops_subcommand_on_detectors(capsys: pytest.CaptureFixture) -> None:
    from nonlocalnet.cli import main

    assert main(["flops", "gc_maskrcnn_r50_fpn", "--relative-to", "maskrcnn_r50_fpn"]) == 0
    out = capsys.readouterr().out
    assert "maskrcnn_r50_fpn on 1x3x800x1344: 44,401,393 params" in out
    assert "backbone.body.layer4.2.gc" in out and "mask_head" in out
    table = out.split("relative to maskrcnn_r50_fpn")[1]
    row = next(line for line in table.splitlines() if line.startswith("  gc_maskrcnn_r50_fpn "))
    assert row.split()[1:2] == ["46.92"] and row.split()[-1] == "1.00"
