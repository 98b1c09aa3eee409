"""nonlocalnet: non-local neural networks (NL, GCNet, ANN), fast and exact.

The block library (this package's top level) depends on torch alone.
"""

from nonlocalnet import functional
from nonlocalnet.asymmetric import AFNB, APNB, PyramidPooling
from nonlocalnet.global_context import GlobalContext, SimplifiedNonLocal, SqueezeExcite
from nonlocalnet.nonlocal_block import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalNd

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
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "__version__",
    "functional",
]
