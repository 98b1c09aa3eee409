"""Mask R-CNN / Faster R-CNN with NL and GC blocks: our ResNet inside torchvision's detectors.

The detectors are torchvision's (:class:`~torchvision.models.detection.MaskRCNN`,
:class:`~torchvision.models.detection.FasterRCNN`: RPN, RoI heads, NMS, RoIAlign, the
resize/normalise transform) on a :class:`~torchvision.models.detection.backbone_utils.
BackboneWithFPN` whose body is our :class:`~nonlocalnet.models.resnet.ResNet`. The ResNet has
torchvision's module names, so the detector's state_dict has torchvision's keys
(``backbone.body.conv1.weight``, ``backbone.body.layer3.5.bn3.running_var``, ``backbone.fpn.*``,
``rpn.*``, ``roi_heads.*``) and a ``maskrcnn_resnet50_fpn`` checkpoint loads with ``strict=True``.
Blocks add keys only: ``backbone.body.layer2.0.gc.*`` (GC), ``backbone.body.layer3.4.after.*``
(NL).

Placements, as in the papers:

* GC (Cao et al., GCNet §5.1): a :class:`~nonlocalnet.layers.global_context.GlobalContext`
  after the last 1×1 conv (+BN) of every bottleneck of c3–c5, before the residual addition
  (add fusion, attention pooling, r = 1/16 or 1/4). On ResNet-50 it adds 2,521,741 parameters
  at r = 1/16 and 10,000,909 at r = 1/4.
* NL (Wang et al., §6): one :class:`~nonlocalnet.layers.nonlocal_block.NonLocalNd` added to
  res4 right before its last residual block, i.e. after ``layer3[depth - 2]`` (block 4 of 6 in
  ResNet-50, block 21 of 23 in ResNet-101).

Freezing, as torchvision does: ``trainable_layers`` counts the stages trained from the top
(``layer4``, ``layer3``, ``layer2``, ``layer1``, ``conv1``); 3 freezes the stem and res2. Norms:

* ``"frozen_bn"`` (torchvision's detection default): every BN of the ResNet is a
  :class:`~nonlocalnet.models.resnet.FrozenBatchNorm` (statistics and affine fixed).
* ``"bn"`` / ``"sync_bn"``: BN (or ``nn.SyncBatchNorm``, GCNet's best setting, for DDP) in the
  trained stages, with statistics updated in training; the BN of the frozen stages become
  ``FrozenBatchNorm`` (mmdetection's frozen stages: neither weights nor statistics change).
  ``nn.SyncBatchNorm`` behaves as BN in one process; across processes it needs CUDA tensors.

A fresh GC or NL detector equals its baseline with the same weights (the blocks start as the
identity), so ImageNet or COCO weights of the baseline load with ``strict=False`` and only the
blocks' keys missing; ``backbone_weights=`` loads ImageNet weights of the ResNet (torchvision's
``resnet50-0676ba61.pth``, the start of the papers' 1x schedule) before freezing.

``backbone.body`` is a :class:`~nonlocalnet.models.features.ResNetFeatures` (the ResNet's own
modules, so the keys are torchvision's) with ``feature_info``. ``block``/``layers``/``widths``
build a custom ResNet (the zoo's tiny detectors for tests and demos), and ``fpn_channels``,
``representation_size``, ``mask_channels`` and ``anchor_sizes`` size torchvision's heads and
anchors for it; the defaults are torchvision's.

torchvision is imported when a detector is built, so this module (and the zoo's registrations
of its models) imports without it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nonlocalnet._checks import check_choice
from nonlocalnet.layers import list_blocks
from nonlocalnet.models.builders import create_resnet
from nonlocalnet.models.features import ResNetFeatures
from nonlocalnet.models.placement import gc_placement
from nonlocalnet.models.resnet import DEPTHS, FrozenBatchNorm, ResNet
from nonlocalnet.models.weights import load_pretrained

if TYPE_CHECKING:
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

__all__ = [
    "ARCHS",
    "BLOCKS",
    "DETECTION_MODELS",
    "NORMS",
    "ResNetFeatures",
    "create_detection_backbone",
    "create_detection_model",
    "detection_gc_placement",
    "detection_nl_placement",
    "freeze_layers",
    "load_backbone_weights",
]

ARCHS = ("mask_rcnn", "faster_rcnn")
#: the blocks a detector's backbone can hold: GC inside the bottlenecks of c3-c5, or a block
#: placed as the NL block is (after a residual block of res4): "nl" or any other name of the
#: block factory that keeps its input's shape ("dnl", "cca", ...).
BLOCKS = (None, "gc", "nl")
NORMS = ("frozen_bn", "bn", "sync_bn")

#: torchvision's order of the layers that ``trainable_layers`` counts from the top.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")

#: GCNet's GC settings in detection: add fusion, attention pooling (``ratio`` set per model).
_GC_DETECTION = {"pooling": "att", "fusion": ("add",)}


def detection_nl_placement(depth: int) -> list[list[int]]:
    """NL paper §6: one block in res4 right before its last residual block (after block
    ``n - 2`` of the ``n`` blocks of ``layer3``)."""
    return _nl_placement(_layers(depth))


def _nl_placement(layers: Sequence[int]) -> list[list[int]]:
    if layers[2] < 2:
        raise ValueError(
            f"the NL detection placement (res4, right before its last residual block) needs at "
            f"least 2 blocks in res4 (layer3), got layers={tuple(layers)}"
        )
    return [[], [], [layers[2] - 2], []]


def detection_gc_placement(depth: int) -> list[list[int]]:
    """GCNet: every bottleneck of c3–c5 (``layer2``..``layer4``)."""
    return gc_placement(_layers(depth), stages=(1, 2, 3))


def _layers(depth: int) -> tuple[int, int, int, int]:
    if depth not in DEPTHS or DEPTHS[depth][0] != "bottleneck":
        deep = sorted(d for d, (b, _) in DEPTHS.items() if b == "bottleneck")
        raise ValueError(
            f"detection backbones are bottleneck ResNets: depth must be one of {deep}, got {depth!r}"
        )
    return DEPTHS[depth][1]


def freeze_layers(model: ResNet, trainable_layers: int) -> list[str]:
    """Freeze all but the top ``trainable_layers`` stages of a ResNet, as torchvision does.

    The parameters of the frozen stages stop requiring gradients (inserted blocks included),
    and their ``nn.BatchNorm2d`` become :class:`FrozenBatchNorm` with the same statistics and
    affine values, so training changes neither.

    Args:
        model: the ResNet (modified in place).
        trainable_layers: 0..5; stages trained, counted from ``layer4`` (5: all, with ``bn1``).

    Returns:
        The names of the frozen top-level modules.
    """
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
        raise TypeError(f"trainable_layers must be an int, got {type(trainable_layers).__name__}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must lie in [0, 5], got {trainable_layers}")
    trained = list(_TRAINABLE_ORDER[:trainable_layers])
    if trainable_layers == 5:
        trained.append("bn1")
    for name, p in model.named_parameters():
        if not any(name.startswith(layer) for layer in trained):
            p.requires_grad_(False)
    frozen = [
        name
        for name, _ in model.named_children()
        if not any(name.startswith(layer) for layer in trained)
    ]
    for name in frozen:
        _freeze_batch_norms(getattr(model, name), model, name)
    return frozen


def _freeze_batch_norms(module: nn.Module, parent: nn.Module, name: str) -> None:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (``parent.<name>``) by a FrozenBatchNorm."""
    if isinstance(module, nn.BatchNorm2d):
        setattr(parent, name, _frozen_copy(module))
        return
    for child_name, child in list(module.named_children()):
        _freeze_batch_norms(child, module, child_name)


