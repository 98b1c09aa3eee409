"""block.layout(...): query folds, key cells and token folding agree with what the blocks compute."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nonlocalnet import AFNB, APNB, GlobalContext, NonLocalNd, SimplifiedNonLocal
from nonlocalnet.layers.layout import AttentionLayout

DT = torch.float64
#: (dims, extent, odd size): every pooled axis has an odd length, so the last window is partial.
NL_LAYOUTS = [
    (1, "spacetime", (7,)),
    (2, "spacetime", (5, 3)),
    (3, "spacetime", (3, 5, 3)),
    (3, "space", (3, 5, 3)),
    (3, "time", (3, 5, 3)),
]
#: odd sizes for the floor rounding (the last row/column of 7×9 is in no window)
FLOOR_LAYOUTS = [
    (1, "spacetime", (7,)),
    (2, "spacetime", (7, 9)),
    (3, "spacetime", (3, 7, 9)),
    (3, "space", (3, 7, 9)),
    (3, "time", (3, 7, 9)),
]
#: (sub_sample, rounding, layouts)
ROUNDED = [(False, "ceil", NL_LAYOUTS), (True, "ceil", NL_LAYOUTS), (True, "floor", FLOOR_LAYOUTS)]
_CASES = [(sub, rounding, *lay) for sub, rounding, lays in ROUNDED for lay in lays]


def _positions(size) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(n) for n in size)))


def _one_hot(size) -> torch.Tensor:
    """``(1, N, *S)``: channel p is 1 at position p (row major), 0 elsewhere."""
    n = math.prod(size)
    return torch.eye(n, dtype=DT).reshape(1, n, *size)


def _dense_cells(layout: AttentionLayout, fold: int) -> torch.Tensor:
    """``(M, P)`` shares from the sparse triplets (P positions of the key map)."""
    key, pos, share = layout.key_cells(fold)
    out = torch.zeros(layout.num_keys, math.prod(layout.key_size), dtype=DT)
    out[key, pos] = share
    return out


def _randomise(block: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return block


# -- NL -----------------------------------------------------------------------------------------


_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_WINDOW = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


@pytest.mark.parametrize(("sub", "rounding", "dims", "extent", "size"), _CASES)
def test_nl_key_cells_are_what_the_max_pooling_reads(sub, rounding, dims, extent, size) -> None:
    block = NonLocalNd(
        4, dims=dims, extent=extent, sub_sample=sub, sub_sample_rounding=rounding, dtype=DT
    )
    layout = block.layout(size)
    # Max pooling of one-hot maps: pooled[p, j] = 1 iff position p is in window j. torch's own
    # pooling (ceil_mode for ceil), and the block's, which must be the same.
    onehot = _one_hot(size)
    w = _WINDOW[dims]
    pooled = _POOL[dims](onehot, w, w, ceil_mode=rounding == "ceil") if sub else onehot
    if sub:
        assert torch.equal(block._pool(onehot), pooled)
    pooled = pooled[0]  # (N, *S_pooled)
    grid = pooled.shape[1:]
    assert tuple(grid) == layout.key_grid
    fed = pooled.flatten(1).sum(1).reshape(size) > 0  # (*S,): positions that feed some key
    if sub and rounding == "floor":  # the last odd row/column (and the last odd L) feed none
        axes = [torch.arange(n) < g * k for n, g, k in zip(size, grid, w, strict=True)]
        assert torch.equal(fed, torch.stack(torch.meshgrid(*axes, indexing="ij")).all(0))
        assert not bool(fed.all())
    else:
        assert bool(fed.all())
    for fold in range(layout.folds):
        if extent == "spacetime":  # one fold, key j = pooled position j
            want = pooled.flatten(1).T  # (M, N)
        elif extent == "space":  # fold = frame t, key j = pooled (h', w') of that frame
            want = pooled[:, fold].flatten(1).T  # (H'W', N)
        else:  # fold = pixel (h, w), key j = frame j of the pooled cell of (h, w)
            h, w = divmod(fold, size[2])
            # past the last full window (floor), the pixel reads the last cell, the nearest
            cell = (min(h // 2, grid[1] - 1), min(w // 2, grid[2] - 1)) if sub else (h, w)
            want = pooled[:, :, cell[0], cell[1]].T  # (T, N)
        members = _dense_cells(layout, fold) > 0  # (M, N)
        assert torch.equal(members, want > 0), f"fold {fold}"
        key, _, share = layout.key_cells(fold)
        count = want.sum(1)  # positions per key
        torch.testing.assert_close(share, 1.0 / count[key])


@pytest.mark.parametrize(("sub", "rounding", "dims", "extent", "size"), _CASES)
@pytest.mark.parametrize("pos", ["after", "before"])
def test_nl_block_keys_hold_the_positions_of_their_cells(
    sub, rounding, dims, extent, size, pos
) -> None:
    """Gaussian NL on one-hot channels: key token (fold, j) is nonzero exactly on its cell."""
    n = math.prod(size)
    block = NonLocalNd(
        n,
        pairwise="gaussian",
        sub_sample=sub,
        sub_sample_position=pos,
        sub_sample_rounding=rounding,
        dims=dims,
        extent=extent,
        dtype=DT,
    )
    layout = block.layout(size)
    q, k, _ = block.embed(_one_hot(size))  # (B', N, N), (B', M, N)
    assert q.shape == (layout.folds, layout.num_queries, n)
    assert k.shape == (layout.folds, layout.num_keys, n)
    for fold in range(layout.folds):
        assert torch.equal(k[fold] > 0, _dense_cells(layout, fold) > 0), f"fold {fold}"
    # and each query token is its own position: fold/locate agree with embed
    folds, index = layout.locate(_positions(size))
    eye = torch.eye(n, dtype=DT)
    assert torch.equal(q[folds, index], eye)


@pytest.mark.parametrize(("sub", "rounding", "dims", "extent", "size"), _CASES)
def test_nl_attention_rows_are_indexed_as_the_layout_says(
    sub, rounding, dims, extent, size
) -> None:
    """Row (fold, index) of attention_map is softmax_j(s θ(x_p)ᵀ φ̄_j), φ̄_j max-pooled by hand."""
    block = NonLocalNd(
        4, 3, dims=dims, extent=extent, sub_sample=sub, sub_sample_rounding=rounding, dtype=DT
    )
    block = _randomise(block)
    x = torch.randn(2, 4, *size, dtype=DT)
    layout = block.layout(size)
    amap = block.attention_map(x)  # (B', N, M)
    assert amap.shape == (2 * layout.folds, layout.num_queries, layout.num_keys)
    with torch.no_grad():
        theta, phi = block.theta(x), block.phi(x)  # (B, C', *S)
    positions = _positions(size)
    folds, index = layout.locate(positions)
    flat = theta.flatten(2)  # (B, C', N)
    for b in (0, 1):
        for p, (fold, i) in enumerate(zip(folds.tolist(), index.tolist(), strict=True)):
            key, pos, _ = layout.key_cells(fold)
            phi_bar = torch.full((layout.num_keys, 3), -math.inf, dtype=DT)
            for j, q in zip(key.tolist(), pos.tolist(), strict=True):
                phi_bar[j] = torch.maximum(phi_bar[j], phi[b].flatten(1)[:, q])
            row = torch.softmax(block.scale * phi_bar @ flat[b, :, p], dim=0)  # (M,)
            torch.testing.assert_close(amap[b * layout.folds + fold, i], row)


@pytest.mark.parametrize(("dims", "extent", "size"), NL_LAYOUTS)
def test_fold_lays_positions_out_as_locate_says_and_unfold_undoes_it(dims, extent, size) -> None:
    layout = NonLocalNd(4, dims=dims, extent=extent).layout(size)
    t = torch.randn(3, 5, *size, dtype=DT)
    tokens = layout.fold(t)  # (B', N, C)
    assert tokens.shape == (3 * layout.folds, layout.num_queries, 5)
    folds, index = layout.locate(_positions(size))
    for b in range(3):
        for p, f, i in zip(_positions(size), folds.tolist(), index.tolist(), strict=True):
            assert torch.equal(tokens[b * layout.folds + f, i], t[(b, slice(None), *p)])
    assert torch.equal(layout.unfold(tokens, 3), t)


def test_nl_layout_numbers() -> None:
    lay = NonLocalNd(4, dims=3, extent="time", sub_sample=True).layout((4, 5, 7))
    assert (lay.kind, lay.folds, lay.num_queries, lay.num_keys) == ("pairwise", 35, 4, 4)
    assert lay.key_grid == (4, 3, 4)
    lay = NonLocalNd(4, dims=3, extent="space", sub_sample=True).layout((4, 5, 7))
    assert (lay.folds, lay.num_queries, lay.num_keys) == (4, 35, 12)
    lay = NonLocalNd(4, dims=3, sub_sample=True).layout((4, 5, 7))
    assert (lay.folds, lay.num_queries, lay.num_keys) == (1, 140, 48)
    # the time extent's keys of pixel (4, 6) are the 4 frames of its last, partial 1×2×1 cell
    lay = NonLocalNd(4, dims=3, extent="time", sub_sample=True).layout((4, 5, 7))
    key, pos, share = lay.key_cells(4 * 7 + 6)
    assert key.tolist() == [0, 1, 2, 3]
    assert pos.tolist() == [t * 35 + 4 * 7 + 6 for t in range(4)]
    assert share.tolist() == [1.0] * 4


def test_floor_layout_numbers() -> None:
    """7×9 and 3×7×9: floor leaves 3×4 cells, ceil 4×5; the time extent's pixels of the last
    odd row/column read the last cell."""
    lay = NonLocalNd(4, sub_sample=True, sub_sample_rounding="floor").layout((7, 9))
    assert (lay.key_grid, lay.num_keys, lay.rounding) == ((3, 4), 12, "floor")
    assert NonLocalNd(4, sub_sample=True).layout((7, 9)).num_keys == 20
    key, pos, share = lay.key_cells()
    assert len(pos) == 6 * 8 and share.tolist() == [0.25] * 48  # full 2×2 windows only
    assert sorted(pos.tolist()) == [h * 9 + w for h in range(6) for w in range(8)]
    lay = NonLocalNd(4, dims=3, extent="time", sub_sample=True, sub_sample_rounding="floor").layout(
        (3, 7, 9)
    )
    assert (lay.folds, lay.num_queries, lay.num_keys, lay.key_grid) == (63, 3, 3, (3, 3, 4))
    key, pos, share = lay.key_cells(6 * 9 + 8)  # pixel (6, 8): reads cell (2, 3), rows 4-5, 6-7
    assert key.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert pos.tolist() == [t * 63 + h * 9 + w for t in range(3) for h in (4, 5) for w in (6, 7)]
    assert share.tolist() == [0.25] * 12
    # fold_keys gives that pixel the keys of cell (2, 3)
    keys = torch.randn(1, 2, 3, 3, 4, dtype=DT)  # (B, C, T, H', W')
    tokens = lay.fold_keys(keys)  # (B·H·W, T, C)
    assert torch.equal(tokens[6 * 9 + 8], keys[0, :, :, 2, 3].T)
    assert torch.equal(tokens[5 * 9 + 7], keys[0, :, :, 2, 3].T)
    with pytest.raises(ValueError, match="unknown rounding 'nearest'"):
        AttentionLayout.pairwise((4, 4), window=(2, 2), rounding="nearest")


# -- SNL / GC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SimplifiedNonLocal, GlobalContext])
@pytest.mark.parametrize("size", [(7,), (4, 5), (2, 3, 4)])
def test_query_independent_layout_is_the_identity(cls, size) -> None:
    block = _randomise(cls(16, dims=len(size), dtype=DT))
    x = torch.randn(2, 16, *size, dtype=DT)
    layout = block.layout(size)
    n = math.prod(size)
    assert (layout.kind, layout.folds, layout.num_queries, layout.num_keys) == (
        "query_independent",
        1,
        n,
        n,
    )
    assert torch.equal(_dense_cells(layout, 0), torch.eye(n, dtype=DT))
    # key j is position j: every row is the softmax of the mask logits, row major
    with torch.no_grad():
        logits = block.conv_mask(x).flatten(1)  # (B, N)
    folds, index = layout.locate(_positions(size))
    assert torch.equal(folds, torch.zeros(n, dtype=torch.long))
    assert torch.equal(index, torch.arange(n))
    rows = block.attention_map(x, queries=index)  # (B, N, N)
    torch.testing.assert_close(rows, torch.softmax(logits, 1)[:, None].expand(-1, n, -1))
    tokens = layout.fold(x)  # (B, N, C)
    for b, (i, p) in itertools.product((0, 1), enumerate(_positions(size))):
        assert torch.equal(tokens[b, i], x[(b, slice(None), *p)])


# -- APNB / AFNB ---------------------------------------------------------------------------------


def _pool_one_hot(size, out_sizes) -> torch.Tensor:
    """``(S, N)``: adaptive_avg_pool of each position's one-hot map, bins concatenated."""
    onehot = _one_hot(size)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
    cols = [pool[len(size)](onehot, s).flatten(2) for s in out_sizes]  # (1, N, Π s) each
    return torch.cat(cols, dim=2)[0].T  # (S, N)


