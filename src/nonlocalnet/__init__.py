"""nonlocalnet: non-local neural networks (NL, GCNet, ANN), fast and exact.

The block library (this package's top level) depends on torch alone.
"""

from nonlocalnet import functional
from nonlocalnet.analysis import QueryIndependence, query_independence
from nonlocalnet.layers import (
    AFNB,
    APNB,
    EMAU,
    CrissCrossAttention,
    DisentangledNonLocal1d,
    DisentangledNonLocal2d,
    DisentangledNonLocal3d,
    DisentangledNonLocalNd,
    EfficientAttention,
    GlobalContext,
    NonLocal1d,
    NonLocal2d,
    NonLocal3d,
    NonLocalNd,
    PyramidPooling,
    SimplifiedNonLocal,
    SqueezeExcite,
    create_block,
    list_blocks,
    register_block,
    resolve_block,
)

__version__ = "0.1.0"

__all__ = [
    "AFNB",
    "APNB",
    "EMAU",
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
    "QueryIndependence",
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "__version__",
    "create_block",
    "functional",
    "list_blocks",
    "query_independence",
    "register_block",
    "resolve_block",
]
