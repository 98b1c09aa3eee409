"""How an attention block lays its input out as queries and keys.

Every attention block of the library (NL, SNL, GC, APNB, AFNB) answers ``block.layout(size)``
(AFNB: ``block.layout(low_size, high_size)``) with an :class:`AttentionLayout`, and its own
forward pass folds its maps into tokens through that same object, so what the layout says is what
the block computes. The layout tells:

* how the query map is folded: ``extent="space"`` of the NL block puts the T frames into the
  batch (B' = B·T, N = H·W), ``extent="time"`` the H·W pixels (B' = B·H·W, N = T); every other
  block keeps B' = B and N = all positions. :meth:`AttentionLayout.locate` maps a query position
  to its ``(fold, query index)``, the indices of ``attention_map(...)[fold, index]``;
* which input positions each key stands for (:meth:`AttentionLayout.key_cells`), as sparse
  ``(key_index, position_index, share)`` triplets with share = 1 / (positions of the key's cell):

  - ``"pairwise"`` (NL): key j is one position, or, with sub-sampling, the max-pooling window of
    2 (1d), 2×2 (2d) or 1×2×2 (3d) it reads; a position at coordinate c lies in cell c // 2 along
    each pooled axis. On odd sizes the windows round up by default (``rounding="ceil"``,
    ``ceil_mode``: the last window is partial, every position feeds a key); with
    ``rounding="floor"`` (the peers' pooling) the last odd row/column feeds no key;
  - ``"query_independent"`` (SNL, GC): one softmax over all positions, key j is position j;
  - ``"pyramid"`` (APNB, AFNB): the keys are adaptive average poolings at each bin, concatenated
    in order; cell i of b along an axis of n positions covers [⌊i·n/b⌋, ⌈(i+1)·n/b⌉), as
    ``adaptive_avg_pool`` reads it, so cells of one bin overlap when b does not divide n.

Sizes may be symbolic: ``torch.SymInt`` under ``torch.compile``, ``torch.fx.Proxy`` under
``torch.fx`` symbolic tracing (the folding then traces to reshapes and permutes, and the checks
of concrete sizes stand aside). :func:`spatial_size` reads them from a tensor either way.

This module depends on torch and :mod:`nonlocalnet._checks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor

from nonlocalnet._checks import check_choice, is_tracing

__all__ = ["KINDS", "ROUNDINGS", "AttentionLayout", "spatial_size"]

#: what the keys of a block are: positions (or max-pooled cells) of the query map, one map shared
#: by every query, or the cells of a pooling pyramid.
KINDS = ("pairwise", "query_independent", "pyramid", "bases")
#: how max-pooled keys round on odd sizes: ``"ceil"`` keeps the last, partial window; ``"floor"``
#: drops it.
ROUNDINGS = ("ceil", "floor")


def spatial_size(t: Tensor, dims: int) -> tuple[int, ...]:
    """The ``dims`` sizes after (B, C) of ``t``, axis by axis.

    Equal to ``tuple(t.shape[2:])``; read one axis at a time so that under ``torch.fx``
    symbolic tracing (where ``t.shape`` is a proxy that cannot be iterated) each size is a
    proxy of its own.
    """
    return tuple(t.shape[2 + d] for d in range(dims))


def _check_size(name: str, size: Sequence[int], dims: int | None = None) -> tuple[int, ...]:
    size = tuple(size)
    if dims is not None and len(size) != dims:
        raise ValueError(f"AttentionLayout: {name} must have {dims} dims, got {size}")
    for n in size:
        if isinstance(n, torch.fx.Proxy):  # fx symbolic tracing: not known yet
            continue
        if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1:
            raise ValueError(f"AttentionLayout: {name} must be positive ints, got {size}")
    return size


def _prod(values: Sequence[int]) -> int:
    """Product of sizes; a loop, so that symbolic sizes of ``torch.compile`` trace through."""
    out = 1
    for v in values:
        out = out * v
    return out


def _grid_coords(size: Sequence[int]) -> Tensor:
    """``(P, D)`` integer coordinates of every position of a grid, row major."""
    flat = torch.arange(math.prod(size))
    return torch.stack(torch.unravel_index(flat, tuple(size)), dim=1)  # (P, D)


def _ravel(coords: Tensor, size: Sequence[int]) -> Tensor:
    """Row-major flat index of ``(P, D)`` coordinates on a grid of ``size``."""
    flat = torch.zeros(coords.shape[0], dtype=torch.long)
    for d, n in enumerate(size):
        flat = flat * n + coords[:, d]
    return flat


@dataclass(frozen=True)
class AttentionLayout:
    """Queries and keys of one attention block for given input sizes.

    Build it with :meth:`pairwise`, :meth:`query_independent`, :meth:`pyramid` or :meth:`bases`
    (the blocks' ``layout`` methods do).

    Attributes:
        kind: one of :data:`KINDS`.
        size: the query map's spatial size ``S`` (AFNB: the high-level map's).
        key_size: spatial size of the map the keys are drawn from (AFNB: the low-level map's;
            ``size`` otherwise).
        fold_dims: axes of ``size`` folded into the batch (``(0,)`` for NL ``extent="space"``,
            ``(1, 2)`` for ``extent="time"``, ``()`` otherwise).
        window: max-pooling window (= stride) of the keys along each axis of ``key_size``; 1 where
            the keys are not pooled. Unused by the pyramid.
        bins: for the pyramid, the output size of each adaptive pooling, in order.
        rounding: one of :data:`ROUNDINGS`, how the pooled key grid rounds on sizes that the
            window does not divide: ``"ceil"`` (the last window is partial) or ``"floor"`` (the
            positions past the last full window feed no key).
        num_bases: for ``"bases"`` (EMA), the K bases its ``attention_map`` rows run over.
    """

    kind: str
    size: tuple[int, ...]
    key_size: tuple[int, ...]
    fold_dims: tuple[int, ...] = ()
    window: tuple[int, ...] = ()
    bins: tuple[tuple[int, ...], ...] = ()
    rounding: str = "ceil"
    num_bases: int = 0

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def pairwise(
        cls,
        size: Sequence[int],
        *,
        window: Sequence[int] | None = None,
        fold_dims: Sequence[int] = (),
        rounding: str = "ceil",
    ) -> AttentionLayout:
        """NL: queries and keys on one map; keys max-pooled by ``window``.

        Args:
            size: the input's spatial size.
            window: pooling window per axis (all 1, no pooling, when omitted).
            fold_dims: axes folded into the batch; their keys are those of the query's own
                (pooled) coordinate along them. With ``rounding="floor"`` a query past the last
                full window of a folded axis reads the last cell, the nearest.
            rounding: ``"ceil"`` or ``"floor"`` (see :data:`ROUNDINGS`).

        Raises:
            ValueError: bad sizes or axes, or floor rounding on an axis shorter than its window
                (no key would be left).
        """
        size = _check_size("size", size)
        window = (1,) * len(size) if window is None else tuple(window)
        _check_size("window", window, len(size))
        check_choice("rounding", rounding, ROUNDINGS, owner="AttentionLayout")
        if rounding == "floor":
            for d, (n, w) in enumerate(zip(size, window, strict=True)):
                if not isinstance(n, torch.fx.Proxy) and n < w:
                    raise ValueError(
                        f"AttentionLayout: floor rounding needs at least {w} positions along "
                        f"pooled axis {d}, got size {size}"
                    )
        fold_dims = tuple(fold_dims)
        if sorted(set(fold_dims)) != list(fold_dims) or any(
            not 0 <= d < len(size) for d in fold_dims
        ):
            raise ValueError(
                f"AttentionLayout: fold_dims must be increasing axes of a {len(size)}-d map, "
                f"got {fold_dims}"
            )
        return cls("pairwise", size, size, fold_dims, window, rounding=rounding)

    @classmethod
    def query_independent(cls, size: Sequence[int]) -> AttentionLayout:
        """SNL, GC: one row over all positions, shared by every query."""
        size = _check_size("size", size)
        return cls("query_independent", size, size, (), (1,) * len(size))

    @classmethod
    def pyramid(
        cls, size: Sequence[int], key_size: Sequence[int], bins: Sequence[Sequence[int]]
    ) -> AttentionLayout:
        """APNB, AFNB: keys are adaptive average poolings of the key map to each of ``bins``.

        Args:
            size: the query map's spatial size.
            key_size: the key map's spatial size.
            bins: the output size of each pooling (one entry per axis of ``key_size``).
        """
        size = _check_size("size", size)
        key_size = _check_size("key_size", key_size, len(size))
        bins = tuple(_check_size("each bin", b, len(key_size)) for b in bins)
        if not bins:
            raise ValueError("AttentionLayout: a pyramid needs at least one bin")
        return cls("pyramid", size, key_size, (), (1,) * len(size), bins)

    @classmethod
    def bases(cls, size: Sequence[int], num_bases: int) -> AttentionLayout:
        """EMA: each query attends to K bases, which are themselves weighted sums of positions.

        ``attention_map(x, queries)`` rows run over the ``num_bases`` bases;
        ``attention_map(x, queries, over="positions")`` gives each query's weights over the
        positions through the bases, whose keys are the positions (:meth:`key_cells`: one per
        position, as for an unpooled pairwise block).
        """
        size = _check_size("size", size)
        if isinstance(num_bases, bool) or not isinstance(num_bases, int) or num_bases < 1:
            raise ValueError(
                f"AttentionLayout: num_bases must be a positive int, got {num_bases!r}"
            )
        return cls("bases", size, size, (), (1,) * len(size), num_bases=num_bases)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AttentionLayout: kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.window) != len(self.key_size):
            raise ValueError(
                f"AttentionLayout: window must have one entry per axis of key_size "
                f"{self.key_size}, got {self.window}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"AttentionLayout: rounding must be one of {ROUNDINGS}, got {self.rounding!r}"
            )
        if (self.kind == "pyramid") != bool(self.bins):
            raise ValueError(
                f"AttentionLayout: bins are given exactly for the pyramid, got kind "
                f"{self.kind!r} with bins {self.bins}"
            )

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def query_dims(self) -> tuple[int, ...]:
        """Axes of ``size`` that index the queries of one fold (those not folded)."""
        return tuple(d for d in range(len(self.size)) if d not in self.fold_dims)

    @property
    def folds(self) -> int:
        """Query folds per sample, B'/B."""
        return _prod([self.size[d] for d in self.fold_dims])

    @property
    def num_queries(self) -> int:
        """Queries per fold, N."""
        return _prod([self.size[d] for d in self.query_dims])

    @property
    def key_grid(self) -> tuple[int, ...]:
        """Size of the (pooled) key map of the pairwise and query-independent kinds."""
        if self.kind == "pyramid":
            raise ValueError("AttentionLayout: a pyramid has no key grid; see bins")
        pairs = zip(self.key_size, self.window, strict=True)
        if self.rounding == "floor":
            return tuple(n // w for n, w in pairs)
        return tuple(-(-n // w) for n, w in pairs)

    @property
    def num_keys(self) -> int:
        """Keys per fold, M."""
        if self.kind == "pyramid":
            return sum(_prod(b) for b in self.bins)
        grid = self.key_grid
        return _prod([grid[d] for d in self.query_dims])

    # -- positions ------------------------------------------------------------------------------

    def locate(self, positions: Sequence[Sequence[int]] | Tensor) -> tuple[Tensor, Tensor]:
        """``(fold, query index)`` of query positions: the row ``attention_map(...)[fold, index]``.

        Args:
            positions: ``(P, D)`` coordinates on the query map, e.g. (t, h, w).

        Returns:
            Two ``(P,)`` long tensors.

        Raises:
            ValueError: a position of the wrong length or outside the map.
        """
        coords = torch.as_tensor(positions, dtype=torch.long).reshape(-1, len(self.size))
        if coords.numel() and bool(
            ((coords < 0) | (coords >= torch.tensor(self.size))).any(dim=1).any()
        ):
            raise ValueError(
                f"AttentionLayout.locate: positions must lie in a map of size {self.size}, "
                f"got {coords.tolist()}"
            )
        fold = _ravel(coords[:, list(self.fold_dims)], [self.size[d] for d in self.fold_dims])
        index = _ravel(coords[:, list(self.query_dims)], [self.size[d] for d in self.query_dims])
        return fold, index

    def key_cells(self, fold: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Which positions of the key map each key of ``fold`` stands for.

        Args:
            fold: the query fold (see :meth:`locate`).

        Returns:
            ``(key_index, position_index, share)``, each ``(P,)``: key j in [0, M) stands for the
            row-major position of ``key_size`` with weight ``share`` = 1 / (positions in its
            cell); the shares of each key sum to 1. With floor rounding the positions past the
            last full window are in no cell, so they are not listed.

        Raises:
            ValueError: ``fold`` outside [0, B'/B).
        """
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < self.folds:
            raise ValueError(
                f"AttentionLayout.key_cells: fold must be an int in [0, {self.folds}), got {fold!r}"
            )
        if self.kind == "pyramid":
            return self._pyramid_cells()
        coords = _grid_coords(self.key_size)  # (P, D)
        cell = coords // torch.tensor(self.window)  # (P, D): the pooled key coordinate
        grid = self.key_grid
        fd, qd = list(self.fold_dims), list(self.query_dims)
        position = torch.arange(coords.shape[0])
        keep = (cell < torch.tensor(grid)).all(1)  # floor rounding: the last odd row feeds none
        if fd:
            fold_at = torch.stack(
                torch.unravel_index(torch.tensor(fold), [self.size[d] for d in fd])
            )  # (len(fd),)
            own_cell = torch.minimum(
                fold_at // torch.tensor([self.window[d] for d in fd]),
                torch.tensor([grid[d] - 1 for d in fd]),
            )  # (len(fd),): the cell the fold reads, the last one past the last full window
            keep &= (cell[:, fd] == own_cell).all(1)
        cell, position = cell[keep], position[keep]
        key = _ravel(cell[:, qd], [grid[d] for d in qd])
        count = torch.bincount(key, minlength=self.num_keys).to(torch.float64)
        return key, position, 1.0 / count[key]

    def _pyramid_cells(self) -> tuple[Tensor, Tensor, Tensor]:
        keys, positions, shares = [], [], []
        offset = 0
        for out_size in self.bins:
            spans = [
                [(i * n // b, -(-(i + 1) * n // b)) for i in range(b)]
                for n, b in zip(self.key_size, out_size, strict=True)
            ]
            for cell_id, cell in enumerate(_grid_coords(out_size).tolist()):
                bounds = [spans[d][c] for d, c in enumerate(cell)]
                members = _grid_coords([hi - lo for lo, hi in bounds]) + torch.tensor(
                    [lo for lo, _ in bounds]
                )  # (P_cell, D)
                flat = _ravel(members, self.key_size)
                keys.append(torch.full_like(flat, offset + cell_id))
                positions.append(flat)
                shares.append(torch.full((flat.numel(),), 1.0 / flat.numel(), dtype=torch.float64))
            offset += math.prod(out_size)
        return torch.cat(keys), torch.cat(positions), torch.cat(shares)

    # -- tokens ---------------------------------------------------------------------------------

    def _to_tokens(self, t: Tensor) -> Tensor:
        b, c = t.shape[0], t.shape[1]
        if not self.fold_dims:
            return t.flatten(2).transpose(1, 2)  # (B, N, C)
        fd, qd = self.fold_dims, self.query_dims
        n = _prod([t.shape[2 + d] for d in qd])
        t = t.permute(0, *(2 + d for d in fd), *(2 + d for d in qd), 1)  # (B, *S_fold, *S_q, C)
        return t.reshape(b * self.folds, n, c)  # (B', N, C)

    def fold(self, t: Tensor) -> Tensor:
        """Lay a ``(B, C, *size)`` map out as ``(B', N, C)`` tokens, as the queries are folded.

        Row ``index`` of fold ``f`` of sample ``b`` is token ``[b·B'/B + f, index]`` (see
        :meth:`locate`).

        Raises:
            ValueError: ``t`` does not have the query map's size.
        """
        if not is_tracing(t) and tuple(t.shape[2:]) != self.size:
            raise ValueError(
                f"AttentionLayout.fold: expected a (B, C, *{self.size}) map, got {tuple(t.shape)}"
            )
        return self._to_tokens(t)

    def fold_keys(self, t: Tensor) -> Tensor:
        """Lay the key (or value) map out as ``(B', M, C)`` tokens, M keys per query fold.

        Pairwise and query-independent kinds: ``t`` is the pooled key map ``(B, C, *key_grid)``;
        along a folded axis that is pooled each query reads its own cell (floor rounding: the
        last cell past the last full window), so the map is expanded back to the query's size
        there first. Pyramid: ``t`` is the ``(B, C, M)`` sampled map.

        Raises:
            ValueError: ``t`` does not have the key map's size.
        """
        tracing = is_tracing(t)
        if self.kind == "pyramid":
            if not tracing and (t.dim() != 3 or t.shape[2] != self.num_keys):
                raise ValueError(
                    f"AttentionLayout.fold_keys: expected (B, C, {self.num_keys}) pyramid "
                    f"samples, got {tuple(t.shape)}"
                )
            return t.transpose(1, 2)  # (B, M, C)
        grid = self.key_grid
        if not tracing and tuple(t.shape[2:]) != grid:
            raise ValueError(
                f"AttentionLayout.fold_keys: expected a (B, C, *{grid}) key map, "
                f"got {tuple(t.shape)}"
            )
        for d in self.fold_dims:
            if self.window[d] > 1:  # each folded position reads its own pooled cell
                cell = torch.arange(self.size[d], device=t.device) // self.window[d]
                cell = cell.clamp(max=grid[d] - 1)  # (S_d,): the nearest cell past the last
                t = t.index_select(2 + d, cell)  # (B, C, ..., S_d, ...)
        return self._to_tokens(t)

    def unfold(self, y: Tensor, batch: int) -> Tensor:
        """``(B', N, C)`` query tokens back to a ``(B, C, *size)`` map, undoing :meth:`fold`."""
        c = y.shape[-1]
        if not self.fold_dims:
            return y.transpose(1, 2).reshape(batch, c, *self.size)  # (B, C, *S)
        order = (*self.fold_dims, *self.query_dims)
        y = y.reshape(batch, *(self.size[d] for d in order), c)  # (B, *S_fold, *S_q, C)
        dims = len(self.size)
        return y.permute(0, 1 + dims, *(1 + order.index(d) for d in range(dims)))  # (B, C, *S)