@torch.no_grad()
def _frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(bn.num_features, eps=bn.eps)
    frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    if bn.affine:
        frozen.weight.copy_(bn.weight)
        frozen.bias.copy_(bn.bias)
    if bn.track_running_stats:
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen


def load_backbone_weights(
    model: ResNet, path: str | os.PathLike[str], source: str = "torchvision"
) -> None:
    """Load ImageNet weights of a ResNet into ``model``, the detector's body: torchvision's file
    (``resnet50-0676ba61.pth``), or with ``source="nonlocalnet"`` a checkpoint or safetensors
    export of this library; the blocks' keys stay as initialised, the classifier is dropped
    (:func:`nonlocalnet.models.weights.load_pretrained`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the keys are not those of the ResNet (naming them).
    """
    load_pretrained(model, path, source=source)


def create_detection_backbone(
    *,
    depth: int = 50,
    block: str | None = None,
    layers: Sequence[int] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_channels: int = 64,
    blocks: str | None = None,
    gc_ratio: float = 1 / 16,
    gc_kwargs: Mapping[str, Any] | None = None,
    nonlocal_kwargs: Mapping[str, Any] | None = None,
    nonlocal_placement: Sequence[Sequence[int]] | None = None,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    out_channels: int = 256,
    backbone_weights: str | os.PathLike[str] | None = None,
) -> BackboneWithFPN:
    """Our ResNet (with NL/GC blocks) under torchvision's FPN (``LastLevelMaxPool`` on top).

    Args:
        depth: 50, 101 or 152 (bottleneck ResNets; ignored with ``block`` and ``layers``).
        block: ``"basic"`` or ``"bottleneck"``, with ``layers``: a custom (tiny) ResNet.
        layers: residual blocks per stage, with ``block``.
        widths: stage widths (``planes``; the stage outputs have ``planes * expansion``).
        stem_channels: ``conv1`` channels.
        blocks: None, ``"gc"``, ``"nl"`` or another block of the factory placed as NL is
            (``"dnl"``, ``"cca"``...; placements in the module docstring).
        gc_ratio: GC bottleneck ratio r (1/16 or 1/4 in GCNet).
        gc_kwargs: more keywords of ``GlobalContext`` (defaults: attention pooling, add fusion).
        nonlocal_kwargs: keywords of ``NonLocalNd`` (default: the block's own defaults).
        nonlocal_placement: per stage, residual blocks followed by an NL block (default: the NL
            paper's detection placement).
        norm: ``"frozen_bn"``, ``"bn"`` or ``"sync_bn"``.
        trainable_layers: 0..5 stages trained from the top (3: stem and res2 frozen).
        returned_layers: stages fed to the FPN, 1..4 (``layer1``..``layer4``).
        out_channels: FPN channels.
        backbone_weights: ImageNet weights of the ResNet (:func:`load_backbone_weights`),
            loaded before freezing.

    Returns:
        The backbone; ``backbone.body`` is a
        :class:`~nonlocalnet.models.features.ResNetFeatures` holding the ResNet's modules
        (torchvision's keys).
    """
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if blocks not in BLOCKS:
        check_choice("blocks", blocks, (*BLOCKS, *(b for b in list_blocks() if b != "gc")))
    check_choice("norm", norm, NORMS)
    if (block is None) != (layers is None):
        raise ValueError("block and layers go together (a custom ResNet); give both or neither")
    stage_layers = _layers(depth) if layers is None else tuple(layers)
    if blocks != "gc" and gc_kwargs:
        raise ValueError(f"gc_kwargs given but blocks={blocks!r}; use blocks='gc'")
    placed = blocks is not None and blocks != "gc"  # placed after residual blocks, as NL is
    if not placed and (nonlocal_kwargs or nonlocal_placement is not None):
        raise ValueError(f"nonlocal_kwargs/placement given but blocks={blocks!r}; use blocks='nl'")
    resnet_kw: dict[str, Any] = {}
    if block is not None:
        resnet_kw.update(block=block, layers=stage_layers)
    if blocks == "gc":
        resnet_kw["gc_placement"] = gc_placement(stage_layers, stages=(1, 2, 3))
        resnet_kw["gc_kwargs"] = {**_GC_DETECTION, "ratio": gc_ratio, **dict(gc_kwargs or {})}
    elif placed:
        placement = nonlocal_placement
        resnet_kw["nonlocal_placement"] = (
            _nl_placement(stage_layers) if placement is None else placement
        )
        resnet_kw["nonlocal_kwargs"] = dict(nonlocal_kwargs or {})
        resnet_kw["nonlocal_block"] = blocks
    body = create_resnet(
        depth=depth,
        num_classes=0,
        norm="frozen_bn" if norm == "frozen_bn" else "bn",
        widths=widths,
        stem_channels=stem_channels,
        default_input=(3, 800, 1333),
        **resnet_kw,
    )
    if backbone_weights is not None:
        load_backbone_weights(body, backbone_weights)
    freeze_layers(body, trainable_layers)
    if norm == "sync_bn":
        body = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    returned = tuple(returned_layers)
    features = ResNetFeatures(body, returned, as_dict=True)  # validates returned_layers
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned)},
        in_channels_list=features.out_channels,
        out_channels=out_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    backbone.body = features  # the same modules and keys, with feature_info
    return backbone


