"""Non-local block benchmark: fast vs reference, time and peak memory (``nonlocalnet bench``).

Usage::

    python benchmarks/bench_blocks.py [--quick] [--json PATH] [--plot PATH] [--suite nl|context|all]

Every option of ``nonlocalnet bench --help`` is accepted; the table is printed on stdout.
"""

from __future__ import annotations

import sys

from nonlocalnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
