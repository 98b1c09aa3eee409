"""Parameters and multiply-adds of networks and blocks.

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode`, best on the meta device (no
memory, no compute: the full 32×224×224 R101 is counted in about a second). Multiply-adds
(MACs) are FLOPs / 2, the papers' unit. Only matrix products and convolutions are counted (BN,
ReLU, pooling and softmax are not), as in the papers' tables.

Fused attention: on CPU ``scaled_dot_product_attention`` may dispatch to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch registers no formula; this
module registers one (the same as for the CUDA flash kernel: Q·Kᵀ and P·V), forward and
backward, so attention inside NL/APNB blocks is always counted by :func:`count_macs` and
:func:`count_flops`.

Detectors (torchvision's Mask R-CNN / Faster R-CNN, :mod:`nonlocalnet.models.detection`) take
a list of images of any size; :func:`count_flops` resizes and pads one as the detector's own
transform does (COCO: 800x1333 → 800x1344), counts the dense part on it (ResNet, FPN, RPN
head) and the RoI heads for a fixed number of regions: the box head for the test-time proposals
(``rpn_post_nms_top_n_test``, 1000) and the mask head for the most detections kept
(``box_detections_per_img``, 100), the counts the detector reaches on a COCO image. RoIAlign,
NMS and the paste of the masks are not matrix products and are not counted.

The ``nonlocalnet flops`` command (:mod:`nonlocalnet.cli.flops`) prints these counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from nonlocalnet.models.placement import inserted_blocks

__all__ = ["FlopReport", "count_flops", "count_macs"]


def _register_fused_attention_formulas() -> None:
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(fwd)
        def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kw):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(bwd)
        def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kw):
            return flop_counter.sdpa_backward_flop_count(
                grad_out_shape, query_shape, key_shape, value_shape
            )


_register_fused_attention_formulas()


def count_macs(fn: Callable[..., Any], *inputs: Any) -> int:
    """Multiply-adds of calling ``fn(*inputs)``.

    Everything the call runs is counted: a forward pass, or a whole training step when ``fn``
    also calls ``backward()``. The call runs as is (the caller chooses train/eval mode, gradients
    and device; meta tensors count without computing).

    Args:
        fn: a module or any callable.
        *inputs: its positional arguments.

    Returns:
        Matrix-product and convolution multiply-adds (FLOPs / 2), fused attention included.
    """
    if not callable(fn):
        raise TypeError(f"count_macs: fn must be a module or a callable, got {type(fn).__name__}")
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() // 2


@dataclass
class FlopReport:
    """Counts of one model on one input.

    Attributes:
        model: model name.
        input_size: input shape including the batch.
        params: parameter count.
        macs: multiply-adds of one forward pass.
        stages: part name (``stem``, ``res2``..``res5``, ``head``, ...) → ``(params, macs)``;
            stage counts include blocks inserted in the stage.
        blocks: inserted block name (``layer3.1.after``, ``layer2.0.gc``) → ``(params, macs)``.
    """

    model: str
    input_size: tuple[int, ...]
    params: int
    macs: int
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_PARTS = {
    "stem": ("conv1", "bn1", "stem"),  # "stem": the deep stem (ResNetV1c)
    "res2": ("layer1",),
    "res3": ("layer2",),
    "res4": ("layer3",),
    "res5": ("layer4",),
    "head": ("fc",),
}


def _is_detector(model: nn.Module) -> bool:
    """torchvision's two-stage detectors (GeneralizedRCNN: transform, backbone, rpn, roi_heads)."""
    return all(hasattr(model, k) for k in ("transform", "backbone", "rpn", "roi_heads"))


