"""Stage features of our ResNets, timm's ``features_only`` API.

``create_model("gc_resnet50", features_only=True, out_indices=(2, 3, 4))`` (or
:class:`ResNetFeatures` on any 2D or video :class:`~nonlocalnet.models.resnet.ResNet`) gives a
module that returns the outputs of the chosen stages, res2..res5 (``out_indices`` 1..4 for
``layer1``..``layer4``), as a list, with :attr:`ResNetFeatures.feature_info` naming each one's
channels and reduction (timm's ``FeatureInfo``: ``channels()``, ``reduction()``,
``module_name()``).

The module holds the ResNet's own modules up to the last stage asked for (the head is dropped),
under their names, so its keys are the ResNet's (``conv1.weight``, ``layer2.0.gc.conv_mask.weight``,
``layer3.4.after.theta.weight``) and inserted NL/GC blocks run as in the ResNet. Its children run
in order, so torchvision's ``BackboneWithFPN(features, return_layers={"layer2": "0", ...},
in_channels_list=features.feature_info.channels(), out_channels=256)`` and
``torchvision.models.feature_extraction.create_feature_extractor`` take it as they take a
torchvision ResNet; ``as_dict=True`` returns the ``OrderedDict`` ``{"0": ..., "1": ...}`` that
torchvision's ``FeaturePyramidNetwork`` reads.

This module depends on torch alone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from nonlocalnet.models.resnet import STAGE_NAMES, ResNet

__all__ = ["FeatureInfo", "ResNetFeatures", "stage_reductions"]


class FeatureInfo(list):
    """Per returned stage ``{"module", "num_chs", "reduction", "stage", "index"}``, with timm's
    accessors (a list of dicts, so ``info[0]["num_chs"]`` works as well)."""

    def _get(self, key: str, idx: int | Sequence[int] | None) -> Any:
        if idx is None:
            return [d[key] for d in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels of the returned stages (of one when ``idx`` is an int)."""
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Spatial reduction (input size / feature size) of the returned stages."""
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Module names (``layer1``..``layer4``) of the returned stages."""
        return self._get("module", idx)


def _last(v: int | Sequence[int]) -> int:
    """The spatial entry of a stride (the last one of a video ResNet's (t, h, w))."""
    return int(v) if isinstance(v, int) else int(v[-1])


def stage_reductions(model: ResNet) -> list[int]:
    """Spatial reduction (output stride) of ``layer1``..``layer4`` of a ResNet."""
    first = model.stem[0] if getattr(model, "deep_stem", False) else model.conv1  # strided conv
    stride = _last(first.stride) * _last(getattr(model.maxpool, "stride", 1))
    out = []
    for stage in model.stages():
        stride *= _last(getattr(stage[0], "stride", 1))
        out.append(stride)
    return out


class ResNetFeatures(nn.ModuleDict):
    """The stage outputs of a ResNet (see the module docstring).

    Args:
        model: a :class:`ResNet` (2D or video); its modules are taken, not copied.
        out_indices: stages returned, 1..4 for res2..res5 (``layer1``..``layer4``), increasing.
        as_dict: return ``OrderedDict`` ``{"0": first, ...}`` (torchvision's FPN input) instead
            of a list.

    Attributes:
        feature_info: :class:`FeatureInfo` of the returned stages.
        out_channels: channels of the returned stages.
        out_indices: the returned stages.
    """

    def __init__(
        self,
        model: ResNet,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        *,
        as_dict: bool = False,
    ) -> None:
        if not isinstance(model, ResNet):
            raise TypeError(
                f"ResNetFeatures needs a 2D or video ResNet of nonlocalnet.models, got "
                f"{type(model).__name__}"
            )
        if isinstance(out_indices, int):
            raise TypeError(f"out_indices must be a sequence of stages, got {out_indices!r}")
        out_indices = tuple(out_indices)
        if not out_indices or any(
            isinstance(i, bool) or i not in (1, 2, 3, 4) for i in out_indices
        ):
            raise ValueError(f"out_indices must be a non-empty subset of 1..4, got {out_indices}")
        if list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be increasing and distinct, got {out_indices}")
        reductions = stage_reductions(model)
        stages = model.stages()
        info = FeatureInfo(
            {
                "module": f"layer{i}",
                "num_chs": int(stages[i - 1][-1].last_norm().num_features),
                "reduction": reductions[i - 1],
                "stage": STAGE_NAMES[i - 1],
                "index": i,
            }
            for i in out_indices
        )
        last = f"layer{out_indices[-1]}"
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            if name == last:
                break
        super().__init__(layers)
        self.out_indices = out_indices
        self.feature_info = info
        self.out_channels = info.channels()
        self.as_dict = as_dict
        self._returned = {f"layer{i}": str(k) for k, i in enumerate(out_indices)}
        self.dims = model.dims
        self.default_input = getattr(model, "default_input", None)

    def forward(self, x: Tensor) -> list[Tensor] | OrderedDict[str, Tensor]:
        """The stage outputs: ``[(B, C_0, H/r_0, W/r_0), ...]`` (``(B, C, T', H', W')`` for
        video), or ``{"0": ..., ...}`` with ``as_dict``."""
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self._returned:
                out[self._returned[name]] = x
        return out if self.as_dict else list(out.values())
