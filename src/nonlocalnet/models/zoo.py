"""Model zoo: the networks of the three papers by name, ``create_model(name, **overrides)``.

Every model is a function of this module, registered with :func:`register_model` (timm style:
``zoo.nl_c2d_r50(num_classes=10)`` is ``create_model("nl_c2d_r50", num_classes=10)``). Its
registration names the builder (:func:`~nonlocalnet.models.builders.create_resnet`,
:func:`~nonlocalnet.models.video_resnet.create_video_resnet`,
:func:`~nonlocalnet.models.segmentation.create_segmentation_model`) and the builder arguments;
its docstring gives the description, the paper and the published result.

An override is any keyword of the builder, or one of the model's declared shortcuts for its
inserted blocks: :data:`NL_OPTIONS` (``pairwise``, ``sub_sample``, ...; plus ``extent`` on video,
:data:`NL_VIDEO_OPTIONS`) are keywords of the NL blocks, :data:`GC_OPTIONS` (``ratio``,
``pooling``, ...) of the GC blocks. Anything else raises ``TypeError`` naming the valid ones.

Detectors (task ``"detection"``: Mask R-CNN and Faster R-CNN of torchvision on our
ResNet-FPN, :func:`~nonlocalnet.models.detection.create_detection_model`) take a list of
``(3, H, W)`` images: ``model(images, targets)`` returns the dict of losses in training, and
``model(images)`` per image ``{"boxes", "labels", "scores"[, "masks"]}`` in evaluation.

``features_only=True`` (with ``out_indices``, default ``(1, 2, 3, 4)``), as in timm, turns an
image or video ResNet into a :class:`~nonlocalnet.models.features.ResNetFeatures`: a module
returning the list of stage outputs, with ``feature_info`` (channels and reduction of each).

Weights are not downloaded: every model starts from its builder's initialisation (inserted
blocks zero-initialised, so they start as the identity), or from a file given as
``weights=PATH``: a torchvision ResNet checkpoint (``weights_source="torchvision"``, the
default: inflated into video models, loaded into the backbone of segmentation and detection
models) or one of this library (``weights_source="nonlocalnet"``: a training checkpoint, an
exported or converted safetensors file); see :func:`nonlocalnet.models.weights.load_pretrained`.
Checkpoints of other implementations are converted by :mod:`nonlocalnet.convert`.

Models of one's own are registered the same way, from any module::

    @register_model(task="video")
    def my_net(*, num_classes: int = 400) -> nn.Module: ...

    create_model("my_net", num_classes=10)
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from nonlocalnet._checks import check_choice
from nonlocalnet.models.builders import create_resnet
from nonlocalnet.models.detection import create_detection_model
from nonlocalnet.models.features import ResNetFeatures
from nonlocalnet.models.placement import gc_placement, nl_preset
from nonlocalnet.models.resnet import DEPTHS, ResNet
from nonlocalnet.models.segmentation import create_segmentation_model
from nonlocalnet.models.video_resnet import create_video_resnet
from nonlocalnet.models.weights import load_pretrained

__all__ = [
    "CCA_OPTIONS",
    "DNL_OPTIONS",
    "EFFATTN_OPTIONS",
    "EMA_OPTIONS",
    "GC_OPTIONS",
    "NL_OPTIONS",
    "NL_VIDEO_OPTIONS",
    "TASKS",
    "ModelInfo",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]

TASKS = ("image", "video", "segmentation", "detection")

#: shortcuts forwarded to the NL blocks of 2D models (keywords of ``NonLocalNd``).
NL_OPTIONS = (
    "pairwise",
    "sub_sample",
    "sub_sample_position",
    "use_scale",
    "inner_channels",
    "impl",
)
#: shortcuts forwarded to the NL blocks of video models: also the extent (spacetime/space/time).
NL_VIDEO_OPTIONS = (*NL_OPTIONS, "extent")
#: shortcuts forwarded to the GC blocks (keywords of ``GlobalContext``).
GC_OPTIONS = ("ratio", "pooling", "fusion", "layer_norm")

#: the papers the models come from, as cited in their docstrings.
PAPERS = {
    "resnet": "He et al., Deep Residual Learning for Image Recognition, CVPR 2016",
    "nl": "Wang et al., Non-local Neural Networks, CVPR 2018",
    "gc": "Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, "
    "ICCVW 2019",
    "ann": "Zhu et al., Asymmetric Non-local Neural Networks for Semantic Segmentation, ICCV 2019",
    "mask_rcnn": "He et al., Mask R-CNN, ICCV 2017",
    "faster_rcnn": "Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region "
    "Proposal Networks, NeurIPS 2015",
    "dnl": "Yin et al., Disentangled Non-Local Neural Networks, ECCV 2020",
    "ccnet": "Huang et al., CCNet: Criss-Cross Attention for Semantic Segmentation, ICCV 2019",
    "ema": "Li et al., Expectation-Maximization Attention Networks for Semantic Segmentation, "
    "ICCV 2019",
    "effattn": "Shen et al., Efficient Attention: Attention with Linear Complexities, WACV 2021",
}

#: options of the successor blocks, forwarded to the segmentation heads' block.
DNL_OPTIONS = ("inner_channels", "pairwise", "temperature", "use_scale")
CCA_OPTIONS = ("inner_channels", "recurrence")
EMA_OPTIONS = ("num_bases", "num_stages", "momentum")
EFFATTN_OPTIONS = ("key_channels", "value_channels", "heads")

#: NL options of the video models: sub-sampled (1x2x2 max pooling of the key/value side),
#: pooling x before the φ/g convolutions as the official code does. This is what the paper's
#: cost figures (Table 2e: NL C2D 5-block 1.2x FLOPs of C2D R101) correspond to; pooling after
#: φ/g (the paper's text, ``sub_sample_position="after"``) costs 1.32x at 32x224x224.
OFFICIAL_NL = {"sub_sample": True, "sub_sample_position": "before"}

#: tiny 2D networks (tests and demos): basic blocks, one per stage, widths 8-64.
_TINY_2D = {
    "block": "basic",
    "layers": (1, 1, 1, 1),
    "widths": (8, 16, 32, 64),
    "stem_channels": 8,
    "default_input": (3, 64, 64),
}
#: tiny video networks: the same widths, a 1x5x5 stem without temporal stride, 8x32x32 clips.
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

#: tiny detectors (tests and demos): a basic-block ResNet with widths 8-64 (two blocks in res4,
#: so that the NL placement has a block before the last), trained from scratch with BN; a
#: 32-channel FPN, narrow heads, anchors 16..256 for 128x160 images, fewer proposals.
_TINY_DETECTION = {
    "block": "basic",
    "layers": (1, 1, 2, 1),
    "widths": (8, 16, 32, 64),
    "stem_channels": 8,
    "num_classes": 3,
    "norm": "bn",
    "trainable_layers": 5,
    "fpn_channels": 32,
    "representation_size": 128,
    "mask_channels": 32,
    "anchor_sizes": (16, 32, 64, 128, 256),
    "min_size": 128,
    "max_size": 160,
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 150,
    "rpn_pre_nms_top_n_test": 150,
    "rpn_post_nms_top_n_test": 100,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 20,
    "default_input": (3, 128, 160),
}

_Fn = TypeVar("_Fn", bound=Callable[..., nn.Module])


def _keywords(fn: Callable[..., Any]) -> tuple[list[str], bool, dict[str, Any]]:
    """(keyword parameter names, whether it takes ``**kwargs``, their defaults) of ``fn``."""
    names, open_, defaults = [], False, {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            open_ = True
        elif p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
            if p.default is not inspect.Parameter.empty:
                defaults[p.name] = p.default
    return names, open_, defaults


@dataclass(frozen=True)
class ModelInfo:
    """A registered model.

    Attributes:
        name: registry name.
        task: ``"image"``, ``"video"``, ``"segmentation"`` or ``"detection"``.
        builder: the function that builds the model (the registered function itself, unless
            a builder was given at registration).
        defaults: the builder arguments of this entry.
        shortcuts: override names forwarded to the inserted blocks (into ``block_key``).
        doc: the registered function's docstring (description, paper, published result).
        block_key: the builder argument holding the inserted blocks' keywords
            (``nonlocal_kwargs``, ``gc_kwargs``, ``head_kwargs``), or None.
        fn: the registered function.
    """

    name: str
    task: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    shortcuts: tuple[str, ...] = ()
    doc: str = ""
    block_key: str | None = field(default=None, repr=False)
    fn: Callable[..., nn.Module] | None = field(default=None, repr=False)

    @property
    def summary(self) -> str:
        """The first paragraph of :attr:`doc`, on one line."""
        return " ".join(self.doc.split("\n\n")[0].split())

    def valid_overrides(self) -> list[str]:
        """Names ``create_model`` accepts for this model (all names, when the builder takes
        ``**kwargs``: then the builder itself decides)."""
        return sorted(set(_keywords(self.builder)[0]) | set(self.shortcuts))

    def default_input(self) -> tuple[int, ...] | None:
        """Input size without the batch the model is built for (``model.default_input``), read
        from the registered defaults or the builder's own default; None when neither has one."""
        if "default_input" in self.defaults:
            return tuple(self.defaults["default_input"])
        value = _keywords(self.builder)[2].get("default_input")
        return None if value is None else tuple(value)

    def build(
        self, weights: Callable[[nn.Module], Any] | None = None, **overrides: Any
    ) -> nn.Module:
        """Build the model with ``overrides`` (see :func:`create_model`).

        Args:
            weights: called with the whole network before ``features_only`` cuts it (a
                pretrained start loads into the network its checkpoint was saved from); what
                it returns becomes ``model.load_report``.
            **overrides: see :func:`create_model`.
        """
        features_only = overrides.pop("features_only", False)
        out_indices = overrides.pop("out_indices", None)
        if not isinstance(features_only, bool):
            raise TypeError(f"{self.name}: features_only must be a bool, got {features_only!r}")
        if out_indices is not None and not features_only:
            raise ValueError(f"{self.name}: out_indices goes with features_only=True")
        model = self._build(**overrides)
        report = weights(model) if weights is not None else None
        if not features_only:
            if report is not None:
                model.load_report = report
            return model
        if not isinstance(model, ResNet):
            raise TypeError(
                f"{self.name}: features_only needs an image or video ResNet, got "
                f"{type(model).__name__} (task {self.task!r})"
            )
        features = ResNetFeatures(model, (1, 2, 3, 4) if out_indices is None else out_indices)
        features.model_name = self.name
        if report is not None:
            features.load_report = report
        return features

    def _build(self, **overrides: Any) -> nn.Module:
        names, open_, _ = _keywords(self.builder)
        if not open_:
            valid = set(names) | set(self.shortcuts)
            unknown = sorted(set(overrides) - valid)
            if unknown:
                raise TypeError(
                    f"{self.name}: unknown override(s) {', '.join(map(repr, unknown))}; valid "
                    f"overrides are {', '.join(sorted(valid))}"
                )
        kwargs = copy.deepcopy(dict(self.defaults))
        if self.block_key:
            block_kw = dict(kwargs.get(self.block_key) or {})
            if not str(overrides.get("nonlocal_block", "nl")).startswith("nl"):
                # the model's NL options are the NL block's; another block placed instead
                # starts from its own defaults (and the options given here)
                block_kw = {}
        for k, v in overrides.items():
            if k in self.shortcuts:
                block_kw[k] = v
            elif k == self.block_key:
                if v is not None and not isinstance(v, Mapping):
                    raise TypeError(
                        f"{self.name}: {k} must be a mapping of block keywords, got "
                        f"{type(v).__name__}"
                    )
                block_kw.update(v or {})
            else:
                kwargs[k] = v
        if self.block_key:
            kwargs[self.block_key] = block_kw
        model = self.builder(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self.name}: the builder must return an nn.Module, got {type(model).__name__}"
            )
        model.model_name = self.name
        return model


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    *,
    task: str,
    name: str | None = None,
    builder: Callable[..., nn.Module] | None = None,
    defaults: Mapping[str, Any] | None = None,
    block_key: str | None = None,
    shortcuts: Sequence[str] = (),
) -> Callable[[_Fn], _Fn]:
    """Register a model function under a name (a decorator; the function is returned as is).

    Without ``builder``, ``create_model(name, **overrides)`` calls the function itself with the
    overrides (``defaults`` first). With ``builder``, it calls ``builder(**defaults,
    **overrides)`` and the function is the model's named entry point (its body is
    ``return create_model(name, **overrides)``), as for the models of this module.

    Args:
        task: ``"image"``, ``"video"``, ``"segmentation"`` or ``"detection"``.
        name: registry name (default: the function's name).
        builder: the function that builds the model, when it is not the registered one.
        defaults: builder arguments of this entry.
        block_key: the builder argument that takes the inserted blocks' keywords
            (``nonlocal_kwargs``, ``gc_kwargs``, ``head_kwargs``); needed with ``shortcuts``.
        shortcuts: override names forwarded into ``block_key`` (e.g. :data:`NL_VIDEO_OPTIONS`).

    Returns:
        The decorator.

    Raises:
        ValueError: a name already registered, an unknown task, or defaults/shortcuts that do
            not fit the builder.
    """
    check_choice("task", task, TASKS)
    shortcuts = tuple(shortcuts)
    defaults = dict(defaults or {})

    def decorator(fn: _Fn) -> _Fn:
        if not callable(fn):
            raise TypeError(f"register_model: expected a function, got {type(fn).__name__}")
        key = getattr(fn, "__name__", None) if name is None else name
        if not isinstance(key, str) or not key or any(c.isspace() for c in key):
            raise ValueError(f"register_model: name must be a non-empty word, got {key!r}")
        if key in _REGISTRY:
            other = _REGISTRY[key].fn
            where = f" by {other.__module__}.{other.__qualname__}" if other is not None else ""
            raise ValueError(f"model {key!r} is already registered{where}")
        target = fn if builder is None else builder
        what = getattr(target, "__name__", repr(target))
        names, open_, _ = _keywords(target)
        if not open_:
            unknown = sorted(set(defaults) - set(names))
            if unknown:
                raise ValueError(f"{key}: defaults {unknown} are not arguments of {what}")
            if block_key is not None and block_key not in names:
                raise ValueError(f"{key}: block_key {block_key!r} is not an argument of {what}")
        if shortcuts and block_key is None:
            raise ValueError(f"{key}: shortcuts {list(shortcuts)} need a block_key to go into")
        clash = sorted(set(shortcuts) & set(names))
        if clash:
            raise ValueError(f"{key}: shortcuts {clash} are also arguments of {what}")
        doc = inspect.cleandoc(fn.__doc__) if fn.__doc__ else ""
        _REGISTRY[key] = ModelInfo(key, task, target, defaults, shortcuts, doc, block_key, fn)
        return fn

    return decorator


