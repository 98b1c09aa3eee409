"""Model zoo: the networks of the three papers by name, ``create_model(name, **overrides)``.

Every entry is a builder (:func:`~nonlocalnet.models.builders.create_resnet`,
:func:`~nonlocalnet.models.video_resnet.create_video_resnet`,
:func:`~nonlocalnet.models.segmentation.create_segmentation_model`) with fixed arguments. An
override is any keyword of that builder, or a shortcut for the inserted blocks: ``pairwise``,
``extent``, ``sub_sample``, ... for NL models (keyword arguments of the NL block) and ``ratio``,
``pooling``, ``fusion`` for GC models. Anything else raises ``TypeError`` naming the valid ones.

Weights are not downloaded: every model starts from its builder's initialisation (inserted
blocks zero-initialised, so they start as the identity). Load a 2D ImageNet checkpoint with
``model.load_state_dict(..., strict=False)`` (2D) or
:func:`~nonlocalnet.models.video_resnet.load_2d_checkpoint` (video).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nonlocalnet.models.builders import create_resnet
from nonlocalnet.models.placement import gc_placement, nl_preset
from nonlocalnet.models.resnet import DEPTHS
from nonlocalnet.models.segmentation import create_segmentation_model
from nonlocalnet.models.video_resnet import create_video_resnet

__all__ = ["ModelInfo", "create_model", "list_models", "model_info"]

#: overrides forwarded to the NL blocks (``nonlocal_kwargs``) of models that have them.
NL_SHORTCUTS = (
    "pairwise",
    "extent",
    "sub_sample",
    "sub_sample_position",
    "use_scale",
    "inner_channels",
    "impl",
)
#: overrides forwarded to the GC blocks (``gc_kwargs``).
GC_SHORTCUTS = ("ratio", "pooling", "fusion", "layer_norm")

NL_PAPER = "Wang et al., Non-local Neural Networks, CVPR 2018"
GC_PAPER = (
    "Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW 2019"
)
ANN_PAPER = "Zhu et al., Asymmetric Non-local Neural Networks for Semantic Segmentation, ICCV 2019"
RESNET_PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016"


@dataclass(frozen=True)
class ModelInfo:
    """A registered model.

    Attributes:
        name: registry name.
        task: ``"image"``, ``"video"`` or ``"segmentation"``.
        builder: the builder function.
        defaults: the builder arguments of this entry.
        shortcuts: override names forwarded to the inserted blocks.
        doc: description, paper and published result.
    """

    name: str
    task: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any]
    shortcuts: tuple[str, ...] = ()
    doc: str = ""
    block_key: str | None = field(default=None, repr=False)

    def valid_overrides(self) -> list[str]:
        """Names ``create_model`` accepts for this model."""
        params = [
            p
            for p, v in inspect.signature(self.builder).parameters.items()
            if v.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        return sorted(set(params) | set(self.shortcuts))

    def build(self, **overrides: Any) -> nn.Module:
        """Build the model with ``overrides`` (see :func:`create_model`)."""
        valid = set(self.valid_overrides())
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(
                f"{self.name}: unknown override(s) {', '.join(map(repr, unknown))}; valid "
                f"overrides are {', '.join(sorted(valid))}"
            )
        kwargs = dict(self.defaults)
        block_kw = dict(kwargs.get(self.block_key) or {}) if self.block_key else {}
        for k, v in overrides.items():
            if k in self.shortcuts:
                block_kw[k] = v
            elif k == self.block_key:
                block_kw.update(v or {})
            else:
                kwargs[k] = v
        if self.block_key:
            kwargs[self.block_key] = block_kw
        model = self.builder(**kwargs)
        model.model_name = self.name
        return model


_REGISTRY: dict[str, ModelInfo] = {}


def _register(
    name: str,
    task: str,
    builder: Callable[..., nn.Module],
    doc: str,
    *,
    block_key: str | None = None,
    **defaults: Any,
) -> None:
    shortcuts: tuple[str, ...] = ()
    if block_key in ("nonlocal_kwargs", "head_kwargs") and "gc" not in name:
        shortcuts = (
            NL_SHORTCUTS if task == "video" else tuple(s for s in NL_SHORTCUTS if s != "extent")
        )
    elif block_key in ("gc_kwargs", "head_kwargs"):
        shortcuts = GC_SHORTCUTS
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    info = ModelInfo(name, task, builder, defaults, shortcuts, " ".join(doc.split()), block_key)
    _REGISTRY[name] = info

    # a module-level function per model, timm style: ``zoo.nl_c2d_r50(num_classes=10)``
    def entry(**overrides: Any) -> nn.Module:
        return info.build(**overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{info.doc}\n\nKeyword overrides: {', '.join(info.valid_overrides())}."
    entry.__module__ = __name__
    globals()[name] = entry


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        **overrides: builder keywords (``num_classes``, ``depth``, ``dropout``, ...) and, for
            models with blocks, the blocks' options (``pairwise``, ``extent``,
            ``sub_sample``, ``ratio``, ...).

    Returns:
        The model, with ``model_name`` and ``default_input`` attributes.

    Raises:
        ValueError: unknown model name.
        TypeError: unknown override (the message lists the valid ones).
    """
    return model_info(name).build(**overrides)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``."""
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[0]}*")[:10]
        raise ValueError(
            f"unknown model {name!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
            + "; see list_models() or `nonlocalnet models`"
        )
    return _REGISTRY[name]


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered model names matching a glob ``pattern`` (and ``task``), sorted."""
    return sorted(
        n
        for n, info in _REGISTRY.items()
        if fnmatch.fnmatch(n, pattern) and (task is None or info.task == task)
    )


