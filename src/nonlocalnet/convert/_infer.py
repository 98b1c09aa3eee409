"""Which registered model a converted state_dict fits, and the overrides it needs.

Everything here reads the state_dict *with our keys* (after renaming): the depth from the blocks
per stage, C2D/I3D and the inflation pattern from the temporal sizes of the kernels, the NL and
GC placements from the inserted blocks' keys, the classes from the classifier. The overrides are
the keywords ``create_model(name, **overrides)`` needs beyond the entry's defaults; the blocks'
options (pooling position and rounding, logit scale, ...) go into the entry's block keywords
(``nonlocal_kwargs``, ``gc_kwargs``, ``head_kwargs``) in full, so that they say what the source
computes.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from nonlocalnet.convert._core import ConversionError
from nonlocalnet.layers import GlobalContext, NonLocalNd
from nonlocalnet.models.resnet import DEPTHS
from nonlocalnet.models.video_resnet import official_inflation_pattern
from nonlocalnet.models.zoo import list_models, model_info

__all__ = ["Target", "build_target", "infer_target", "overrides_for", "stage_depths"]

_MISSING = object()

#: builder values that make another network: a named target must already have them.
_ARCHITECTURE = ("depth", "block", "layers", "inflation", "head")


@dataclass
class Target:
    """A model to convert into: a registered name and its overrides, or a standalone block.

    Attributes:
        name: registered model name, or None for a standalone block.
        overrides: ``create_model(name, **overrides)`` keywords (block: the block's keywords).
        block: ``"nl"`` or ``"gc"`` for a standalone block.
        notes: what was inferred.
        builder: every builder value the checkpoint fixes (before leaving out the defaults).
        nl: keywords of the NL blocks.
        gc: keywords of the GC blocks.
        head: keywords of a segmentation head (``head_kwargs``).
    """

    name: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    block: str | None = None
    notes: list[str] = field(default_factory=list)
    builder: dict[str, Any] = field(default_factory=dict)
    nl: dict[str, Any] | None = None
    gc: dict[str, Any] | None = None
    head: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.name is not None:
            return self.name
        kind = "NonLocalNd" if self.block == "nl" else "GlobalContext"
        return f"{kind}({', '.join(f'{k}={v!r}' for k, v in self.overrides.items())})"

    def renamed(self, name: str) -> Target:
        """The same checkpoint into another registered model ``name``."""
        model_info(name)  # an unknown name raises here
        if self.name is None:
            raise ConversionError(f"the checkpoint is a standalone block, not a {name!r} model")
        overrides = overrides_for(name, self.builder, self.nl, self.gc, self.head)
        defaults = _builder_defaults(name)
        clash = [k for k in _ARCHITECTURE if k in overrides]
        if clash:
            raise ConversionError(
                f"the checkpoint is a {self.name!r} ("
                + ", ".join(f"{k}={overrides[k]!r}" for k in clash)
                + f"); {name!r} has "
                + ", ".join(f"{k}={defaults.get(k)!r}" for k in clash)
            )
        note = f"target {name!r} chosen (the checkpoint fits {self.name!r})"
        return Target(name, overrides, None, [note], self.builder, self.nl, self.gc, self.head)


def _target(
    name: str,
    builder: dict[str, Any],
    nl: dict[str, Any] | None = None,
    gc: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
) -> Target:
    return Target(name, overrides_for(name, builder, nl, gc, head), None, [], builder, nl, gc, head)


def build_target(target: Target) -> nn.Module:
    """The model (or block) of ``target``, freshly initialised."""
    if target.name is not None:
        from nonlocalnet.models.zoo import create_model

        return create_model(target.name, **target.overrides)
    kw = dict(target.overrides)
    if target.block == "nl":
        return NonLocalNd(**kw)
    return GlobalContext(**kw)


def stage_depths(state: Mapping[str, Tensor], prefix: str = "") -> list[int]:
    """Residual blocks per stage (``layer1``..``layer4``) in a state_dict of ours."""
    depths = []
    for s in range(1, 5):
        pat = re.compile(rf"^{re.escape(prefix)}layer{s}\.(\d+)\.conv1\.weight$")
        idx = [int(m.group(1)) for k in state if (m := pat.match(k))]
        depths.append(max(idx) + 1 if idx else 0)
    return depths


def _depth(state: Mapping[str, Tensor], prefix: str = "") -> tuple[int, str]:
    depths = stage_depths(state, prefix)
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in state else "basic"
    for d, (b, layers) in DEPTHS.items():
        if b == block and list(layers) == depths:
            return d, block
    raise ConversionError(
        f"no ResNet depth has {block} stages of {depths} blocks (known: "
        + ", ".join(f"R{d} {list(v[1])}" for d, v in DEPTHS.items())
        + ")"
    )


def _placement(state: Mapping[str, Tensor], slot: str, prefix: str = "") -> list[list[int]]:
    pat = re.compile(rf"^{re.escape(prefix)}layer(\d)\.(\d+)\.{slot}\.")
    found: list[set[int]] = [set(), set(), set(), set()]
    for k in state:
        m = pat.match(k)
        if m:
            found[int(m.group(1)) - 1].add(int(m.group(2)))
    return [sorted(f) for f in found]


def _builder_defaults(name: str) -> dict[str, Any]:
    info = model_info(name)
    params = inspect.signature(info.builder).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(info.defaults)
    return out


def _same(a: Any, b: Any) -> bool:
    def norm(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [norm(v) for v in x]
        return x

    return norm(a) == norm(b)


def overrides_for(
    name: str,
    builder: Mapping[str, Any],
    nl: Mapping[str, Any] | None = None,
    gc: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``create_model(name, **overrides)`` keywords for builder values and block options.

    Builder values equal to the entry's defaults are left out; block options go in full into
    the block keywords: ``nonlocal_kwargs`` / ``gc_kwargs`` (``head_kwargs`` for a segmentation
    model's NL / GC head), merged over the entry's own.
    """
    defaults = _builder_defaults(name)
    out = {k: v for k, v in builder.items() if not _same(defaults.get(k, _MISSING), v)}
    segmentation = model_info(name).task == "segmentation"
    for opts, key in (
        (nl, "head_kwargs" if segmentation else "nonlocal_kwargs"),
        (gc, "head_kwargs" if segmentation else "gc_kwargs"),
        (head, "head_kwargs"),
    ):
        if opts is None:
            continue
        merged = dict(defaults.get(key) or {})
        merged.update(opts)
        if merged or key in defaults:
            out[key] = merged
    return out


def _nl_block_kwargs(
    nl: Mapping[str, Any], channels: list[int], inner: list[int]
) -> dict[str, Any]:
    """NL keywords for a model: ``inner_channels`` only when it is not C/2 in every block."""
    kw = {k: v for k, v in nl.items() if k != "inner_channels"}
    if any(i != max(c // 2, 1) for c, i in zip(channels, inner, strict=True)):
        if len(set(inner)) != 1:
            raise ConversionError(
                f"the non-local blocks have inner widths {inner} for widths {channels}: neither "
                "C/2 in every block nor one width for all; no model option builds that"
            )
        kw["inner_channels"] = inner[0]
    if kw.get("norm", True) is True:
        kw.pop("norm", None)
    return kw


def _gc_block_kwargs(gc: Mapping[str, Any]) -> dict[str, Any]:
    kw = dict(gc)
    if "fusion" in kw:
        kw["fusion"] = list(kw["fusion"])
    return kw


def _nl_widths(state: Mapping[str, Tensor], slot_prefix: str) -> tuple[list[int], list[int]]:
    pat = re.compile(rf"^{slot_prefix}g\.weight$")
    channels, inner = [], []
    for k, v in state.items():
        if re.search(pat, k):
            inner.append(int(v.shape[0]))
            channels.append(int(v.shape[1]))
    return channels, inner


def infer_target(
    state: Mapping[str, Tensor],
    nl: Mapping[str, Any],
    gc: Mapping[str, Any],
    builder: Mapping[str, Any],
) -> Target:
    """The registered model (or standalone block) a converted state_dict fits.

    Args:
        state: the state_dict with our keys.
        nl: the non-local blocks' options.
        gc: the GC blocks' options.
        builder: builder keywords the source fixes (e.g. the stem's temporal strides).

    Raises:
        ConversionError: a layout no registered model has (the message says what to build).
    """
    if "conv1.weight" in state or "stem.0.weight" in state:
        w = state.get("conv1.weight", state.get("stem.0.weight"))
        if w.dim() == 5:
            return _video_target(state, nl, gc, builder)
        return _image_target(state, nl, gc, builder)
    if any(k.startswith("backbone.") for k in state) and any(k.startswith("head.") for k in state):
        return _segmentation_target(state, nl, gc, builder)
    if "g.weight" in state and "conv_out.weight" in state:
        w = state["g.weight"]
        kw: dict[str, Any] = {
            "channels": int(w.shape[1]),
            "inner_channels": int(w.shape[0]),
            "dims": w.dim() - 2,
        }
        kw.update({k: v for k, v in nl.items() if k != "inner_channels"})
        return Target(None, kw, "nl")
    if any(k.startswith(("transform_add.", "transform_mul.")) for k in state):
        t = next(v for k, v in state.items() if k.endswith(".0.weight"))
        kw = {"channels": int(t.shape[1]), "dims": t.dim() - 2}
        kw.update(_gc_block_kwargs(gc))
        return Target(None, kw, "gc")
    raise ConversionError(
        "the converted keys are neither a ResNet (conv1, layer1..4), a segmentation model "
        "(backbone., head.) nor a standalone NL/GC block; pass the target model"
    )


def _check_gc_slot(state: Mapping[str, Tensor], prefix: str = "") -> None:
    for k in state:
        if re.match(rf"^{re.escape(prefix)}layer\d\.\d+\.gc\.(theta|g|phi)\.", k):
            raise ConversionError(
                "the checkpoint has non-local blocks inside its bottlenecks (before the residual "
                "addition, e.g. mmdet's after_conv3 plugin or timm's attn_layer='nl'); no "
                "registered model places NL blocks there: build one with "
                "nonlocalnet.models.insert_context_blocks(model, placement, "
                "lambda c: NonLocal2d(c, ...)) and pass it as the target model"
            )


def _video_target(
    state: Mapping[str, Tensor],
    nl: Mapping[str, Any],
    gc: Mapping[str, Any],
    builder: Mapping[str, Any],
) -> Target:
    depth, block = _depth(state)
    layers = DEPTHS[depth][1]
    _check_gc_slot(state)
    stages = list(zip(range(1, 5), layers, strict=True))
    t1 = [[int(state[f"layer{s}.{i}.conv1.weight"].shape[2]) for i in range(n)] for s, n in stages]
    t2 = [[int(state[f"layer{s}.{i}.conv2.weight"].shape[2]) for i in range(n)] for s, n in stages]
    first = any(t > 1 for ts in t1 for t in ts)
    mid = block == "bottleneck" and any(t > 1 for ts in t2 for t in ts)
    if first and mid:
        raise ConversionError(
            "the checkpoint inflates both the first conv and the 3x3 conv of its blocks; the "
            "video ResNet inflates one of them (3x1x1 or 3x3x3)"
        )
    kernels = t2 if mid else t1
    if any(t not in (1, 3) for ts in kernels for t in ts):
        raise ConversionError(f"temporal kernels other than 1 and 3 in the blocks: {kernels}")
    inflation = None if not (first or mid) else ("3x3x3" if mid else "3x1x1")
    pattern = [[int(t == 3) for t in ts] for ts in kernels]
    nl_place = _placement(state, "after")
    gc_place = _placement(state, "gc")
    has_nl = any(nl_place)
    kind = "c2d" if inflation is None else "i3d"
    name = f"{'nl_' if has_nl else ''}{kind}_r{depth}"
    if inflation == "3x3x3" and not has_nl:
        name = f"i3d_r{depth}_3x3x3"
    if name not in list_models():
        name = f"{'nl_' if has_nl else ''}{kind}_r50"
    fc = state.get("fc.weight")
    b: dict[str, Any] = {
        "depth": depth,
        **builder,
        "num_classes": int(fc.shape[0]) if fc is not None else 0,
        "inflation": inflation,
        "nonlocal_placement": nl_place if has_nl else None,
    }
    conv1 = tuple(int(x) for x in state["conv1.weight"].shape[2:])
    if conv1 != ((1, 7, 7) if inflation is None else (5, 7, 7)):
        b["conv1_kernel"] = conv1
    if inflation is not None and pattern != official_inflation_pattern(layers):
        b["inflation_pattern"] = pattern
    nl_kw = gc_kw = None
    if has_nl:
        channels, inner = _nl_widths(state, r"\.after\.")
        nl_kw = _nl_block_kwargs(nl, channels, inner)
    if any(gc_place):
        b["gc_placement"] = gc_place
        gc_kw = _gc_block_kwargs(gc)
    return _target(name, b, nl_kw, gc_kw)


def _image_target(
    state: Mapping[str, Tensor],
    nl: Mapping[str, Any],
    gc: Mapping[str, Any],
    builder: Mapping[str, Any],
) -> Target:
    depth, _ = _depth(state)
    DEPTHS[depth][1]
    _check_gc_slot(state)
    nl_place = _placement(state, "after")
    gc_place = _placement(state, "gc")
    fc = state.get("fc.weight")
    b: dict[str, Any] = {
        "depth": depth,
        **builder,
        "num_classes": int(fc.shape[0]) if fc is not None else 0,
        "nonlocal_placement": nl_place if any(nl_place) else None,
        "gc_placement": gc_place if any(gc_place) else None,
    }
    if "stem.0.weight" in state:
        b["deep_stem"] = True
    nl_kw = gc_kw = None
    if any(nl_place):
        channels, inner = _nl_widths(state, r"\.after\.")
        nl_kw = _nl_block_kwargs(nl, channels, inner)
    if any(gc_place):
        gc_kw = _gc_block_kwargs(gc)
        name = f"gc_resnet{depth}" if f"gc_resnet{depth}" in list_models() else "gc_resnet50"
    elif any(nl_place):
        name = "nl_resnet50"
    else:
        name = f"resnet{depth}"
    return _target(name, b, nl_kw, gc_kw)


def _segmentation_target(
    state: Mapping[str, Tensor],
    nl: Mapping[str, Any],
    gc: Mapping[str, Any],
    builder: Mapping[str, Any],
) -> Target:
    depth, _ = _depth(state, "backbone.")
    if "head.fusion.f_key.0.weight" in state:
        head = "ann"
    elif "head.block.g.weight" in state:
        head = "nl"
    elif any(k.startswith("head.block.") for k in state):
        head = "gc"
    elif "head.conv.0.weight" in state:
        head = "fcn"
    else:
        raise ConversionError("segmentation head not recognised (ann, nl, gc or fcn)")
    name = f"{head}_r{depth}_os8"
    if name not in list_models():
        name = f"{head}_r101_os8"
    b: dict[str, Any] = {
        "depth": depth,
        **builder,
        "head": head,
        "num_classes": int(state["head.classifier.weight"].shape[0]),
        "aux": any(k.startswith("aux_head.") for k in state),
    }
    conv = {"ann": "head.conv.0.weight", "fcn": "head.conv.0.weight"}.get(
        head, "head.conv_in.0.weight"
    )
    b["head_channels"] = int(state[conv].shape[0])
    if b["aux"] and "aux_head.conv.0.weight" in state:
        aux = int(state["aux_head.conv.0.weight"].shape[0])
        if aux != max(b["head_channels"] // 2, 1):
            raise ConversionError(
                f"auxiliary head of {aux} channels; the model's is head_channels // 2 = "
                f"{max(b['head_channels'] // 2, 1)}"
            )
    if head == "ann":
        kw = {
            "key_channels": int(state["head.fusion.f_key.0.weight"].shape[0]),
            "value_channels": int(state["head.fusion.f_value.weight"].shape[0]),
        }
        return _target(name, b, head=kw)
    if head == "nl":
        c = b["head_channels"]
        return _target(
            name, b, _nl_block_kwargs(nl, [c], [int(state["head.block.g.weight"].shape[0])])
        )
    if head == "gc":
        return _target(name, b, gc=_gc_block_kwargs(gc))
    return _target(name, b)