def create_model(
    name: str, *, weights: Any = None, weights_source: str = "torchvision", **overrides: Any
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        weights: a checkpoint to start from (a path, or a state_dict): see
            :func:`nonlocalnet.models.weights.load_pretrained`; its report is kept as
            ``model.load_report`` and logged.
        weights_source: ``"torchvision"`` or ``"nonlocalnet"``.
        **overrides: builder keywords (``num_classes``, ``depth``, ``dropout``, ...) and, for
            models with blocks, the blocks' options (``pairwise``, ``extent``,
            ``sub_sample``, ``ratio``, ...); ``features_only=True`` with ``out_indices``
            (stages 1..4, default all) for the stage features of a ResNet (timm's API).

    Returns:
        The model, with ``model_name`` and ``default_input`` attributes (a
        :class:`~nonlocalnet.models.features.ResNetFeatures` with ``features_only``).

    Raises:
        ValueError: unknown model name, or weights that do not fit it (the keys are named).
        TypeError: unknown override (the message lists the valid ones).
    """
    if weights is None:
        return model_info(name).build(**overrides)
    # Loaded before ``features_only`` keeps the first stages: the checkpoint is the whole network's.
    return model_info(name).build(
        weights=lambda model: load_pretrained(model, weights, source=weights_source), **overrides
    )


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``.

    Raises:
        ValueError: unknown name; the message lists the closest registered names, closest
            first.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.6)
        raise ValueError(
            f"unknown model {name!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
            + "; see list_models() or `nonlocalnet models`"
        )
    return _REGISTRY[name]


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered model names matching a glob ``pattern`` (and ``task``), sorted."""
    if task is not None:
        check_choice("task", task, TASKS)
    return sorted(
        n
        for n, info in _REGISTRY.items()
        if fnmatch.fnmatch(n, pattern) and (task is None or info.task == task)
    )


# -- 2D image networks ---------------------------------------------------------------------------


@register_model(task="image", builder=create_resnet, defaults={"depth": 18})
def resnet18(**overrides: Any) -> nn.Module:
    """ResNet-18 for ImageNet, torchvision's state_dict keys and shapes.

    He et al., Deep Residual Learning for Image Recognition, CVPR 2016. 11,689,512 parameters
    at 1000 classes.
    """
    return create_model("resnet18", **overrides)


@register_model(task="image", builder=create_resnet, defaults={"depth": 34})
def resnet34(**overrides: Any) -> nn.Module:
    """ResNet-34 for ImageNet, torchvision's state_dict keys and shapes.

    He et al., Deep Residual Learning for Image Recognition, CVPR 2016. 21,797,672 parameters
    at 1000 classes.
    """
    return create_model("resnet34", **overrides)


@register_model(task="image", builder=create_resnet, defaults={"depth": 50})
def resnet50(**overrides: Any) -> nn.Module:
    """ResNet-50 for ImageNet, torchvision's state_dict keys and shapes.

    He et al., Deep Residual Learning for Image Recognition, CVPR 2016. 25,557,032 parameters
    at 1000 classes.
    """
    return create_model("resnet50", **overrides)


@register_model(task="image", builder=create_resnet, defaults={"depth": 101})
def resnet101(**overrides: Any) -> nn.Module:
    """ResNet-101 for ImageNet, torchvision's state_dict keys and shapes.

    He et al., Deep Residual Learning for Image Recognition, CVPR 2016. 44,549,160 parameters
    at 1000 classes.
    """
    return create_model("resnet101", **overrides)


@register_model(task="image", builder=create_resnet, defaults={"depth": 152})
def resnet152(**overrides: Any) -> nn.Module:
    """ResNet-152 for ImageNet, torchvision's state_dict keys and shapes.

    He et al., Deep Residual Learning for Image Recognition, CVPR 2016. 60,192,808 parameters
    at 1000 classes.
    """
    return create_model("resnet152", **overrides)


@register_model(task="image", builder=create_resnet, defaults={**_TINY_2D, "num_classes": 10})
def resnet_tiny(**overrides: Any) -> nn.Module:
    """Tiny 2D ResNet for tests and demos only (basic blocks, one per stage, widths 8-64).

    10 classes, 64x64 images.
    """
    return create_model("resnet_tiny", **overrides)


@register_model(
    task="image",
    builder=create_resnet,
    defaults={"depth": 50, "nonlocal_placement": nl_preset("1block", 50)},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_resnet50(**overrides: Any) -> nn.Module:
    """ResNet-50 with one embedded-Gaussian NonLocal2d after the 3rd block of res4 (layer3.2).

    Wang et al., Non-local Neural Networks, CVPR 2018. The paper's Mask R-CNN adds its block to
    res4 right before the last residual block: ``nonlocal_placement=[[], [], [4], []]``.
    """
    return create_model("nl_resnet50", **overrides)


@register_model(
    task="image",
    builder=create_resnet,
    defaults={
        "depth": 50,
        "gc_placement": gc_placement(DEPTHS[50][1]),
        "gc_kwargs": {"ratio": 1 / 16},
    },
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_resnet50(**overrides: Any) -> nn.Module:
    """ResNet-50 with a GlobalContext block (r = 1/16) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Attention pooling, add fusion, after bn3 and before the residual addition; the
    blocks add 2.52M parameters to ResNet-50.

    Published (as a detection backbone): COCO Mask R-CNN R50-FPN 1x box/mask AP 39.4/35.7
    (baseline 37.2/33.8).
    """
    return create_model("gc_resnet50", **overrides)


@register_model(
    task="image",
    builder=create_resnet,
    defaults={
        "depth": 50,
        "gc_placement": gc_placement(DEPTHS[50][1]),
        "gc_kwargs": {"ratio": 1 / 4},
    },
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_resnet50_r4(**overrides: Any) -> nn.Module:
    """ResNet-50 with a GlobalContext block (r = 1/4) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Attention pooling, add fusion, after bn3 and before the residual addition; the
    blocks add 10.0M parameters to ResNet-50.

    Published (as a detection backbone): COCO Mask R-CNN R50-FPN 1x box/mask AP 39.9/36.2
    (baseline 37.2/33.8).
    """
    return create_model("gc_resnet50_r4", **overrides)


@register_model(
    task="image",
    builder=create_resnet,
    defaults={
        "depth": 101,
        "gc_placement": gc_placement(DEPTHS[101][1]),
        "gc_kwargs": {"ratio": 1 / 16},
    },
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_resnet101(**overrides: Any) -> nn.Module:
    """ResNet-101 with a GlobalContext block (r = 1/16) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Attention pooling, add fusion, after bn3 and before the residual addition; the
    blocks add 4.79M parameters to ResNet-101.
    """
    return create_model("gc_resnet101", **overrides)


# -- video networks ------------------------------------------------------------------------------


@register_model(task="video", builder=create_video_resnet, defaults={"depth": 50})
def c2d_r50(**overrides: Any) -> nn.Module:
    """C2D ResNet-50: 2D kernels (1xkxk), time reduced by pooling only, 32-frame clips.

    Wang et al., Non-local Neural Networks, CVPR 2018. 400 classes.

    Kinetics-400 val top-1/top-5 (R50, 32x2, the paper's Table 2): 71.8/89.7.
    """
    return create_model("c2d_r50", **overrides)


@register_model(task="video", builder=create_video_resnet, defaults={"depth": 101})
def c2d_r101(**overrides: Any) -> nn.Module:
    """C2D ResNet-101: 2D kernels (1xkxk), time reduced by pooling only, 32-frame clips.

    Wang et al., Non-local Neural Networks, CVPR 2018. 400 classes; the reference of the
    paper's cost comparison (Table 2e).
    """
    return create_model("c2d_r101", **overrides)


@register_model(
    task="video", builder=create_video_resnet, defaults={"depth": 50, "inflation": "3x1x1"}
)
def i3d_r50(**overrides: Any) -> nn.Module:
    """I3D ResNet-50, 3x1x1 inflation in the official pattern, conv1 5x7x7.

    Wang et al., Non-local Neural Networks, CVPR 2018. Inflated: all of res2, res3 blocks 0, 2,
    the even blocks of res4, res5 block 1.

    Kinetics-400 val top-1/top-5 (R50, 32x2, the paper's Table 2): 73.3/90.7.
    """
    return create_model("i3d_r50", **overrides)


@register_model(
    task="video", builder=create_video_resnet, defaults={"depth": 101, "inflation": "3x1x1"}
)
def i3d_r101(**overrides: Any) -> nn.Module:
    """I3D ResNet-101, 3x1x1 inflation in the official pattern, conv1 5x7x7.

    Wang et al., Non-local Neural Networks, CVPR 2018. Inflated: all of res2, res3 blocks 0, 2,
    the even blocks of res4, res5 block 1. The paper's Table 2e: 1.2x the parameters and 1.5x
    the FLOPs of C2D R101.
    """
    return create_model("i3d_r101", **overrides)


@register_model(
    task="video", builder=create_video_resnet, defaults={"depth": 50, "inflation": "3x3x3"}
)
def i3d_r50_3x3x3(**overrides: Any) -> nn.Module:
    """I3D ResNet-50, 3x3x3 inflation of the 3x3 conv in the official pattern's blocks.

    Wang et al., Non-local Neural Networks, CVPR 2018 (the I3D of its cost comparison).
    """
    return create_model("i3d_r50_3x3x3", **overrides)


@register_model(
    task="video", builder=create_video_resnet, defaults={"depth": 101, "inflation": "3x3x3"}
)
def i3d_r101_3x3x3(**overrides: Any) -> nn.Module:
    """I3D ResNet-101, 3x3x3 inflation of the 3x3 conv in the official pattern's blocks.

    Wang et al., Non-local Neural Networks, CVPR 2018. The paper's Table 2e: 1.5x the
    parameters and 1.8x the FLOPs of C2D R101.
    """
    return create_model("i3d_r101_3x3x3", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 50,
        "nonlocal_placement": nl_preset("5block", 50),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_r50(**overrides: Any) -> nn.Module:
    """NL C2D ResNet-50, 5 NonLocal3d blocks after res3 blocks 1, 3 and res4 blocks 1, 3, 5.

    Wang et al., Non-local Neural Networks, CVPR 2018. Embedded Gaussian over spacetime, the
    key/value side sub-sampled 1x2x2 before φ/g as in the official code.

    Kinetics-400 val top-1/top-5 (R50, 32x2, the paper's Table 2): 73.8/91.0. Extent ablation
    (top-1, override ``extent=``): space 72.9, time 73.1, spacetime 73.8.
    """
    return create_model("nl_c2d_r50", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 50,
        "nonlocal_placement": nl_preset("1block", 50),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_r50_1block(**overrides: Any) -> nn.Module:
    """NL C2D ResNet-50, 1 NonLocal3d block after the 3rd block of res4.

    Wang et al., Non-local Neural Networks, CVPR 2018. Embedded Gaussian over spacetime, the
    key/value side sub-sampled 1x2x2 before φ/g as in the official code.

    Kinetics-400 val top-1/top-5 (R50, 32x2, the paper's Table 2): 72.7/90.5. Pairwise ablation
    (top-1, override ``pairwise=``): gaussian 72.5, embedded_gaussian 72.7, dot_product 72.9,
    concatenation 72.8. Stage ablation (top-1): res2 72.7, res3 72.9, res4 72.7, res5 72.3.
    """
    return create_model("nl_c2d_r50_1block", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 50,
        "nonlocal_placement": nl_preset("10block", 50),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_r50_10block(**overrides: Any) -> nn.Module:
    """NL C2D ResNet-50, 10 NonLocal3d blocks, after every block of res3 and res4.

    Wang et al., Non-local Neural Networks, CVPR 2018. Embedded Gaussian over spacetime, the
    key/value side sub-sampled 1x2x2 before φ/g as in the official code.

    Kinetics-400 val top-1/top-5 (R50, 32x2, the paper's Table 2): 74.3/91.2.
    """
    return create_model("nl_c2d_r50_10block", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 101,
        "nonlocal_placement": nl_preset("5block", 101),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_r101(**overrides: Any) -> nn.Module:
    """NL C2D ResNet-101, 5 NonLocal3d blocks after res3 blocks 1, 3 and res4 blocks 6, 13, 20.

    Wang et al., Non-local Neural Networks, CVPR 2018; the R101 placement of the official code.
    Embedded Gaussian over spacetime, the key/value side sub-sampled 1x2x2 before φ/g. The
    paper's Table 2e: 1.2x the parameters and 1.2x the FLOPs of C2D R101.
    """
    return create_model("nl_c2d_r101", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 101,
        "nonlocal_placement": nl_preset("1block", 101),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_r101_1block(**overrides: Any) -> nn.Module:
    """NL C2D ResNet-101, 1 NonLocal3d block after the 3rd block of res4.

    Wang et al., Non-local Neural Networks, CVPR 2018. Embedded Gaussian over spacetime, the
    key/value side sub-sampled 1x2x2 before φ/g as in the official code.
    """
    return create_model("nl_c2d_r101_1block", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 101,
        "nonlocal_placement": nl_preset("10block", 101),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_r101_10block(**overrides: Any) -> nn.Module:
    """NL C2D ResNet-101, 10 NonLocal3d blocks: all of res3 and res4 blocks 0, 4, ..., 20.

    Wang et al., Non-local Neural Networks, CVPR 2018, which defines 10 blocks on R50 only;
    this R101 placement is the library's. Embedded Gaussian over spacetime, the key/value side
    sub-sampled 1x2x2 before φ/g as in the official code.
    """
    return create_model("nl_c2d_r101_10block", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 50,
        "inflation": "3x1x1",
        "nonlocal_placement": nl_preset("5block", 50),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_i3d_r50(**overrides: Any) -> nn.Module:
    """NL I3D ResNet-50: I3D 3x1x1 plus 5 NonLocal3d blocks (res3 1, 3; res4 1, 3, 5).

    Wang et al., Non-local Neural Networks, CVPR 2018. Embedded Gaussian over spacetime, the
    key/value side sub-sampled 1x2x2 before φ/g as in the official code.

    Kinetics-400 val top-1/top-5 (R50, 32x2, the paper's Table 2): 74.9/91.6. mmaction2's
    variant (dot product, sub-sampled) has 35.4M parameters vs 28.0M for I3D R50.
    """
    return create_model("nl_i3d_r50", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        "depth": 101,
        "inflation": "3x1x1",
        "nonlocal_placement": nl_preset("5block", 101),
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_i3d_r101(**overrides: Any) -> nn.Module:
    """NL I3D ResNet-101: I3D 3x1x1 plus 5 NonLocal3d blocks (res3 1, 3; res4 6, 13, 20).

    Wang et al., Non-local Neural Networks, CVPR 2018. Embedded Gaussian over spacetime, the
    key/value side sub-sampled 1x2x2 before φ/g as in the official code.
    """
    return create_model("nl_i3d_r101", **overrides)


@register_model(task="video", builder=create_video_resnet, defaults=_TINY_VIDEO)
def c2d_tiny(**overrides: Any) -> nn.Module:
    """Tiny C2D for tests and demos only: basic blocks, one per stage, widths 8-64.

    10 classes; 8x32x32 clips: res2 at 8x8x8, pool2 to 4 frames.
    """
    return create_model("c2d_tiny", **overrides)


@register_model(
    task="video",
    builder=create_video_resnet,
    defaults={
        **_TINY_VIDEO,
        "nonlocal_placement": [[], [0], [0], []],
        "nonlocal_kwargs": OFFICIAL_NL,
    },
    block_key="nonlocal_kwargs",
    shortcuts=NL_VIDEO_OPTIONS,
)
def nl_c2d_tiny(**overrides: Any) -> nn.Module:
    """Tiny NL C2D for tests and demos only: c2d_tiny plus NonLocal3d blocks in res3 and res4.

    Embedded Gaussian over spacetime, sub-sampled, after layer2.0 and layer3.0.
    """
    return create_model("nl_c2d_tiny", **overrides)


# -- segmentation --------------------------------------------------------------------------------


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 50, "head": "fcn", "output_stride": 8},
)
def fcn_r50_os8(**overrides: Any) -> nn.Module:
    """FCN baseline: dilated ResNet-50 (output stride 8), 3x3 conv head to 512, classifier.

    The baseline of Zhu et al., Asymmetric Non-local Neural Networks for Semantic Segmentation,
    ICCV 2019. Auxiliary FCN head on stage 4 (loss weight 0.4); 19 classes (Cityscapes).
    """
    return create_model("fcn_r50_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "fcn", "output_stride": 8},
)
def fcn_r101_os8(**overrides: Any) -> nn.Module:
    """FCN baseline: dilated ResNet-101 (output stride 8), 3x3 conv head to 512, classifier.

    The baseline of Zhu et al., Asymmetric Non-local Neural Networks for Semantic Segmentation,
    ICCV 2019. Auxiliary FCN head on stage 4 (loss weight 0.4); 19 classes (Cityscapes).
    """
    return create_model("fcn_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 50, "head": "ann", "output_stride": 8},
)
def ann_r50_os8(**overrides: Any) -> nn.Module:
    """ANN: dilated ResNet-50 (OS 8) → AFNB(stage 4, stage 5) → 3x3 conv to 512 → APNB.

    Zhu et al., Asymmetric Non-local Neural Networks for Semantic Segmentation, ICCV 2019.
    Classifier, auxiliary FCN head on stage 4 (loss weight 0.4); 19 classes (Cityscapes).
    """
    return create_model("ann_r50_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "ann", "output_stride": 8},
)
def ann_r101_os8(**overrides: Any) -> nn.Module:
    """ANN: dilated ResNet-101 (OS 8) → AFNB(stage 4, stage 5) → 3x3 conv to 512 → APNB.

    Zhu et al., Asymmetric Non-local Neural Networks for Semantic Segmentation, ICCV 2019.
    Classifier, auxiliary FCN head on stage 4 (loss weight 0.4); 19 classes (Cityscapes).

    Published: Cityscapes val 79.9 / test 81.3 mIoU (single scale), ADE20K val 45.24,
    PASCAL Context 52.8.
    """
    return create_model("ann_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "nl", "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_r101_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-101 (OS 8) with an NL head: 3x3 conv → NonLocal2d → 3x3 conv.

    Wang et al., Non-local Neural Networks, CVPR 2018: an embedded-Gaussian block on 512
    channels, the dense baseline of Zhu et al., Asymmetric Non-local Neural Networks for
    Semantic Segmentation, ICCV 2019. Classifier, auxiliary FCN head on stage 4.
    """
    return create_model("nl_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 50, "head": "dnl", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=DNL_OPTIONS,
)
def dnl_r50_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-50 (OS 8) with a DNL head: 3x3 conv → DisentangledNonLocal2d (whitened pairwise
    term + unary term, temperature 0.05) → 3x3 conv.

    Yin et al., Disentangled Non-Local Neural Networks, ECCV 2020. As mmseg's head: the block's
    output concatenated with the head's input (``conv_cat``), classifier, auxiliary FCN head on
    stage 4. Published: mmseg (same settings): ADE20K 41.76 mIoU (NL 40.75), Cityscapes 78.61 (NL
    78.24).
    """
    return create_model("dnl_r50_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "dnl", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=DNL_OPTIONS,
)
def dnl_r101_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-101 (OS 8) with a DNL head: 3x3 conv → DisentangledNonLocal2d (whitened pairwise
    term + unary term, temperature 0.05) → 3x3 conv.

    Yin et al., Disentangled Non-Local Neural Networks, ECCV 2020. As mmseg's head: the block's
    output concatenated with the head's input (``conv_cat``), classifier, auxiliary FCN head on
    stage 4. Published: mmseg (same settings): ADE20K 43.76 mIoU (NL 42.90), Cityscapes 78.31 (NL
    78.66).
    """
    return create_model("dnl_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 50, "head": "cca", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=CCA_OPTIONS,
)
def ccnet_r50_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-50 (OS 8) with a CCNet head: 3x3 conv → criss-cross attention applied R = 2
    times (shared weights) → 3x3 conv.

    Huang et al., CCNet: Criss-Cross Attention for Semantic Segmentation, ICCV 2019. As mmseg's
    head: the block's output concatenated with the head's input (``conv_cat``), classifier,
    auxiliary FCN head on stage 4. Published: mmseg: Cityscapes 77.76 mIoU (40k) / 79.03 (80k),
    ADE20K 41.78 (80k).
    """
    return create_model("ccnet_r50_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "cca", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=CCA_OPTIONS,
)
def ccnet_r101_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-101 (OS 8) with a CCNet head: 3x3 conv → criss-cross attention applied R = 2
    times (shared weights) → 3x3 conv.

    Huang et al., CCNet: Criss-Cross Attention for Semantic Segmentation, ICCV 2019. As mmseg's
    head: the block's output concatenated with the head's input (``conv_cat``), classifier,
    auxiliary FCN head on stage 4. Published: mmseg: Cityscapes 76.35 mIoU (40k) / 78.87 (80k),
    ADE20K 43.97 (80k); the paper: Cityscapes test 81.9.
    """
    return create_model("ccnet_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 50, "head": "ema", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=EMA_OPTIONS,
)
def ema_r50_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-50 (OS 8) with an EMA head: 3x3 conv → EMA unit (K = 64 bases, T = 3 EM steps,
    moving-average bases) → 3x3 conv.

    Li et al., Expectation-Maximization Attention Networks for Semantic Segmentation, ICCV 2019. As
    mmseg's head: the block's output concatenated with the head's input (``conv_cat``), classifier,
    auxiliary FCN head on stage 4. Published: mmseg: Cityscapes 77.59 mIoU (80k).
    """
    return create_model("ema_r50_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "ema", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=EMA_OPTIONS,
)
def ema_r101_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-101 (OS 8) with an EMA head: 3x3 conv → EMA unit (K = 64 bases, T = 3 EM steps,
    moving-average bases) → 3x3 conv.

    Li et al., Expectation-Maximization Attention Networks for Semantic Segmentation, ICCV 2019. As
    mmseg's head: the block's output concatenated with the head's input (``conv_cat``), classifier,
    auxiliary FCN head on stage 4. Published: mmseg: Cityscapes 79.10 mIoU (80k).
    """
    return create_model("ema_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 50, "head": "effattn", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=EFFATTN_OPTIONS,
)
def effattn_r50_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-50 (OS 8) with an efficient attention head: 3x3 conv → efficient attention
    (softmax over channels of Q, over positions of K; linear in N) → 3x3 conv.

    Shen et al., Efficient Attention: Attention with Linear Complexities, WACV 2021. As mmseg's
    head: the block's output concatenated with the head's input (``conv_cat``), classifier,
    auxiliary FCN head on stage 4. Published: no published segmentation result.
    """
    return create_model("effattn_r50_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "effattn", "concat_input": True, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=EFFATTN_OPTIONS,
)
def effattn_r101_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-101 (OS 8) with an efficient attention head: 3x3 conv → efficient attention
    (softmax over channels of Q, over positions of K; linear in N) → 3x3 conv.

    Shen et al., Efficient Attention: Attention with Linear Complexities, WACV 2021. As mmseg's
    head: the block's output concatenated with the head's input (``conv_cat``), classifier,
    auxiliary FCN head on stage 4. Published: no published segmentation result.
    """
    return create_model("effattn_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={"depth": 101, "head": "gc", "head_kwargs": {"ratio": 1 / 4}, "output_stride": 8},
    block_key="head_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_r101_os8(**overrides: Any) -> nn.Module:
    """Dilated ResNet-101 (OS 8) with a GC head: 3x3 conv → GlobalContext (r = 1/4) → 3x3 conv.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Classifier, auxiliary FCN head on stage 4.
    """
    return create_model("gc_r101_os8", **overrides)


@register_model(
    task="segmentation",
    builder=create_segmentation_model,
    defaults={
        **_TINY_2D,
        "head": "fcn",
        "head_channels": 16,
        "num_classes": 5,
        "output_stride": 8,
    },
)
def seg_tiny(**overrides: Any) -> nn.Module:
    """Tiny segmentation network for tests and demos only: tiny dilated ResNet (OS 8), FCN head.

    Auxiliary FCN head; 5 classes, 64x64 images.
    """
    return create_model("seg_tiny", **overrides)


# -- detection ---------------------------------------------------------------------------------


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 50},
)
def maskrcnn_r50_fpn(**overrides: Any) -> nn.Module:
    """Mask R-CNN R50-FPN baseline.

    He et al., Mask R-CNN, ICCV 2017, on torchvision's ResNet-50-FPN: torchvision's
    maskrcnn_resnet50_fpn (its state_dict loads strictly), FrozenBN, stem and res2 frozen.

    Published COCO val2017 box/mask AP (1x schedule): 37.2/33.8 (the baseline of Cao et al.,
    GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW 2019, SyncBN);
    38.0/34.6 (Wang et al., Non-local Neural Networks, CVPR 2018, Table 5); mmdetection
    38.4/34.6.
    """
    return create_model("maskrcnn_r50_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 50, "blocks": "gc", "gc_ratio": 1 / 16},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_maskrcnn_r50_fpn(**overrides: Any) -> nn.Module:
    """Mask R-CNN R50-FPN with a GlobalContext block (r = 1/16) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; He et al.,
    Mask R-CNN, ICCV 2017 on ResNet-50-FPN. The blocks add 2,521,741 parameters.

    Published COCO val2017 box/mask AP (1x schedule, SyncBN): 39.4/35.7 (baseline 37.2/33.8);
    mmdetection 39.7/35.9, with SyncBN 40.4/36.2.
    """
    return create_model("gc_maskrcnn_r50_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 50, "blocks": "gc", "gc_ratio": 1 / 4},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_maskrcnn_r50_fpn_r4(**overrides: Any) -> nn.Module:
    """Mask R-CNN R50-FPN with a GlobalContext block (r = 1/4) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; He et al.,
    Mask R-CNN, ICCV 2017 on ResNet-50-FPN. The blocks add 10,000,909 parameters.

    Published COCO val2017 box/mask AP (1x schedule, SyncBN): 39.9/36.2 (baseline 37.2/33.8).
    """
    return create_model("gc_maskrcnn_r50_fpn_r4", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 50, "blocks": "nl"},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_maskrcnn_r50_fpn(**overrides: Any) -> nn.Module:
    """Mask R-CNN R50-FPN with one NonLocal2d in res4, right before its last residual block.

    Wang et al., Non-local Neural Networks, CVPR 2018, §6: embedded Gaussian, after layer3.4
    (block 5 of 6); He et al., Mask R-CNN, ICCV 2017 on ResNet-50-FPN.

    Published COCO val2017 box/mask AP: 39.0/35.5 (baseline 38.0/34.6; the paper's Table 5).
    """
    return create_model("nl_maskrcnn_r50_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 101},
)
def maskrcnn_r101_fpn(**overrides: Any) -> nn.Module:
    """Mask R-CNN R101-FPN baseline.

    He et al., Mask R-CNN, ICCV 2017, on a ResNet-101-FPN (torchvision's keys), FrozenBN, stem
    and res2 frozen.

    Published COCO val2017 box/mask AP (1x schedule): 39.5/36.0 (Wang et al., Non-local Neural
    Networks, CVPR 2018, Table 5).
    """
    return create_model("maskrcnn_r101_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 101, "blocks": "gc", "gc_ratio": 1 / 16},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_maskrcnn_r101_fpn(**overrides: Any) -> nn.Module:
    """Mask R-CNN R101-FPN with a GlobalContext block (r = 1/16) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; He et al.,
    Mask R-CNN, ICCV 2017 on ResNet-101-FPN. GCNet's ablations use R50-FPN.
    """
    return create_model("gc_maskrcnn_r101_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 101, "blocks": "gc", "gc_ratio": 1 / 4},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_maskrcnn_r101_fpn_r4(**overrides: Any) -> nn.Module:
    """Mask R-CNN R101-FPN with a GlobalContext block (r = 1/4) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; He et al.,
    Mask R-CNN, ICCV 2017 on ResNet-101-FPN. GCNet's ablations use R50-FPN.
    """
    return create_model("gc_maskrcnn_r101_fpn_r4", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "mask_rcnn", "depth": 101, "blocks": "nl"},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_maskrcnn_r101_fpn(**overrides: Any) -> nn.Module:
    """Mask R-CNN R101-FPN with one NonLocal2d in res4, right before its last residual block.

    Wang et al., Non-local Neural Networks, CVPR 2018, §6: embedded Gaussian, after layer3.21
    (block 22 of 23); He et al., Mask R-CNN, ICCV 2017 on ResNet-101-FPN.

    Published COCO val2017 box/mask AP: 40.8/37.1 (baseline 39.5/36.0; the paper's Table 5).
    """
    return create_model("nl_maskrcnn_r101_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 50},
)
def faster_rcnn_r50_fpn(**overrides: Any) -> nn.Module:
    """Faster R-CNN R50-FPN baseline.

    Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks,
    NeurIPS 2015, on a ResNet-50-FPN (torchvision's keys; torchvision's
    fasterrcnn_resnet50_fpn), FrozenBN, stem and res2 frozen. The baseline of the GC and NL
    Faster R-CNNs (the papers report Mask R-CNN only).
    """
    return create_model("faster_rcnn_r50_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 50, "blocks": "gc", "gc_ratio": 1 / 16},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_faster_rcnn_r50_fpn(**overrides: Any) -> nn.Module:
    """Faster R-CNN R50-FPN with a GlobalContext block (r = 1/16) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; Ren et al.,
    Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks, NeurIPS 2015
    on ResNet-50-FPN. The papers report Mask R-CNN only.
    """
    return create_model("gc_faster_rcnn_r50_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 50, "blocks": "gc", "gc_ratio": 1 / 4},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_faster_rcnn_r50_fpn_r4(**overrides: Any) -> nn.Module:
    """Faster R-CNN R50-FPN with a GlobalContext block (r = 1/4) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; Ren et al.,
    Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks, NeurIPS 2015
    on ResNet-50-FPN. The papers report Mask R-CNN only.
    """
    return create_model("gc_faster_rcnn_r50_fpn_r4", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 50, "blocks": "nl"},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_faster_rcnn_r50_fpn(**overrides: Any) -> nn.Module:
    """Faster R-CNN R50-FPN with one NonLocal2d in res4, right before its last residual block.

    Wang et al., Non-local Neural Networks, CVPR 2018, §6: embedded Gaussian, after layer3.4
    (block 5 of 6); Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region
    Proposal Networks, NeurIPS 2015 on ResNet-50-FPN. The papers report Mask R-CNN only.
    """
    return create_model("nl_faster_rcnn_r50_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 101},
)
def faster_rcnn_r101_fpn(**overrides: Any) -> nn.Module:
    """Faster R-CNN R101-FPN baseline.

    Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks,
    NeurIPS 2015, on a ResNet-101-FPN (torchvision's keys), FrozenBN, stem and res2 frozen. The
    baseline of the GC and NL Faster R-CNNs (the papers report Mask R-CNN only).
    """
    return create_model("faster_rcnn_r101_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 101, "blocks": "gc", "gc_ratio": 1 / 16},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_faster_rcnn_r101_fpn(**overrides: Any) -> nn.Module:
    """Faster R-CNN R101-FPN with a GlobalContext block (r = 1/16) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; Ren et al.,
    Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks, NeurIPS 2015
    on ResNet-101-FPN. The papers report Mask R-CNN only.
    """
    return create_model("gc_faster_rcnn_r101_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 101, "blocks": "gc", "gc_ratio": 1 / 4},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_faster_rcnn_r101_fpn_r4(**overrides: Any) -> nn.Module:
    """Faster R-CNN R101-FPN with a GlobalContext block (r = 1/4) in every bottleneck of c3-c5.

    Cao et al., GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, ICCVW
    2019. Add fusion, attention pooling, after bn3 and before the residual addition; Ren et al.,
    Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks, NeurIPS 2015
    on ResNet-101-FPN. The papers report Mask R-CNN only.
    """
    return create_model("gc_faster_rcnn_r101_fpn_r4", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={"arch": "faster_rcnn", "depth": 101, "blocks": "nl"},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_faster_rcnn_r101_fpn(**overrides: Any) -> nn.Module:
    """Faster R-CNN R101-FPN with one NonLocal2d in res4, right before its last residual block.

    Wang et al., Non-local Neural Networks, CVPR 2018, §6: embedded Gaussian, after layer3.21
    (block 22 of 23); Ren et al., Faster R-CNN: Towards Real-Time Object Detection with Region
    Proposal Networks, NeurIPS 2015 on ResNet-101-FPN. The papers report Mask R-CNN only.
    """
    return create_model("nl_faster_rcnn_r101_fpn", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={**_TINY_DETECTION, "arch": "mask_rcnn"},
)
def maskrcnn_tiny(**overrides: Any) -> nn.Module:
    """Tiny Mask R-CNN for tests and demos only: basic-block ResNet (widths 8-64), 32-channel FPN.

    3 classes (background and the two of the built-in detection set), 128x160 images, BN trained
    from scratch.
    """
    return create_model("maskrcnn_tiny", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={**_TINY_DETECTION, "arch": "mask_rcnn", "blocks": "gc", "gc_ratio": 1 / 4},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_maskrcnn_tiny(**overrides: Any) -> nn.Module:
    """Tiny GC Mask R-CNN for tests and demos only: maskrcnn_tiny with GlobalContext in c3-c5.

    r = 1/4 (16 and 32 channels at 1/16 would leave 1 and 2), attention pooling, add fusion,
    before the residual addition of every block of layer2..layer4.
    """
    return create_model("gc_maskrcnn_tiny", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={**_TINY_DETECTION, "arch": "mask_rcnn", "blocks": "nl"},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_maskrcnn_tiny(**overrides: Any) -> nn.Module:
    """Tiny NL Mask R-CNN for tests and demos only: maskrcnn_tiny with one NonLocal2d in res4.

    Embedded Gaussian, after layer3.0, right before the last residual block of res4.
    """
    return create_model("nl_maskrcnn_tiny", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={**_TINY_DETECTION, "arch": "faster_rcnn"},
)
def faster_rcnn_tiny(**overrides: Any) -> nn.Module:
    """Tiny Faster R-CNN for tests and demos only: basic-block ResNet (widths 8-64), 32-channel FPN.

    3 classes (background and the two of the built-in detection set), 128x160 images, BN trained
    from scratch.
    """
    return create_model("faster_rcnn_tiny", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={**_TINY_DETECTION, "arch": "faster_rcnn", "blocks": "gc", "gc_ratio": 1 / 4},
    block_key="gc_kwargs",
    shortcuts=GC_OPTIONS,
)
def gc_faster_rcnn_tiny(**overrides: Any) -> nn.Module:
    """Tiny GC Faster R-CNN for tests and demos only: faster_rcnn_tiny with GlobalContext in c3-c5.

    r = 1/4 (16 and 32 channels at 1/16 would leave 1 and 2), attention pooling, add fusion,
    before the residual addition of every block of layer2..layer4.
    """
    return create_model("gc_faster_rcnn_tiny", **overrides)


@register_model(
    task="detection",
    builder=create_detection_model,
    defaults={**_TINY_DETECTION, "arch": "faster_rcnn", "blocks": "nl"},
    block_key="nonlocal_kwargs",
    shortcuts=NL_OPTIONS,
)
def nl_faster_rcnn_tiny(**overrides: Any) -> nn.Module:
    """Tiny NL Faster R-CNN for tests and demos only: faster_rcnn_tiny with one NonLocal2d in res4.

    Embedded Gaussian, after layer3.0, right before the last residual block of res4.
    """
    return create_model("nl_faster_rcnn_tiny", **overrides)
