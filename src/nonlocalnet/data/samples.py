"""Batches of sample dicts, and the skip-log-count policy for unreadable samples.

Every dataset of :mod:`nonlocalnet.data` reads a sample when it is asked for (in a DataLoader
worker); a sample that cannot be read (a corrupt video or image, a mask of another size, labels
outside the classes) is logged with its path and:

- in training, replaced by the next entry (``(index + 1) % len``, then the next...), so the batch
  stays full: the sample dict says how many entries it skipped (``"skipped"``) and which
  (``"unreadable"`` paths, ``"unreadable_index"`` dataset indices);
- in testing, not replaced (that would change the metric): the sample comes back with its input
  set to None and :func:`collate_samples` drops it from the batch, listing it in
  ``batch["unreadable"]``.

:class:`SkipTracker` counts the distinct unreadable entries over batches (an entry read again in
a later epoch counts once) and stops a run when more than ``max_skip_fraction`` of the entries
read could not be read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = [
    "INPUT_KEYS",
    "SkipTracker",
    "check_skip_fraction",
    "collate_samples",
    "read_or_skip",
    "unreadable_lists",
]

logger = logging.getLogger(__name__)

#: the keys holding a sample's input; None marks a test sample that could not be read.
INPUT_KEYS = ("video", "image")

_LISTS = ("unreadable", "unreadable_index")


def read_or_skip(
    index: int,
    num_entries: int,
    read: Callable[[int], dict[str, Any]],
    path_of: Callable[[int], str],
    *,
    train: bool,
    input_key: str,
    errors: tuple[type[BaseException], ...] = (OSError, ValueError),
    max_attempts: int = 10,
    what: str = "samples",
) -> dict[str, Any]:
    """``read(index)``, or the policy of the module docstring when it raises one of ``errors``.

    Args:
        index: the entry asked for.
        num_entries: the dataset's length.
        read: reads entry ``j`` into a sample dict (raises one of ``errors`` when it cannot).
        path_of: the path of entry ``j``, for the log and the batch.
        train: replace unreadable entries (training) or return a placeholder (testing).
        input_key: the sample's input key, set to None in the placeholder.
        errors: what counts as an unreadable entry.
        max_attempts: consecutive unreadable entries tolerated in training.
        what: the entries' name in the message (``"videos"``, ``"images"``).

    Raises:
        RuntimeError: ``max_attempts`` consecutive entries were unreadable.
    """
    unreadable: list[str] = []
    failed: list[int] = []
    for attempt in range(max_attempts):
        j = (index + attempt) % num_entries
        try:
            sample = read(j)
        except errors as err:
            logger.warning("unreadable sample skipped: %s (%s)", path_of(j), err)
            unreadable.append(path_of(j))
            failed.append(j)
            if not train:
                return {input_key: None, "index": index, "path": path_of(j), "skipped": 1,
                        "unreadable": unreadable, "unreadable_index": failed}  # fmt: skip
            continue
        sample.update(skipped=attempt, unreadable=unreadable, unreadable_index=failed)
        return sample
    raise RuntimeError(
        f"{max_attempts} consecutive unreadable {what} starting at index {index} "
        f"({unreadable[0]} ... {unreadable[-1]}); check the data"
    )


def unreadable_lists(samples: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every sample's ``"unreadable"`` paths and ``"unreadable_index"`` indices, concatenated:
    what a batch carries to :class:`SkipTracker` (both keys always present)."""
    return {k: [x for s in samples for x in s.get(k, [])] for k in _LISTS}


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset dicts (video, image or segmentation): tensors and ints stacked, strings
    kept as lists.

    Samples whose input (``"video"`` or ``"image"``) is None (unreadable in test mode) are
    dropped; every sample's ``"unreadable"`` paths and ``"unreadable_index"`` indices are
    concatenated into the batch's (always present). When no sample is readable the batch has an
    input of batch size 0 (``shape (0,)``) and empty ``label``/``index``/``path``; callers skip
    such batches.
    """
    lists = unreadable_lists(samples)
    kept = [
        {k: v for k, v in s.items() if k not in _LISTS}
        for s in samples
        if not any(k in s and s[k] is None for k in INPUT_KEYS)
    ]
    if kept:
        batch = default_collate(kept)
    else:
        key = next((k for k in INPUT_KEYS if k in samples[0]), "video") if samples else "video"
        empty = torch.zeros(0, dtype=torch.long)
        batch = {key: torch.zeros(0), "label": empty, "index": empty, "path": [], "skipped": empty}
    batch.update(lists)
    return batch


def check_skip_fraction(num_skipped: int, num_total: int, max_skip_fraction: float) -> None:
    """Raise when more than ``max_skip_fraction`` of ``num_total`` entries were unreadable.

    Raises:
        RuntimeError: naming the counts and the threshold.
    """
    if num_total > 0 and num_skipped / num_total > max_skip_fraction:
        raise RuntimeError(
            f"{num_skipped} of {num_total} samples ({100 * num_skipped / num_total:.1f}%) could "
            f"not be read, more than max_skip_fraction={max_skip_fraction}; check the data "
            "(unreadable paths are logged as warnings)"
        )


class SkipTracker:
    """Count unreadable entries over batches and fail past a fraction.

    Feed it every collated batch (from any number of workers): ``tracker.update(batch)``.

    With ``num_entries`` (the dataset's length) it counts distinct entries: a bitmap of the
    entries read and one of those that failed, from the batches' ``"index"`` and
    ``"unreadable_index"``; the fraction is ``failed entries / entries read``. Replacements that a
    batch reports (``"skipped"``) without naming them count as reads of their own. Without
    ``num_entries`` it counts reads: a batch's unreadable reads are the larger of its listed
    ``"unreadable"`` paths and the sum of its ``"skipped"``. Under DDP each process counts its own
    batches; :meth:`state` / :meth:`counts` combine over processes.

    Args:
        max_skip_fraction: the largest tolerated fraction of unreadable entries.
        min_reads: do not fail before this many reads (a few bad files early on are not a trend).
        num_entries: the dataset's length, to count distinct entries.
    """

    def __init__(
        self,
        max_skip_fraction: float = 0.05,
        *,
        min_reads: int = 0,
        num_entries: int | None = None,
    ) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.max_skip_fraction = max_skip_fraction
        self.min_reads = min_reads
        self.num_entries = num_entries
        self.read = torch.zeros(num_entries or 0, dtype=torch.uint8)  # (num_entries,)
        self.failed = torch.zeros(num_entries or 0, dtype=torch.uint8)  # (num_entries,)
        self.anonymous = torch.zeros(2, dtype=torch.float64)  # (skipped, loaded) without indices
        self.unreadable: list[str] = []

    def update(self, batch: dict[str, Any], *, check: bool = True) -> None:
        """Add one collated batch's counts; then :meth:`check` unless ``check=False``."""
        listed = list(batch.get("unreadable") or [])
        replaced = int(torch.as_tensor(batch["skipped"]).sum()) if "skipped" in batch else 0
        self.unreadable += listed
        targets = next((batch[k] for k in ("label", "mask", "index") if k in batch), ())
        loaded = len(targets)
        index = batch.get("index")
        failed = torch.as_tensor(batch.get("unreadable_index") or [], dtype=torch.long)
        named = (
            self.num_entries
            and isinstance(index, torch.Tensor)
            and len(index) == loaded
            and all(self._in_range(t) for t in (index, failed))
        )
        if named:
            self.read[index.long()] = 1
            self.read[failed] = 1
            self.failed[failed] = 1
            unnamed = max(replaced, len(listed)) - len(failed)
            self.anonymous += torch.tensor([max(unnamed, 0), max(unnamed, 0)], dtype=torch.float64)
        else:
            skipped = max(len(listed), replaced)
            self.anonymous += torch.tensor([skipped, skipped + loaded], dtype=torch.float64)
        if check:
            self.check()

    def _in_range(self, index: torch.Tensor) -> bool:
        """Every entry index within the dataset (a user's dataset may number otherwise)."""
        return not len(index) or (int(index.min()) >= 0 and int(index.max()) < self.num_entries)

    def state(self) -> list[torch.Tensor]:
        """The tensors to combine over processes: bitmaps (max) and anonymous counts (sum)."""
        return [self.read, self.failed, self.anonymous]

    @staticmethod
    def counts_of(
        read: torch.Tensor, failed: torch.Tensor, anonymous: torch.Tensor
    ) -> tuple[int, int]:
        """``(unreadable, read)`` entries from (possibly combined) :meth:`state` tensors."""
        skipped = int(failed.sum()) + int(anonymous[0])
        total = int(read.sum()) + int(anonymous[1])
        return skipped, total

    def counts(self) -> tuple[int, int]:
        """``(unreadable, read)`` entries of this process."""
        return self.counts_of(*self.state())

    @property
    def num_skipped(self) -> int:
        return self.counts()[0]

    @property
    def num_reads(self) -> int:
        return self.counts()[1]

    def check(self) -> None:
        """Raise ``RuntimeError`` if the unreadable fraction is above the limit."""
        self.check_total(*self.counts())

    def check_total(self, num_skipped: int, num_reads: int) -> None:
        """:meth:`check` for counts gathered elsewhere (combined over processes)."""
        if num_reads >= self.min_reads:
            check_skip_fraction(num_skipped, num_reads, self.max_skip_fraction)

    def summary(self) -> str:
        """One line for the end-of-run report."""
        skipped, total = self.counts()
        if not skipped:
            return f"all {total} samples read"
        unique = sorted(set(self.unreadable))
        shown = ", ".join(unique[:5]) + (" ..." if len(unique) > 5 else "")
        return f"{skipped} unreadable samples skipped ({len(unique)} files: {shown}) out of {total}"
