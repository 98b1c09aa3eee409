"""Other implementations of the blocks, for ``bench_peers.py``: benchmark code, not the library.

* :mod:`peers.adapters`: every peer (installed package or stand-in): how to build it for a row,
  which options of our block compute the same function, and the weight map from our block to it.
* Stand-ins for code that is not installable as a package, each a faithful re-implementation of
  the forward pass it names (source file and commit in its header): :mod:`peers.alexhex7`
  (AlexHex7/Non-local_pytorch), :mod:`peers.slowfast` (facebookresearch/SlowFast
  ``nonlocal_helper.py``), :mod:`peers.ann` (MendelXu/ANN ``apnb.py``).
"""