# -- 2D image networks ---------------------------------------------------------------------------

for _d in (18, 34, 50, 101, 152):
    _register(
        f"resnet{_d}",
        "image",
        create_resnet,
        f"""ResNet-{_d} for ImageNet ({RESNET_PAPER}), torchvision's state_dict keys and shapes.
        Parameters at 1000 classes: {"25,557,032" if _d == 50 else "44,549,160" if _d == 101 else "as torchvision"}.""",
        depth=_d,
    )

_register(
    "resnet_tiny",
    "image",
    create_resnet,
    """Tiny 2D ResNet for tests and demos only (basic blocks, one per stage, widths 8-64).""",
    block="basic",
    layers=(1, 1, 1, 1),
    widths=(8, 16, 32, 64),
    stem_channels=8,
    num_classes=10,
    default_input=(3, 64, 64),
)
_register(
    "nl_resnet50",
    "image",
    create_resnet,
    f"""ResNet-50 with one embedded-Gaussian NonLocal2d after res4 block 3 (layer3.2)
    ({NL_PAPER}; the paper adds this block to Mask R-CNN's res4 for COCO).""",
    block_key="nonlocal_kwargs",
    depth=50,
    nonlocal_placement=nl_preset("1block", 50),
)
for _name, _d, _r, _pub in (
    (
        "gc_resnet50",
        50,
        1 / 16,
        "COCO Mask R-CNN R50-FPN 1x box/mask AP 39.4/35.7 (baseline 37.2/33.8)",
    ),
    ("gc_resnet50_r4", 50, 1 / 4, "COCO Mask R-CNN R50-FPN 1x box/mask AP 39.9/36.2"),
    ("gc_resnet101", 101, 1 / 16, "no result for this backbone in SPEC"),
):
    _register(
        _name,
        "image",
        create_resnet,
        f"""ResNet-{_d} with a GlobalContext block (r = 1/{round(1 / _r)}, attention pooling, add
        fusion) in every bottleneck of c3-c5, after bn3 and before the residual addition
        ({GC_PAPER}). Published (as a detection backbone): {_pub}. GC r16 adds 2.52M parameters
        to ResNet-50.""",
        block_key="gc_kwargs",
        depth=_d,
        gc_placement=gc_placement(DEPTHS[_d][1]),
        gc_kwargs={"ratio": _r},
    )

