"""Step-indexed sampling: the data order is a pure function of (seed, step), so runs resume exactly.

The global sample stream is the concatenation of per-epoch permutations, epoch ``e`` being
``torch.randperm(N)`` drawn from a generator seeded with ``seed + e``. Step ``s`` of a run whose
global batch is ``B x world_size`` takes stream positions ``[s*B*W, (s+1)*B*W)``; process ``r`` takes
the ``r``-th contiguous slice of ``B`` of them. So a 1-process run with batch ``2B`` sees, at each
step, exactly the samples of a 2-process run with batch ``B`` (a DistributedSampler-equivalent
sharding), and restarting at step ``s`` needs no iterator state.

Random augmentation is made a function of the stream position too: the sampler yields
``(index, sample_seed, epoch)`` triples and :class:`SeededDataset` seeds Python's, NumPy's and
torch's generators with ``sample_seed`` around each ``__getitem__`` (restoring them afterwards),
whatever worker process loads the sample, and calls ``set_epoch(epoch)`` first on datasets that
have it (``nonlocalnet.data.VideoDataset`` with ``seed`` draws clips from (seed, epoch, index)).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

try:
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is optional
    _np = None

__all__ = ["EvalBatchSampler", "SeededDataset", "StepBatchSampler", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of the stream (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK


class StepBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields, for steps ``start_step .. total_steps - 1``, this process's batch of
    ``(index, sample_seed, epoch)`` triples.

    Args:
        num_samples: dataset length N.
        batch_size: per-process batch B.
        seed: run seed; epoch ``e`` uses the permutation seeded with ``seed + e``.
        total_steps: the run's length.
        start_step: first step to yield (the resumed step).
        rank: this process's rank.
        world_size: number of processes.
        shuffle: False keeps the dataset order in every epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"sampler: expected a non-empty dataset, got {num_samples} samples")
        if batch_size <= 0:
            raise ValueError(f"sampler: expected a positive batch size, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: expected 0 <= rank < world_size, got {rank}, {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch``."""
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perms[epoch] = torch.randperm(self.num_samples, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.num_samples)
        return self._perms[epoch]

    def batch(self, step: int) -> list[tuple[int, int, int]]:
        """This process's ``(index, sample_seed, epoch)`` triples of step ``step``."""
        start = (step * self.world_size + self.rank) * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.num_samples)
            index = int(self.permutation(epoch)[offset])
            out.append((index, sample_seed(self.seed, position), epoch))
        return out

    def state_dict(self, step: int) -> dict[str, Any]:
        """Where the stream stands before ``step`` (stored in checkpoints, for inspection)."""
        position = step * self.world_size * self.batch_size
        epoch, offset = divmod(position, self.num_samples)
        return {
            "seed": self.seed,
            "step": step,
            "epoch": epoch,
            "offset": offset,
            "num_samples": self.num_samples,
            "global_batch": self.batch_size * self.world_size,
        }

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)


class SeededDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[(index, seed, epoch)]`` loads ``index`` under
    ``seed`` (after ``set_epoch(epoch)`` when the dataset has that method).

    Python's ``random``, NumPy's global generator and torch's CPU generator are seeded with
    ``seed`` for the call and restored afterwards, so augmentation is reproducible per sample and
    the caller's random streams are untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int, int]) -> Any:
        index, seed, epoch = item
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if get_worker_info() is not None:
            # A DataLoader worker: its generators serve nothing else, no need to restore them.
            _seed_all(seed)
            return self.dataset[index]
        py_state = random.getstate()
        np_state = _np.random.get_state() if _np is not None else None
        torch_state = torch.get_rng_state()
        try:
            _seed_all(seed)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            if _np is not None:
                _np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def _seed_all(seed: int) -> None:
    # torch.default_generator, not torch.manual_seed: the latter also (re)seeds every
    # accelerator and costs ~50x more per sample.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    if _np is not None:
        _np.random.seed(seed % (1 << 32))


class EvalBatchSampler(Sampler[list[int]]):
    """Shards ``range(N)`` over processes for evaluation, in order.

    The index list is padded (repeating its start) to a multiple of ``world_size`` as
    DistributedSampler does; process ``r`` takes every ``world_size``-th index from ``r``. The
    last :attr:`num_padded` indices of a shard are such repeats (at most one): scores are
    gathered by sample index, which merges them; sums over samples (a confusion matrix) leave
    them out (:meth:`real_count`).

    Attributes:
        indices: this process's dataset indices, in order.
        num_padded: how many of the last ``indices`` repeat an index of another shard.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        indices = list(range(num_samples))
        padded = -len(indices) % world_size
        indices += indices[:padded] if indices else []
        positions = range(rank, len(indices), world_size)  # positions of the padded list
        self.indices = [indices[p] for p in positions]
        self.num_padded = sum(p >= num_samples for p in positions)
        self.batch_size = batch_size

    def real_count(self, batch_number: int) -> int:
        """How many of the first indices of batch ``batch_number`` are real (not padding)."""
        start = batch_number * self.batch_size
        size = min(self.batch_size, len(self.indices) - start)
        return max(0, min(size, len(self.indices) - self.num_padded - start))

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)
