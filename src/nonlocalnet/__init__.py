"""nonlocalnet: non-local neural networks (NL, GCNet, ANN), fast and exact.

The block library (this package's top level) depends on torch alone.
"""

from nonlocalnet import functional
from nonlocalnet.nonlocal_block import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalNd

__version__ = "0.1.0"

__all__ = [
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "NonLocalNd",
    "__version__",
    "functional",
]