@pytest.mark.parametrize(
    ("size", "kw"),
    [
        ((7,), {}),
        ((5, 7), {}),  # bins 6 and 8 exceed 5: overlapping cells
        ((4, 6), {"bins": (1, 3, 4)}),  # 3 does not divide 4, 4 does not divide 6
        ((3, 5, 4), {"bins": (1, 2, 3)}),
        ((3, 5, 4), {"bins": (1, 2, 3), "pool_time": True}),
    ],
)
def test_apnb_cells_are_the_adaptive_pooling_of_one_hot_maps(size, kw) -> None:
    block = APNB(4, key_channels=2, value_channels=2, dims=len(size), **kw, dtype=DT).eval()
    layout = block.layout(size)
    assert layout.kind == "pyramid" and layout.folds == 1
    assert layout.num_keys == block.pyramid.num_samples(size)
    dense = _dense_cells(layout, 0)  # (S, N)
    torch.testing.assert_close(dense.sum(1), torch.ones(layout.num_keys, dtype=DT))
    torch.testing.assert_close(dense, _pool_one_hot(size, block.pyramid.output_sizes(size)))
    # the block's own sampler gives the same weights
    torch.testing.assert_close(dense, block.pyramid(_one_hot(size))[0].T)
    # key s of the block's attention map is pyramid sample s
    x = torch.randn(1, 4, *size, dtype=DT)
    q, k, _ = block.embed(x)
    with torch.no_grad():
        want = layout.fold_keys(block.pyramid(block.f_key(x)))  # (1, S, d)
        assert torch.equal(q, layout.fold(block.f_key(x)))
    assert torch.equal(k, want)


