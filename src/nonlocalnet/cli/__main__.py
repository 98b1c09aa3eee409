"""``python -m nonlocalnet.cli``: the ``nonlocalnet`` command (used under ``torchrun -m``)."""

import sys

from nonlocalnet.cli import main

sys.exit(main())