class _DetectorCost(nn.Module):
    """What a detector computes on one padded batch, with the RoI heads at fixed region counts
    (the module docstring); the detector's parts are its children, so their names match."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        heads = model.roi_heads
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        self.box_head = heads.box_head
        self.box_predictor = heads.box_predictor
        self.masks = bool(heads.has_mask())
        if self.masks:
            self.mask_head = heads.mask_head
            self.mask_predictor = heads.mask_predictor
        self.proposals = int(model.rpn._post_nms_top_n["testing"])
        self.detections = int(heads.detections_per_img)
        self.box_size = tuple(heads.box_roi_pool.output_size)
        self.mask_size = tuple(heads.mask_roi_pool.output_size) if self.masks else None
        self.channels = int(model.backbone.out_channels)

    def forward(self, x: Tensor) -> None:
        features = list(self.backbone(x).values())
        self.rpn_head(features)
        b = x.shape[0]
        rois = x.new_zeros(b * self.proposals, self.channels, *self.box_size)  # (B*R, C, 7, 7)
        self.box_predictor(self.box_head(rois))
        if self.masks:
            dets = x.new_zeros(b * self.detections, self.channels, *self.mask_size)
            self.mask_predictor(self.mask_head(dets))  # (B*D, C, 14, 14) in


def _detector_input(model: nn.Module, input_size: Sequence[int]) -> tuple[int, ...]:
    """The padded batch shape the detector's transform makes of ``input_size`` images."""
    b, c, h, w = (int(v) for v in input_size)
    images = [torch.zeros(c, h, w)] * b  # the transform has no parameters: it runs on the CPU
    batch, _ = model.transform(images)
    return tuple(batch.tensors.shape)


def _parts(model: nn.Module) -> dict[str, list[str]]:
    """Part name → submodule names (for ResNets, segmentation models and detectors)."""
    if isinstance(model, _DetectorCost):
        parts = {k: ["backbone.body." + n for n in v] for k, v in _PARTS.items() if k != "head"}
        parts.update(
            fpn=["backbone.fpn"],
            rpn=["rpn_head"],
            box_head=["box_head", "box_predictor"],
            mask_head=["mask_head", "mask_predictor"],
        )
        named = dict(model.named_modules())
        return {
            k: [n for n in v if n in named] for k, v in parts.items() if any(n in named for n in v)
        }
    prefix = "backbone." if hasattr(model, "backbone") else ""
    parts = {k: [prefix + n for n in v] for k, v in _PARTS.items()}
    if prefix:
        parts.pop("head")
        parts["head"] = ["head"]
        parts["aux_head"] = ["aux_head"]
    named = dict(model.named_modules())
    return {k: [n for n in v if n in named] for k, v in parts.items() if any(n in named for n in v)}


def count_flops(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    name: str | None = None,
    device: str | torch.device = "meta",
) -> FlopReport:
    """Count parameters and multiply-adds of ``model`` on an input of ``input_size``.

    Args:
        model: the network (on ``device``; build it under ``torch.device("meta")`` to count
            without memory).
        input_size: full input shape, batch first (a detector: ``(B, 3, H, W)`` for B images
            of H x W before its resize).
        name: model name for the report.
        device: where the input is created.

    Returns:
        The report of one forward pass in eval mode without gradients, per stage and per
        inserted block (a detector: also ``fpn``, ``rpn``, ``box_head``, ``mask_head``; its
        ``input_size`` is the padded batch it computes on).
    """
    was_training = model.training
    model.eval()
    runner = model
    if _is_detector(model):
        if len(input_size) != 4:
            raise ValueError(
                f"a detector counts on (B, 3, H, W) images, got input size {tuple(input_size)}"
            )
        input_size = _detector_input(model, input_size)
        runner = _DetectorCost(model)
    x = torch.zeros(tuple(input_size), device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            runner(x)
    finally:
        model.train(was_training)
    root = type(runner).__name__
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def macs_of(fqn: str) -> int:
        return counts.get(f"{root}.{fqn}", 0) // 2

    named = dict(runner.named_modules())
    stages = {
        part: (sum(_params(named[n]) for n in names), sum(macs_of(n) for n in names))
        for part, names in _parts(runner).items()
    }
    blocks = {n: (_params(b), macs_of(n)) for n, b in inserted_blocks(model).items()}
    return FlopReport(
        model=name or getattr(model, "model_name", type(model).__name__),
        input_size=tuple(int(s) for s in input_size),
        params=_params(model),
        macs=counter.get_total_flops() // 2,
        stages=stages,
        blocks=blocks,
    )