def test_afnb_queries_on_high_keys_on_low() -> None:
    block = _randomise(AFNB(3, 5, 4, key_channels=2, value_channels=2, bins=(1, 2, 3), dtype=DT))
    low, high = torch.randn(2, 3, 5, 4, dtype=DT), torch.randn(2, 5, 3, 6, dtype=DT)
    layout = block.layout(low.shape[2:], high.shape[2:])
    assert (layout.size, layout.key_size, layout.num_queries, layout.num_keys) == (
        (3, 6),
        (5, 4),
        18,
        14,
    )
    torch.testing.assert_close(
        _dense_cells(layout, 0), _pool_one_hot((5, 4), [(1, 1), (2, 2), (3, 3)])
    )
    folds, index = layout.locate([(2, 5), (0, 1)])
    assert folds.tolist() == [0, 0] and index.tolist() == [17, 1]
    rows = block.attention_map(low, high, queries=index)  # (B, 2, S)
    with torch.no_grad():
        qmap = block.f_query(high)  # (B, d, 3, 6)
        kmap = block.pyramid(block.f_key(low))  # (B, d, S)
    for b in (0, 1):
        for r, (h, w) in zip(rows[b], [(2, 5), (0, 1)], strict=True):
            want = torch.softmax(block.scale * qmap[b, :, h, w] @ kmap[b], dim=0)
            torch.testing.assert_close(r, want)