# -- video networks ------------------------------------------------------------------------------

#: NL options of the video models: sub-sampled (1x2x2 max pooling of the key/value side),
#: pooling x before the φ/g convolutions as the official code does. This is what the paper's
#: cost figures (Table 2e: NL C2D 5-block 1.2x FLOPs of C2D R101) correspond to; pooling after
#: φ/g (the paper's text, ``sub_sample_position="after"``) costs 1.32x at 32x224x224.
_OFFICIAL_NL = {"sub_sample": True, "sub_sample_position": "before"}
_KINETICS = "Kinetics-400 val top-1/top-5 (R50, 32x2, paper Table 2)"
for _d in (50, 101):
    _pub = (lambda s: f"{_KINETICS}: {s}.") if _d == 50 else (lambda s: "")
    _register(
        f"c2d_r{_d}",
        "video",
        create_video_resnet,
        f"""C2D ResNet-{_d} ({NL_PAPER}): 2D kernels (1xkxk), time reduced by pooling only,
        400 classes, 32-frame input. {_pub("71.8/89.7")}""",
        depth=_d,
    )
    _register(
        f"i3d_r{_d}",
        "video",
        create_video_resnet,
        f"""I3D ResNet-{_d} with 3x1x1 inflation in the official pattern (conv1 5x7x7; all res2,
        res3 blocks 0,2, res4 even blocks, res5 block 1) ({NL_PAPER}). {_pub("73.3/90.7")}""",
        depth=_d,
        inflation="3x1x1",
    )
    _register(
        f"i3d_r{_d}_3x3x3",
        "video",
        create_video_resnet,
        f"""I3D ResNet-{_d} with 3x3x3 inflation of the 3x3 conv in the official pattern's blocks
        ({NL_PAPER}, Table 2e cost comparison: 1.5x params, 1.8x FLOPs of C2D R101).""",
        depth=_d,
        inflation="3x3x3",
    )
    for _suffix, _preset, _res in (
        (
            "",
            "5block",
            "73.8/91.0; extent ablation (top-1, override extent=): space 72.9, time 73.1, "
            "spacetime 73.8",
        ),
        (
            "_1block",
            "1block",
            "72.7/90.5; pairwise ablation (top-1, override pairwise=): gaussian 72.5, "
            "embedded_gaussian 72.7, dot_product 72.9, concatenation 72.8; stage ablation "
            "(top-1): res2 72.7, res3 72.9, res4 72.7, res5 72.3",
        ),
        ("_10block", "10block", "74.3/91.2"),
    ):
        _where = {
            "5block": "res3 blocks 1,3 and res4 blocks "
            + ("1,3,5" if _d == 50 else "6,13,20 (official R101)"),
            "1block": "the 3rd block of res4",
            "10block": "every block of res3 and res4"
            if _d == 50
            else "all of res3 and res4 blocks 0,4,...,20 (our choice; the paper defines 10 blocks on R50)",
        }[_preset]
        _register(
            f"nl_c2d_r{_d}{_suffix}",
            "video",
            create_video_resnet,
            f"""NL C2D ResNet-{_d}, {_preset[:-5]} embedded-Gaussian NonLocal3d block{"" if _preset == "1block" else "s"} (spacetime,
            key/value sub-sampled 1x2x2 before φ/g as the official code) after {_where} ({NL_PAPER}). {_pub(_res)}""",
            block_key="nonlocal_kwargs",
            depth=_d,
            nonlocal_placement=nl_preset(_preset, _d),
            nonlocal_kwargs=_OFFICIAL_NL,
        )
    _register(
        f"nl_i3d_r{_d}",
        "video",
        create_video_resnet,
        f"""NL I3D ResNet-{_d}: I3D 3x1x1 plus 5 embedded-Gaussian NonLocal3d blocks (sub-sampled)
        ({NL_PAPER}). {_pub("74.9/91.6")} mmaction2's variant (dot product, sub-sampled) has
        35.4M parameters vs 28.0M for I3D R50.""",
        block_key="nonlocal_kwargs",
        depth=_d,
        inflation="3x1x1",
        nonlocal_placement=nl_preset("5block", _d),
        nonlocal_kwargs=_OFFICIAL_NL,
    )

