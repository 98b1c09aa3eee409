"""GCNet's query-independence analysis (Cao et al., 2019, §3.1 and Table 1).

For pairs (i, j) of query positions of the same sample, the average cosine distance
1 − cos(a_i, a_j) of

* (a) the block's input features x_i,
* (b) its output before the residual addition / fusion (the ``residual`` branch), and
* (c) the attention maps (row i and row j of the normalised pairwise weights).

GCNet found (c) close to 0 in trained NL blocks while (a) is large: every query attends to almost
the same positions, which motivates a query-independent map (SNL, GC).

What "output" means, per block (each block's ``residual`` method):

* NonLocalNd: BN(W_z y), the branch added to x (W_z y when the block has no norm). With the usual
  zero-init (BN gamma = 0) it is 0 everywhere; pairs of identical vectors (0 and 0 included) have
  distance 0.
* SimplifiedNonLocal: W_v c; GlobalContext: the transform output (``transform_add`` when the block
  adds, else ``transform_mul`` before the sigmoid). Both are the same vector at every position,
  so their output distance is 0, as is their attention distance.
* APNB / AFNB: conv_out(context), before the concat fusion.

Query pairs are sampled, and only their rows of the attention map are computed (in chunks), so the
analysis runs on inputs whose full N×N map would not fit in memory. Maps of the dot-product and
concatenation forms are normalised to sum to 1 per row (cosine distance ignores positive scale;
the normalisation only fixes the sign of rows with a negative sum).

This module depends on torch alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QueryIndependence", "cosine_distance", "query_independence"]


@dataclass(frozen=True)
class QueryIndependence:
    """Average cosine distances over the sampled pairs of query positions.

    Attributes:
        input_distance: between input features x_i, x_j.
        output_distance: between outputs before the residual/fusion.
        attention_distance: between attention-map rows i and j.
        num_pairs: number of pairs averaged.
    """

    input_distance: float
    output_distance: float
    attention_distance: float
    num_pairs: int

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict."""
        return asdict(self)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 − cos(a, b) along the last dimension, in float64; 0 for identical vectors (zero too).

    Args:
        a: ``(..., D)``.
        b: ``(..., D)``.

    Returns:
        ``(...)`` distances in [0, 2].
    """
    a64, b64 = a.double(), b.double()
    d = 1.0 - F.cosine_similarity(a64, b64, dim=-1, eps=1e-12)
    return torch.where((a64 == b64).all(dim=-1), torch.zeros_like(d), d).clamp(0.0, 2.0)


@torch.no_grad()
def query_independence(
    block: nn.Module,
    x: Tensor | Sequence[Tensor],
    num_pairs: int = 1000,
    generator: torch.Generator | None = None,
    *,
    chunk_pairs: int = 128,
) -> QueryIndependence:
    """GCNet's analysis of how much a block's attention depends on the query.

    Args:
        block: a block with ``attention_map(*inputs, queries=...)``, ``residual(*inputs)`` and
            ``layout(*sizes)``: any NonLocalNd (all pairwise forms and extents),
            SimplifiedNonLocal, GlobalContext, APNB, or AFNB. Put it in the mode you want
            analysed (``eval()``).
        x: the block's input ``(B, C, *S)``, or a tuple of its inputs (AFNB: ``(low, high)``;
            the queries, and so the "input features", are those of the last one).
        num_pairs: number of query pairs (i ≠ j, same sample) to average over.
        generator: random generator for the sampling (reproducible results).
        chunk_pairs: pairs whose map rows are computed at once (memory: 2·chunk_pairs rows of
            M weights per sample).

    Returns:
        The three average distances.

    Raises:
        TypeError: the block has no ``attention_map``/``residual``/``layout``.
        ValueError: fewer than 2 query positions, or ``num_pairs``/``chunk_pairs`` < 1.
    """
    for attr in ("attention_map", "residual", "layout"):
        if not callable(getattr(block, attr, None)):
            raise TypeError(
                f"query_independence: the block must have an {attr}() method (NL, SNL, GC, "
                f"APNB, AFNB), got {type(block).__name__}"
            )
    for n, v in (("num_pairs", num_pairs), ("chunk_pairs", chunk_pairs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"query_independence: {n} must be a positive int, got {v!r}")
    inputs = (x,) if isinstance(x, Tensor) else tuple(x)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("query_independence: x must be a tensor or a sequence of tensors")

    layout = block.layout(*(t.shape[2:] for t in inputs))
    feats = layout.fold(inputs[-1])  # (B', N, C), as the attention map folds its queries
    folds, n = feats.shape[0], feats.shape[1]
    if n < 2:
        raise ValueError(
            f"query_independence: needs at least 2 query positions per sample, got N={n} "
            f"(input shape {tuple(inputs[-1].shape)})"
        )
    out = block.residual(*inputs)
    if out.shape[2:] != inputs[-1].shape[2:]:
        # SNL/GC: one (B, C, 1, ...) vector, the same at every position.
        out = out.expand(*out.shape[:2], *inputs[-1].shape[2:])  # (B, C, *S)
    out_tokens = layout.fold(out)  # (B', N, C_out)

    dev = feats.device
    fold = torch.randint(folds, (num_pairs,), generator=generator)
    qi = torch.randint(n, (num_pairs,), generator=generator)
    qj = torch.randint(n - 1, (num_pairs,), generator=generator)
    qj = qj + (qj >= qi).long()  # j ≠ i
    fold, qi, qj = fold.to(dev), qi.to(dev), qj.to(dev)

    d_in = cosine_distance(feats[fold, qi], feats[fold, qj])
    d_out = cosine_distance(out_tokens[fold, qi], out_tokens[fold, qj])

    normalise = getattr(block, "pairwise", None) in ("dot_product", "concatenation")
    d_att = []
    for f, i, j in zip(
        fold.split(chunk_pairs), qi.split(chunk_pairs), qj.split(chunk_pairs), strict=True
    ):
        p = i.numel()
        rows = block.attention_map(*inputs, queries=torch.cat([i, j]))  # (B', 2P, M)
        if normalise:
            s = rows.sum(dim=-1, keepdim=True)  # (B', 2P, 1)
            rows = rows / torch.where(s.abs() > 1e-30, s, torch.ones_like(s))
        k = torch.arange(p, device=rows.device)
        d_att.append(cosine_distance(rows[f, k], rows[f, p + k]))
    return QueryIndependence(
        input_distance=float(d_in.mean()),
        output_distance=float(d_out.mean()),
        attention_distance=float(torch.cat(d_att).mean()),
        num_pairs=num_pairs,
    )
