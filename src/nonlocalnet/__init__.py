"""nonlocalnet: non-local neural networks (NL, GCNet, ANN), fast and exact.

The block library (this package's top level) depends on torch alone.
"""

from nonlocalnet import functional
from nonlocalnet.analysis import QueryIndependence, query_independence
from nonlocalnet.asymmetric import AFNB, APNB, PyramidPooling
from nonlocalnet.global_context import GlobalContext, SimplifiedNonLocal, SqueezeExcite
from nonlocalnet.nonlocal_block import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalNd
from nonlocalnet.registry import create_block, list_blocks, register_block, resolve_block

__version__ = "0.1.0"

__all__ = [
    "AFNB",
    "APNB",
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