# -- errors ---------------------------------------------------------------------------------------


def test_bad_arguments_name_what_was_expected() -> None:
    nl = NonLocalNd(4, dims=3, extent="space")
    with pytest.raises(ValueError, match=r"NonLocalNd.layout: size must have 3 dims, got \(4, 5\)"):
        nl.layout((4, 5))
    lay = nl.layout((2, 3, 4))
    with pytest.raises(ValueError, match=r"positions must lie in a map of size \(2, 3, 4\)"):
        lay.locate([(2, 0, 0)])
    with pytest.raises(ValueError, match=r"fold must be an int in \[0, 2\), got 2"):
        lay.key_cells(2)
    with pytest.raises(ValueError, match=r"expected a \(B, C, \*\(2, 3, 4\)\) map"):
        lay.fold(torch.zeros(1, 4, 2, 3, 5))
    with pytest.raises(ValueError, match="size must have 2 dims"):
        GlobalContext(8, ratio=0.25).layout((4,))
    with pytest.raises(ValueError, match="high_size must have 2 dims"):
        AFNB(3, 5, 4).layout((4, 4), (4,))
    with pytest.raises(ValueError, match="kind must be one of"):
        AttentionLayout("nonlocal", (2,), (2,), window=(1,))
    with pytest.raises(ValueError, match=r"window must have one entry per axis of key_size \(2,\)"):
        AttentionLayout("pairwise", (2,), (2,))
    with pytest.raises(ValueError, match="size must be positive ints"):
        AttentionLayout.pairwise((0, 3))
    with pytest.raises(ValueError, match="pyramid has no key grid"):
        _ = APNB(4).layout((5, 5)).key_grid
