"""Per-sample random generators shared by the datasets.

With a fixed ``seed``, sample ``index`` of epoch ``epoch`` draws from a generator seeded by
``(seed, epoch, index)``: the result does not depend on the number of DataLoader workers or on the
order in which samples are loaded. With ``seed=None``, each process draws from one generator seeded
from ``torch.initial_seed()``, which the DataLoader sets differently in each worker and each epoch
(``base_seed + worker_id``), so results are reproducible given ``torch.manual_seed`` and differ
across workers.
"""

from __future__ import annotations

import hashlib
import os

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SampleSeeder:
    """Generators for dataset samples (see the module docstring).

    Args:
        seed: fixed seed, or None to follow ``torch.initial_seed()`` per process.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.epoch = 0
        self._rng: torch.Generator | None = None
        self._key: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        """The generator to draw sample ``index``'s random choices from."""
        if self.seed is not None:
            return torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index))
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._key != key:
            # the pid only detects a new worker process; the seed depends on torch's seed alone
            self._rng = torch.Generator().manual_seed(mix_seed(key[1]))
            self._key = key
        return self._rng

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_rng"], state["_key"] = None, None  # a worker starts its own generator
        return state