_TINY_VIDEO = {
    "block": "basic",
    "layers": (1, 1, 1, 1),
    "widths": (8, 16, 32, 64),
    "stem_channels": 8,
    "num_classes": 10,
    "conv1_kernel": (1, 5, 5),
    "conv1_stride": (1, 2, 2),
    "pool1_kernel": (1, 3, 3),
    "pool1_stride": (1, 2, 2),
    "pool2_temporal": 2,
    "dropout": 0.0,
    "default_input": (3, 8, 32, 32),
}
_register(
    "c2d_tiny",
    "video",
    create_video_resnet,
    """Tiny C2D (basic blocks, one per stage, widths 8-64, 10 classes) for tests and demos only;
    8x32x32 clips: res2 at 8x8x8, pool2 to 4 frames.""",
    **_TINY_VIDEO,
)
_register(
    "nl_c2d_tiny",
    "video",
    create_video_resnet,
    """Tiny NL C2D for tests and demos only: c2d_tiny plus embedded-Gaussian NonLocal3d blocks
    (spacetime, sub-sampled) after res3 and res4 (layer2.0, layer3.0).""",
    block_key="nonlocal_kwargs",
    nonlocal_placement=[[], [0], [0], []],
    nonlocal_kwargs=_OFFICIAL_NL,
    **_TINY_VIDEO,
)

# -- segmentation --------------------------------------------------------------------------------

_SEG = {"output_stride": 8}
for _d in (50, 101):
    _register(
        f"fcn_r{_d}_os8",
        "segmentation",
        create_segmentation_model,
        f"""FCN baseline: dilated ResNet-{_d} (output stride 8), 3x3 conv head to 512, classifier,
        auxiliary FCN head on stage 4 (weight 0.4); 19 classes (Cityscapes).""",
        depth=_d,
        head="fcn",
        **_SEG,
    )
    _register(
        f"ann_r{_d}_os8",
        "segmentation",
        create_segmentation_model,
        f"""ANN: dilated ResNet-{_d} (OS 8) → AFNB(stage 4, stage 5) → 3x3 conv to 512 → APNB →
        classifier, aux FCN head on stage 4 (weight 0.4) ({ANN_PAPER}).
        {"Published (R101): Cityscapes val 79.9 / test 81.3 mIoU (single scale), ADE20K val 45.24, PASCAL Context 52.8." if _d == 101 else ""}""",
        depth=_d,
        head="ann",
        **_SEG,
    )
_register(
    "nl_r101_os8",
    "segmentation",
    create_segmentation_model,
    f"""Dilated ResNet-101 (OS 8) with an NL head: 3x3 conv to 512 → embedded-Gaussian NonLocal2d
    → 3x3 conv → classifier, aux FCN head ({NL_PAPER}; the dense baseline of {ANN_PAPER}).""",
    block_key="head_kwargs",
    depth=101,
    head="nl",
    **_SEG,
)
_register(
    "gc_r101_os8",
    "segmentation",
    create_segmentation_model,
    f"""Dilated ResNet-101 (OS 8) with a GC head: 3x3 conv to 512 → GlobalContext (r = 1/4) →
    3x3 conv → classifier, aux FCN head ({GC_PAPER}).""",
    block_key="head_kwargs",
    depth=101,
    head="gc",
    head_kwargs={"ratio": 1 / 4},
    **_SEG,
)
_register(
    "seg_tiny",
    "segmentation",
    create_segmentation_model,
    """Tiny segmentation network for tests and demos only: tiny dilated ResNet (OS 8) with an
    FCN head and aux head.""",
    head="fcn",
    block="basic",
    layers=(1, 1, 1, 1),
    widths=(8, 16, 32, 64),
    stem_channels=8,
    head_channels=16,
    num_classes=5,
    default_input=(3, 64, 64),
    **_SEG,
)
