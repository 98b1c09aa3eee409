"""Semantic segmentation: dilated ResNet (output stride 8/16) with FCN, NL, GC or ANN heads.

The backbone is :class:`~nonlocalnet.models.resnet.ResNet` with stride replaced by dilation in
the last stages (torchvision's ``replace_stride_with_dilation``), so ImageNet checkpoints load
into ``model.backbone``. Heads:

* ``fcn``: 3×3 conv → BN → ReLU → dropout → 1×1 classifier (the baseline).
* any block of the factory (:func:`nonlocalnet.layers.create_block`: ``nl``, ``gc``, ...): 3×3
  conv to ``head_channels`` → the block → 3×3 conv → dropout → classifier. A fresh attention
  block is the identity, so at initialisation these equal the same head with the block removed.
  ``concat_input=True`` adds mmseg's ``conv_cat`` (3×3 conv → BN → ReLU of the head's input
  concatenated with the block's output) before the dropout, as mmseg's NLHead and GCHead.
* ``ann`` (Zhu et al. 2019): AFNB(stage 4, stage 5) → 3×3 conv to 512 → APNB → classifier.

Logits are bilinearly upsampled to the input size. In training mode the model returns
``{"out": logits, "aux": aux_logits}`` (auxiliary FCN head on stage 4, loss weight
``model.aux_weight`` = 0.4); in eval mode ``{"out": logits}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, check_feature_map
from nonlocalnet.layers import AFNB, APNB, create_block, list_blocks
from nonlocalnet.models.resnet import DEPTHS, ResNet

__all__ = [
    "HEADS",
    "ANNHead",
    "BlockHead",
    "FCNHead",
    "SegmentationModel",
    "create_segmentation_model",
]

#: heads with their own structure; any block name of the factory is a head too.
HEADS = ("fcn", "ann")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Module):
    """3×3 conv → BN → ReLU → dropout → 1×1 classifier.

    Args:
        in_channels: input channels.
        channels: hidden channels.
        num_classes: output classes.
        dropout: channel dropout before the classifier.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = _conv_bn_relu(in_channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class BlockHead(nn.Module):
    """3×3 conv → attention block → 3×3 conv (→ conv_cat) → dropout → classifier (NL / GC heads).

    Args:
        in_channels: input channels.
        channels: hidden channels (the block's channels).
        num_classes: output classes.
        block: the attention block on ``channels`` channels.
        dropout: channel dropout before the classifier.
        concat_input: concatenate the head's input with the output of ``conv_out`` and fuse
            them by ``conv_cat`` (3×3 conv to ``channels`` → BN → ReLU), as mmseg's
            ``concat_input=True`` heads.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        block: nn.Module,
        dropout: float = 0.1,
        concat_input: bool = False,
    ):
        super().__init__()
        self.conv_in = _conv_bn_relu(in_channels, channels)
        self.block = block
        self.conv_out = _conv_bn_relu(channels, channels)
        self.concat_input = bool(concat_input)
        self.conv_cat = _conv_bn_relu(in_channels + channels, channels) if concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_out(self.block(self.conv_in(x)))
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))  # (B, C_in + C, H, W) -> (B, C, H, W)
        return self.classifier(self.dropout(out))


class ANNHead(nn.Module):
    """The ANN head: AFNB fuses stage 4 (keys/values) into stage 5 (queries), then APNB.

    Args:
        low_channels: stage-4 channels (1024 for R50/101).
        high_channels: stage-5 channels (2048).
        channels: width after the 3×3 conv (512).
        num_classes: output classes.
        key_channels: key/query width of both blocks.
        value_channels: value width of both blocks.
        bins: pyramid bins (S = 110 for (1, 3, 6, 8)).
        dropout: dropout inside AFNB and APNB (official 0.05).
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        channels: int,
        num_classes: int,
        key_channels: int = 256,
        value_channels: int = 256,
        bins: Sequence[int] = (1, 3, 6, 8),
        dropout: float = 0.05,
    ):
        super().__init__()
        self.fusion = AFNB(
            low_channels,
            high_channels,
            high_channels,
            key_channels=key_channels,
            value_channels=value_channels,
            bins=bins,
            dropout=dropout,
        )
        self.conv = _conv_bn_relu(high_channels, channels)
        self.context = APNB(
            channels,
            channels,
            key_channels=key_channels,
            value_channels=value_channels,
            bins=bins,
            dropout=dropout,
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        x = self.fusion(low, high)
        return self.classifier(self.context(self.conv(x)))


class SegmentationModel(nn.Module):
    """Backbone → head (+ auxiliary FCN head on stage 4), logits upsampled to the input.

    Args:
        backbone: a 2D :class:`ResNet` (its ``fc`` is unused).
        head: ``FCNHead``/``BlockHead`` (called on stage 5) or ``ANNHead`` (stages 4 and 5).
        aux_head: FCN head on stage 4, or None.
        aux_weight: loss weight of the auxiliary output (read by the training loop).
    """

    def __init__(
        self,
        backbone: ResNet,
        head: nn.Module,
        aux_head: nn.Module | None = None,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.aux_weight = aux_weight

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``{"out": (B, K, H, W)}``, plus ``"aux"`` in training mode when there is an aux head."""
        check_feature_map(x, spatial_dims=2, channels=None, owner=type(self).__name__)
        size = x.shape[-2:]
        _, _, c4, c5 = self.backbone.forward_stages(x)
        out = self.head(c4, c5) if isinstance(self.head, ANNHead) else self.head(c5)
        result = {"out": F.interpolate(out, size=size, mode="bilinear", align_corners=False)}
        if self.training and self.aux_head is not None:
            aux = self.aux_head(c4)
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result


def create_segmentation_model(
    *,
    depth: int = 101,
    head: str = "fcn",
    num_classes: int = 19,
    output_stride: int = 8,
    aux: bool = True,
    aux_weight: float = 0.4,
    head_channels: int = 512,
    dropout: float = 0.1,
    head_kwargs: Mapping[str, Any] | None = None,
    norm: str = "bn",
    block: str | None = None,
    layers: Sequence[int] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_channels: int = 64,
    deep_stem: bool = False,
    concat_input: bool = False,
    in_channels: int = 3,
    default_input: Sequence[int] = (3, 512, 1024),
) -> SegmentationModel:
    """Build a segmentation network: dilated ResNet + head (+ aux head).

    The backbone is initialised before the heads are built, so the heads' blocks keep their
    zero initialisation.

    Args:
        depth: ResNet depth (ignored when ``block`` and ``layers`` are given).
        head: ``"fcn"``, ``"ann"`` or a block name of :func:`nonlocalnet.layers.list_blocks`
            (``"nl"``, ``"gc"``, ...).
        num_classes: segmentation classes (19: Cityscapes).
        output_stride: 8 or 16.
        aux: add the auxiliary FCN head on stage 4.
        aux_weight: its loss weight.
        head_channels: width of the head (512).
        dropout: dropout before the classifier (FCN / NL / GC heads).
        head_kwargs: options of the head's block: NonLocal2d keywords (``nl``), GlobalContext
            keywords (``gc``), or ANNHead's ``key_channels``, ``value_channels``, ``bins``,
            ``dropout`` (``ann``).
        norm: ``"bn"`` or ``"frozen_bn"`` for the backbone.
        block: ``"basic"``/``"bottleneck"`` with ``layers`` for custom (tiny) backbones.
        layers: blocks per stage.
        widths: stage widths.
        stem_channels: ``conv1`` channels (of the deep stem's last conv with ``deep_stem``).
        deep_stem: the backbone's stem is mmseg's ResNetV1c deep stem (three 3×3 convs,
            ``backbone.stem.*``; its ``*-d8`` checkpoints) instead of ``conv1``/``bn1``.
        concat_input: an NL / GC (block) head concatenates its input with its output before
            the classifier (``conv_cat``, mmseg's ``concat_input=True``).
        in_channels: input channels.
        default_input: (C, H, W) stored on the model as ``default_input``.

    Returns:
        The model.
    """
    check_choice("head", head, (*HEADS, *list_blocks()))
    check_choice("output_stride", output_stride, (8, 16))
    if block is None or layers is None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        block, layers = DEPTHS[depth]
    backbone = ResNet(
        block,
        layers,
        num_classes=0,
        in_channels=in_channels,
        stem_channels=stem_channels,
        deep_stem=deep_stem,
        widths=widths,
        norm=norm,
        replace_stride_with_dilation=(False, True, True)
        if output_stride == 8
        else (False, False, True),
    )
    c5 = backbone.num_features
    c4 = backbone.layer3[-1].last_norm().num_features
    kw = dict(head_kwargs or {})
    if concat_input and head in HEADS:
        raise ValueError(
            f"concat_input applies to block heads ({', '.join(list_blocks())}), not to {head!r}"
        )
    if head == "fcn":
        if kw:
            raise ValueError(f"head 'fcn' takes no head_kwargs, got {sorted(kw)}")
        head_module: nn.Module = FCNHead(c5, head_channels, num_classes, dropout)
    elif head == "ann":
        head_module = ANNHead(c4, c5, head_channels, num_classes, **kw)
    else:
        block = create_block(head, head_channels, dims=2, **kw)
        head_module = BlockHead(
            c5, head_channels, num_classes, block, dropout, concat_input=concat_input
        )
    aux_head = FCNHead(c4, max(head_channels // 2, 1), num_classes, dropout) if aux else None
    model = SegmentationModel(backbone, head_module, aux_head, aux_weight)
    model.default_input = tuple(default_input)
    model.num_classes = num_classes
    return model