def _head_keywords(cls: type) -> set[str]:
    return {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"
    }


def create_detection_model(
    *,
    arch: str = "mask_rcnn",
    depth: int = 50,
    block: str | None = None,
    layers: Sequence[int] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_channels: int = 64,
    blocks: str | None = None,
    gc_ratio: float = 1 / 16,
    num_classes: int = 91,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    gc_kwargs: Mapping[str, Any] | None = None,
    nonlocal_kwargs: Mapping[str, Any] | None = None,
    nonlocal_placement: Sequence[Sequence[int]] | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_channels: int = 256,
    anchor_sizes: Sequence[int] | None = None,
    backbone_weights: str | os.PathLike[str] | None = None,
    default_input: Sequence[int] = (3, 800, 1333),
    **kwargs: Any,
) -> MaskRCNN | FasterRCNN:
    """Mask R-CNN or Faster R-CNN (torchvision) on our ResNet-FPN, with GC or NL blocks.

    With the defaults and ``blocks=None`` this is torchvision's ``maskrcnn_resnet50_fpn`` (same
    modules, keys and forward; FrozenBN, stem and res2 frozen as with pretrained weights).

    Args:
        arch: ``"mask_rcnn"`` or ``"faster_rcnn"``.
        depth: ResNet depth, 50 or 101 (152 also builds).
        block: ``"basic"`` or ``"bottleneck"`` with ``layers``: a custom (tiny) ResNet.
        layers: residual blocks per stage, with ``block``.
        widths: stage widths of the ResNet.
        stem_channels: ``conv1`` channels.
        blocks: None, ``"gc"`` or ``"nl"``.
        gc_ratio: GC bottleneck ratio r.
        num_classes: classes including the background (91: COCO's category ids as labels).
        norm: ``"frozen_bn"``, ``"bn"`` or ``"sync_bn"``.
        trainable_layers: 0..5 backbone stages trained from the top.
        returned_layers: ResNet stages fed to the FPN.
        gc_kwargs: more ``GlobalContext`` keywords.
        nonlocal_kwargs: ``NonLocalNd`` keywords.
        nonlocal_placement: NL placement per stage (default: the NL paper's).
        fpn_channels: channels of the FPN levels (and of the RPN and RoI heads' inputs).
        representation_size: width of the box head's two fully connected layers.
        mask_channels: width of the mask head's four 3x3 convolutions (Mask R-CNN).
        anchor_sizes: one anchor size per FPN level (default torchvision's 32..512 for
            P2..P6), each with the aspect ratios 0.5, 1, 2.
        backbone_weights: ImageNet weights of the ResNet (torchvision's keys), a file.
        default_input: (C, H, W) stored on the model (COCO's 800x1333).
        **kwargs: keywords of torchvision's ``MaskRCNN`` / ``FasterRCNN`` (``min_size``,
            ``max_size``, ``rpn_*``, ``box_*``, ...).

    Returns:
        The detector. Train mode: ``model(images, targets)`` → dict of losses; eval mode:
        ``model(images)`` → per image ``{"boxes", "labels", "scores"[, "masks"]}``.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    check_choice("arch", arch, ARCHS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an int >= 2 (background included), got {num_classes!r}"
        )
    cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    valid = _head_keywords(cls) - {"backbone", "num_classes"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"create_detection_model: unknown keyword(s) {', '.join(map(repr, unknown))}; "
            f"{cls.__name__} takes {', '.join(sorted(valid))}"
        )
    for name, value in (
        ("fpn_channels", fpn_channels),
        ("representation_size", representation_size),
        ("mask_channels", mask_channels),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    backbone = create_detection_backbone(
        depth=depth,
        block=block,
        layers=layers,
        widths=widths,
        stem_channels=stem_channels,
        blocks=blocks,
        gc_ratio=gc_ratio,
        gc_kwargs=gc_kwargs,
        nonlocal_kwargs=nonlocal_kwargs,
        nonlocal_placement=nonlocal_placement,
        norm=norm,
        trainable_layers=trainable_layers,
        returned_layers=returned_layers,
        out_channels=fpn_channels,
        backbone_weights=backbone_weights,
    )
    levels = len(tuple(returned_layers)) + 1  # the FPN levels and LastLevelMaxPool's
    if anchor_sizes is not None:
        sizes = tuple(anchor_sizes)
        if len(sizes) != levels or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                f"anchor_sizes must give one positive int per FPN level ({levels}), got {sizes}"
            )
        kwargs.setdefault(
            "rpn_anchor_generator",
            AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * levels),
        )
    masks = arch == "mask_rcnn"
    if fpn_channels != 256 or representation_size != 1024 or (masks and mask_channels != 256):
        # torchvision's heads at other widths (its defaults: 256-channel FPN, 1024, 256)
        resolution = 7  # MultiScaleRoIAlign's output size for the box head
        kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * resolution**2, representation_size))
        kwargs.setdefault("box_predictor", FastRCNNPredictor(representation_size, num_classes))
        if masks:
            kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1))
            kwargs.setdefault(
                "mask_predictor", MaskRCNNPredictor(mask_channels, mask_channels, num_classes)
            )
    # torchvision takes num_classes=None when the predictors are given
    given = "box_predictor" in kwargs or "mask_predictor" in kwargs
    model = cls(backbone, num_classes=None if given else num_classes, **kwargs)
    model.default_input = tuple(default_input)
    return model


_GC_REF = "Cao et al., GCNet, ICCVW 2019"
_NL_REF = "Wang et al., Non-local Neural Networks, CVPR 2018"
_PLACEMENT = {
    "gc": "GC blocks after the last 1x1 conv+BN of every bottleneck of c3-c5 (add fusion, "
    "attention pooling)",
    "nl": "one NL block (embedded Gaussian) in res4 right before its last residual block",
}
#: published COCO val2017 box AP / mask AP (Mask R-CNN, 1x schedule) per (depth, blocks, r).
_PUBLISHED = {
    (50, None, None): f"GCNet's baseline 37.2/33.8 (SyncBN); mmdetection's 38.4/34.6; "
    f"{_NL_REF}, Table 5: 38.0/34.6",
    (50, "gc", 1 / 16): f"{_GC_REF}: 39.4/35.7 (SyncBN); mmdetection: 39.7/35.9, with SyncBN "
    "40.4/36.2",
    (50, "gc", 1 / 4): f"{_GC_REF}: 39.9/36.2 (SyncBN)",
    (50, "nl", None): f"{_NL_REF}, Table 5: 39.0/35.5 (baseline 38.0/34.6)",
    (101, None, None): f"{_NL_REF}, Table 5: 39.5/36.0",
    (101, "nl", None): f"{_NL_REF}, Table 5: 40.8/37.1 (baseline 39.5/36.0)",
}


def _entry(
    arch: str, depth: int, blocks: str | None = None, ratio: float | None = None
) -> tuple[dict[str, Any], str]:
    kw: dict[str, Any] = {"arch": arch, "depth": depth}
    what = "Mask R-CNN" if arch == "mask_rcnn" else "Faster R-CNN"
    desc = f"{what}, ResNet-{depth}-FPN"
    if blocks is not None:
        kw["blocks"] = blocks
        desc += f", with {_PLACEMENT[blocks]}"
    if ratio is not None:
        kw["gc_ratio"] = ratio
        desc += f", r=1/{round(1 / ratio)}"
    if (depth, blocks) == (50, "nl"):
        desc += " (after layer3.4)"
    elif (depth, blocks) == (101, "nl"):
        desc += " (after layer3.21)"
    if (depth, blocks, ratio) == (50, None, None) and arch == "mask_rcnn":
        desc += "; torchvision's maskrcnn_resnet50_fpn (its state_dict loads strictly)"
    published = _PUBLISHED.get((depth, blocks, ratio))
    if arch == "mask_rcnn":
        desc += f". Published (box/mask AP): {published}." if published else "."
    else:
        desc += ". The papers report Mask R-CNN only."
    return kw, desc


#: name → (keywords of :func:`create_detection_model`, description with the papers' COCO val2017
#: numbers, box AP / mask AP).
DETECTION_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    f"{prefix}{head}_r{depth}_fpn{suffix}": _entry(arch, depth, blocks, ratio)
    for head, arch in (("maskrcnn", "mask_rcnn"), ("faster_rcnn", "faster_rcnn"))
    for depth in (50, 101)
    for prefix, suffix, blocks, ratio in (
        ("", "", None, None),
        ("gc_", "", "gc", 1 / 16),
        ("gc_", "_r4", "gc", 1 / 4),
        ("nl_", "", "nl", None),
    )
}
