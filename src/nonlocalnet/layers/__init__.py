"""Attention blocks, one module per family (as timm's ``layers/``), and the block factory.

* :mod:`~nonlocalnet.layers.nonlocal_block`: the non-local block (NL paper), all four pairwise
  functions;
* :mod:`~nonlocalnet.layers.global_context`: SNL, GC and SE (GCNet paper);
* :mod:`~nonlocalnet.layers.asymmetric`: the pyramid sampler, APNB and AFNB (ANN paper);
* the successors: :mod:`~nonlocalnet.layers.dnl` (disentangled non-local),
  :mod:`~nonlocalnet.layers.criss_cross` (CCNet), :mod:`~nonlocalnet.layers.ema` (EMANet),
  :mod:`~nonlocalnet.layers.efficient_attention` (efficient attention, also a pairwise form of
  the NL block);
* :mod:`~nonlocalnet.layers.registry`: ``create_block(name, channels, dims=...)``;
* :mod:`~nonlocalnet.layers.layout`: :class:`AttentionLayout`, what every attention block's
  ``layout(size)`` returns: how queries are folded and which input positions each key stands for.

Every block takes its channel count first and ``dims`` (1, 2 or 3) as a keyword; the layers
import only :mod:`nonlocalnet.functional`, the checks of :mod:`nonlocalnet._checks` and each other.
An input whose dtype or device differs from the parameters' is refused with one line naming the
block (autocast excepted). The forward passes trace with :mod:`torch.fx`
(``torchvision.models.feature_extraction.create_feature_extractor``), export to ONNX and compile
with ``fullgraph=True``.
"""

from nonlocalnet.layers.asymmetric import AFNB, APNB, PyramidPooling
from nonlocalnet.layers.criss_cross import CrissCrossAttention
from nonlocalnet.layers.dnl import (
    DisentangledNonLocal1d,
    DisentangledNonLocal2d,
    DisentangledNonLocal3d,
    DisentangledNonLocalNd,
)
from nonlocalnet.layers.efficient_attention import EfficientAttention
from nonlocalnet.layers.ema import EMAU
from nonlocalnet.layers.global_context import GlobalContext, SimplifiedNonLocal, SqueezeExcite
from nonlocalnet.layers.layout import AttentionLayout
from nonlocalnet.layers.nonlocal_block import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalNd
from nonlocalnet.layers.registry import create_block, list_blocks, register_block, resolve_block

__all__ = [
    "AFNB",
    "APNB",
    "EMAU",
    "AttentionLayout",
    "CrissCrossAttention",
    "DisentangledNonLocal1d",
    "DisentangledNonLocal2d",
    "DisentangledNonLocal3d",
    "DisentangledNonLocalNd",
    "EfficientAttention",
    "GlobalContext",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "NonLocalNd",
    "PyramidPooling",
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "create_block",
    "list_blocks",
    "register_block",
    "resolve_block",
]
