"""Attention figures: the drawn keys are the block's k largest reference weights, at honest pixels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nonlocalnet import NonLocal2d, NonLocal3d
from nonlocalnet.functional import pairwise_weights
from nonlocalnet.layers.asymmetric import AFNB, APNB
from nonlocalnet.layers.global_context import GlobalContext
from nonlocalnet.viz.attention import (
    DPI,
    attention_blocks,
    attention_figure,
    draw_attention_arrows,
    draw_attention_heatmap,
    grid_figsize,
    resolve_block,
)


def _randomise(block: nn.Module) -> nn.Module:
    """A 'trained' block: random weights everywhere (also the zero-initialised norm)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return block


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _expected_px(num_panels: int, legend: bool = False) -> tuple[int, int]:
    w, h = grid_figsize(num_panels, legend=legend)
    return round(w * DPI), round(h * DPI)


def _check_sizes(paths, num_panels: int) -> None:
    """Arrows (with the table of keys) and heat map of one query."""
    arrows, heat = paths
    assert _png_size(arrows) == _expected_px(num_panels, legend=True)
    assert _png_size(heat) == _expected_px(num_panels)


def _image_model(block: nn.Module) -> nn.Sequential:
    # 3x3/2 conv (pad 1): feature (h, w) centred on pixel (2h, 2w).
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), block)


def test_topk_are_the_largest_reference_weights_2d(tmp_path) -> None:
    block = _randomise(NonLocal2d(8, zero_init=False))
    model = _image_model(block)
    clip = torch.randn(3, 12, 16)
    res = attention_figure(model, clip, queries=[(6.0, 10.0)], k=7, out_dir=tmp_path)
    assert res.attention.positions == [(3, 5)]
    assert res.attention.pixels == [(6.0, 10.0)]

    # Reference row computed here from the block's convs: softmax_j(s θ(x_i)ᵀ φ(x_j)).
    with torch.no_grad():
        feat = model[1](model[0](clip[None]))  # (1, 8, 6, 8)
        theta = block.theta(feat).flatten(2).transpose(1, 2)  # (1, N, C')
        phi = block.phi(feat).flatten(2).transpose(1, 2)  # (1, N, C')
        row = torch.softmax(block.scale * theta[0, 3 * 8 + 5] @ phi[0].T, dim=-1)  # (N,)
    idx, w, centres = res.topk[0]
    ref_w, ref_idx = torch.topk(row, 7)
    assert idx.tolist() == ref_idx.tolist()
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-7)
    # Key j = (h, w) drawn at pixel (2h, 2w).
    expected = torch.tensor([[2.0 * (j // 8), 2.0 * (j % 8)] for j in ref_idx.tolist()])
    torch.testing.assert_close(centres, expected.double())
    # Every non-chosen key weighs no more than the smallest chosen one.
    rest = torch.ones_like(row, dtype=torch.bool)
    rest[idx] = False
    assert row[rest].max() <= w.min()
    _check_sizes(res.paths[0], 1)


def test_topk_video_subsampled_keys_are_pooled_cells(tmp_path) -> None:
    block = _randomise(NonLocal3d(8, zero_init=False, sub_sample=True, pairwise="dot_product"))
    # temporal stride 2, spatial stride 2 (pads keep centres on 2t, 2y, 2x).
    model = nn.Sequential(nn.Conv3d(3, 8, (1, 3, 3), (2, 2, 2), (0, 1, 1)), block)
    clip = torch.randn(3, 4, 8, 8)
    res = attention_figure(model, clip, queries=[(2.0, 4.0, 6.0)], k=5, out_dir=tmp_path)
    assert res.attention.positions == [(1, 2, 3)]
    block.impl = "reference"
    with torch.no_grad():
        q, k, _ = block.embed(model[0](clip[None]))
        row = pairwise_weights("dot_product", q, k)[0, 1 * 16 + 2 * 4 + 3]  # (M,) M = 2·2·2
    idx, w, centres = res.topk[0]
    assert idx.tolist() == torch.topk(row, 5).indices.tolist()
    torch.testing.assert_close(w, torch.topk(row, 5).values)
    # Pooled key (t, i, j) covers features (t, 2i..2i+1, 2j..2j+1): centre (2t, 4i + 1, 4j + 1).
    for m, c in zip(idx.tolist(), centres.tolist(), strict=True):
        t, i, j = m // 4, (m // 2) % 2, m % 2
        assert c == [2.0 * t, 4.0 * i + 1.0, 4.0 * j + 1.0]
    # 2 clip frames per feature frame; the figure shows all 4 clip frames.
    _check_sizes(res.paths[0], 4)


@pytest.mark.parametrize("extent", ["space", "time"])
def test_topk_extents(tmp_path, extent: str) -> None:
    block = _randomise(NonLocal3d(8, zero_init=False, extent=extent))
    model = nn.Sequential(nn.Conv3d(3, 8, 1), block)
    clip = torch.randn(3, 3, 4, 5)
    res = attention_figure(model, clip, queries=[(1.0, 2.0, 3.0)], k=3, out_dir=tmp_path)
    full = block.attention_map(model[0](clip[None]))  # (B', N, M)
    if extent == "space":  # fold t = 1, query (2, 3) in the frame, keys (1, y, x)
        row = full[1, 2 * 5 + 3]
        keys = [(1.0, float(m // 5), float(m % 5)) for m in range(20)]
    else:  # fold pixel (2, 3), query t = 1, keys (t, 2, 3)
        row = full[2 * 5 + 3, 1]
        keys = [(float(t), 2.0, 3.0) for t in range(3)]
    idx, w, centres = res.topk[0]
    assert idx.tolist() == torch.topk(row, 3).indices.tolist()
    torch.testing.assert_close(w, torch.topk(row, 3).values)
    assert centres.tolist() == [list(keys[m]) for m in idx.tolist()]


def test_query_independent_and_pyramid_blocks(tmp_path) -> None:
    gc = _randomise(GlobalContext(8, ratio=0.25))
    res = attention_figure(
        _image_model(gc), torch.randn(3, 12, 16), num_queries=2, k=4, out_dir=tmp_path / "gc"
    )
    assert res.attention.kind == "query_independent"
    a, b = res.topk
    assert a[0].tolist() == b[0].tolist()  # the same keys for every query

    apnb = _randomise(APNB(8, 8, key_channels=4, value_channels=4, bins=(1, 2, 3)))
    res = attention_figure(
        _image_model(apnb), torch.randn(3, 12, 16), num_queries=1, k=3, out_dir=tmp_path / "ap"
    )
    att = res.attention
    assert att.kind == "pyramid" and att.rows.shape == (1, 1 + 4 + 9)
    cells = att.cells[0]
    centres = cells.centres()
    # bin 1: the whole 6x8 grid, centre of features (2.5, 3.5) -> pixels (5, 7);
    # bin 2, cell (1, 0): features rows 3..5, cols 0..3 -> centre (4, 1.5) -> pixels (8, 3).
    torch.testing.assert_close(centres[0], torch.tensor([5.0, 7.0], dtype=torch.float64))
    torch.testing.assert_close(centres[1 + 2], torch.tensor([8.0, 3.0], dtype=torch.float64))
    # the heat map keeps the mass: per-position densities sum to the row's sum (1).
    assert math.isclose(float(cells.density(att.rows[0]).sum()), 1.0, rel_tol=1e-5)
    assert res.topk[0][0].tolist() == torch.topk(att.rows[0], 3).indices.tolist()


class _Fusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Conv2d(3, 8, 3, 2, 1)  # stride 2
        self.high = nn.Conv2d(8, 8, 3, 2, 1)  # stride 4
        self.afnb = AFNB(8, 8, 8, key_channels=4, value_channels=4, bins=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        high = nn.functional.interpolate(self.high(low), size=low.shape[2:])
        return self.afnb(low, high)


def test_afnb_queries_on_high_cells_on_low(tmp_path) -> None:
    model = _Fusion()
    _randomise(model.afnb)
    res = attention_figure(model, torch.randn(3, 8, 8), queries=[(2.0, 4.0)], k=2, out_dir=tmp_path)
    att = res.attention
    assert att.kind == "pyramid" and att.rows.shape == (1, 5)
    # low grid 4x4 at stride 2: bin 1 centred on features (1.5, 1.5) -> pixels (3, 3).
    torch.testing.assert_close(
        att.cells[0].centres()[0], torch.tensor([3.0, 3.0], dtype=torch.float64)
    )


def test_draw_functions_write_pngs_of_the_expected_size(tmp_path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (10, 24, 32, 3), dtype=np.uint8)
    path = draw_attention_arrows(
        frames,
        (3, 10, 12),
        [(3, 2, 2), (5, 20, 30), (9, 10, 12)],
        [0.5, 0.3, 0.2],
        tmp_path / "a.png",
        "title",
        max_frames=6,
    )
    assert _png_size(path) == _expected_px(6, legend=True)
    path = draw_attention_heatmap(
        frames[0], np.ones((24, 32)), (10, 12), tmp_path / "h.png", "title"
    )
    assert _png_size(path) == _expected_px(1)
    with pytest.raises(ValueError, match="one weight per target"):
        draw_attention_arrows(frames, (0, 0, 0), [(0, 1, 1)], [0.5, 0.5], tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="uint8"):
        draw_attention_arrows(frames.astype(float), (0, 0, 0), [], [], tmp_path / "x.png", "t")


def test_model_without_attention_block_names_its_blocks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    assert attention_blocks(model) == []
    with pytest.raises(ValueError, match=r"model has: 0 \(Conv2d\), 1 \(ReLU\)"):
        resolve_block(model)
    model = _image_model(NonLocal2d(8))
    with pytest.raises(ValueError, match="expected one of '2'"):
        resolve_block(model, "layer4")


def test_attention_figure_input_errors(tmp_path) -> None:
    model = _image_model(NonLocal2d(8))
    with pytest.raises(
        ValueError, match=r"frames must match the clip's \(T, H, W\) = \(1, 12, 16\)"
    ):
        attention_figure(
            model, torch.randn(3, 12, 16), frames=np.zeros((12, 15, 3), np.uint8), out_dir=tmp_path
        )
    with pytest.raises(ValueError, match=r"one sample \(C, H, W\)"):
        attention_figure(model, torch.randn(2, 3, 12, 16), out_dir=tmp_path)
    from nonlocalnet import NonLocal1d

    seq = nn.Sequential(nn.Conv1d(3, 8, 1), NonLocal1d(8))
    with pytest.raises(ValueError, match="needs an image or video model"):
        attention_figure(seq, torch.randn(3, 10), out_dir=tmp_path)
    with pytest.raises(ValueError, match="outside the input"):
        attention_figure(model, torch.randn(3, 12, 16), queries=[(12.0, 3.0)], out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# what the figures show: absolute colour scale, no arrows to zero weights, the own key


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch):
    """The figures the drawing functions make, kept open (still written to their PNG)."""
    import matplotlib.pyplot as plt

    import nonlocalnet.viz.attention as attention

    kept: list = []

    def keep(fig, out_path):
        kept.append(fig)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=DPI)
        return Path(out_path)

    monkeypatch.setattr(attention, "_save", keep)
    yield kept
    for fig in kept:
        plt.close(fig)


def _artists(fig, gid: str, kind=None) -> list:
    return [
        a
        for ax in fig.axes
        for a in ax.get_children()
        if a.get_gid() == gid and (kind is None or isinstance(a, kind))
    ]


def _arrow_colours(fig) -> list[np.ndarray]:
    return [np.asarray(a.arrow_patch.get_facecolor()) for a in _artists(fig, "arrow")]


def _frames(t: int = 1) -> np.ndarray:
    frames = np.zeros((t, 32, 32, 3), np.uint8)
    frames[..., 0] = 200  # a red frame: its grey version is not its own colour
    frames[:, 8:16, 8:16] = (20, 200, 90)
    return frames


def test_arrow_colours_are_absolute_from_zero(tmp_path, figures) -> None:
    """Near-uniform weights (0.062–0.064 against 1/16) get nearly the same colour; min→max would
    give them the two ends of the colour map."""
    from matplotlib import colormaps

    from nonlocalnet.viz.attention import ARROW_CMAP

    targets = [(0, 2, 2), (0, 2, 29), (0, 29, 2)]
    weights = [0.064, 0.063, 0.062]
    draw_attention_arrows(
        _frames(), (0, 16, 16), targets, weights, tmp_path / "a.png", "t", num_keys=16
    )
    (fig,) = figures
    colours = _arrow_colours(fig)
    assert len(colours) == 3
    cmap = colormaps[ARROW_CMAP]
    # drawn lightest first: 0.062, 0.063, 0.064, each at weight / 0.064 of the map
    for c, wi in zip(colours, sorted(weights), strict=True):
        np.testing.assert_allclose(c[:3], cmap(wi / 0.064)[:3], atol=1e-6)
    assert np.abs(colours[0] - colours[2]).max() < 0.05
    assert np.abs(colours[0][:3] - np.asarray(cmap(0.0)[:3])).max() > 0.5  # far from 0's colour
    # the colour bar goes from 0 to the largest weight, 1/M drawn across it and named
    cax = fig.axes[1]
    assert cax.get_ylim() == pytest.approx((0.0, 0.064))
    lines = [ln.get_ydata() for ln in cax.get_lines()]
    assert any(np.allclose(y, 1 / 16) for y in lines)
    assert "1/M" in [t.get_text() for t in cax.texts]
    assert "1/M = 0.0625" in cax.get_ylabel()


def test_zero_weight_keys_get_no_arrow(tmp_path, figures) -> None:
    targets = [(0, 2, 2), (0, 2, 29), (0, 29, 2), (0, 29, 29), (0, 16, 2), (0, 2, 16)]
    weights = [0.5, 0.3, 2e-6, 0.0, 0.0, 1e-9]
    draw_attention_arrows(
        _frames(), (0, 16, 16), targets, weights, tmp_path / "a.png", "t", num_keys=16
    )
    (fig,) = figures
    assert len(_artists(fig, "arrow")) == 3  # 0.5, 0.3 and 2e-6 > MIN_WEIGHT = 1e-6
    assert "arrows: 3 of 6 keys (those of weight > 1e-06)" in fig._suptitle.get_text()
    # the table still lists all six, the three without an arrow in grey
    table = [t for t in _artists(fig, "key_table")]
    rows = [t for t in table if t.get_text().lstrip()[:1].isdigit()]
    assert [r.get_text().split()[1] for r in rows] == ["0.5", "0.3", "2e-06", "0", "0", "1e-09"]
    greys = [r.get_color() == "0.55" for r in rows]
    assert greys == [False, False, False, True, True, True]
    # a threshold of 1e-5 leaves two; the arrows' numbers are those of the table
    figures.clear()
    draw_attention_arrows(
        _frames(), (0, 16, 16), targets, weights, tmp_path / "b.png", "t", min_weight=1e-5
    )
    (fig,) = figures
    assert len(_artists(fig, "arrow")) == 2
    assert sorted(a.get_text() for a in _artists(fig, "target_number")) == ["1", "2"]
    with pytest.raises(ValueError, match="min_weight must be a finite number >= 0"):
        draw_attention_arrows(_frames(), (0, 0), [], [], tmp_path / "c.png", "t", min_weight=-1)


def test_signed_weights_get_a_symmetric_scale(tmp_path, figures) -> None:
    """Dot-product rows (f / N) can be negative: the scale is symmetric about 0, |w| decides."""
    from matplotlib import colormaps

    from nonlocalnet.viz.attention import SIGNED_CMAP

    targets = [(0, 2, 2), (0, 2, 29), (0, 29, 2)]
    draw_attention_arrows(
        _frames(), (0, 16, 16), targets, [0.04, -0.03, -1e-8], tmp_path / "a.png", "t"
    )
    (fig,) = figures
    assert fig.axes[1].get_ylim() == pytest.approx((-0.04, 0.04))
    colours = _arrow_colours(fig)
    assert len(colours) == 2  # |-1e-8| <= MIN_WEIGHT
    cmap = colormaps[SIGNED_CMAP]
    np.testing.assert_allclose(colours[0][:3], cmap((-0.03 + 0.04) / 0.08)[:3], atol=1e-6)
    np.testing.assert_allclose(colours[1][:3], cmap(1.0)[:3], atol=1e-6)


def test_heatmap_is_perceptual_over_grey_frames(tmp_path, figures) -> None:
    from nonlocalnet.viz.attention import HEATMAP_CMAP

    frames = _frames(3)
    density = np.full((3, 32, 32), 0.5)
    density[1, :16] = 0.75  # min 0.5: a min→max scale would start there
    excluded = np.zeros((3, 32, 32), bool)
    excluded[1, :4, :4] = True
    density[1, :4, :4] = 5.0  # excluded: not part of the scale
    draw_attention_heatmap(
        frames,
        density,
        (1, 16, 16),
        tmp_path / "h.png",
        "t",
        uniform=0.25,
        excluded=excluded,
        self_weight=5.0,
    )
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for f, ax in enumerate(panels):
        frame_image, overlay = ax.images
        grey = np.asarray(frame_image.get_array())
        assert grey.shape == (32, 32, 3) and grey.dtype == np.uint8
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        # luma of (200, 0, 0) and (20, 200, 90), BT.601: 59.8 and 133.64
        assert {int(v) for v in np.unique(grey)} == {60, 134}
        assert overlay.get_cmap().name.startswith(HEATMAP_CMAP) and HEATMAP_CMAP == "magma"
        assert (overlay.norm.vmin, overlay.norm.vmax) == (0.0, 0.75)
        mask = np.ma.getmaskarray(overlay.get_array())
        assert (mask == excluded[f]).all()
    cax = fig.axes[-1]
    assert any(np.allclose(ln.get_ydata(), 0.25) for ln in cax.get_lines())
    (note,) = _artists(fig, "self_weight")
    assert note.get_text() == "self 5"


def test_self_weight_is_written_and_excluded_on_request(tmp_path, figures) -> None:
    model = _image_model(_randomise(NonLocal2d(8, zero_init=False)))
    clip = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(2))
    res = attention_figure(model, clip, queries=[(6.0, 10.0)], k=5, out_dir=tmp_path)
    own = 3 * 8 + 5  # query feature (3, 5) of the 6x8 grid
    assert res.self_keys == [own]
    row = res.attention.rows[0]
    assert res.self_weights[0] == pytest.approx(float(row[own]))
    arrows_fig, heat_fig = figures
    from nonlocalnet.viz.attention import format_weight

    expected = f"self {format_weight(float(row[own]))}"
    for fig in (arrows_fig, heat_fig):
        assert [a.get_text() for a in _artists(fig, "self_weight")] == [expected]
        assert f"own key weight {format_weight(float(row[own]))}" in fig._suptitle.get_text()

    figures.clear()
    res = attention_figure(
        model, clip, queries=[(6.0, 10.0)], k=5, out_dir=tmp_path / "x", exclude_self=True
    )
    idx, w, _ = res.topk[0]
    others = row.clone()
    others[own] = -math.inf
    ref = torch.topk(others, 5)
    assert own not in idx.tolist()
    assert idx.tolist() == ref.indices.tolist()
    torch.testing.assert_close(w, row[ref.indices])  # not renormalised
    arrows_fig, heat_fig = figures
    title = arrows_fig._suptitle.get_text()
    assert f"own key excluded (weight {format_weight(float(row[own]))})" in title
    assert not _artists(arrows_fig, "target_ring")  # nothing drawn at the query's own pixel
    assert [a.get_text() for a in _artists(arrows_fig, "self_weight")] == [expected]
    # the heat map leaves the own key's pixels out: feature (3, 5) is centred on pixel (6, 10)
    # and nearest to pixels 5..6 x 9..10 (halves round up)
    (ax,) = [a for a in heat_fig.axes if a.images]
    mask = np.ma.getmaskarray(ax.images[1].get_array())
    assert np.argwhere(mask).tolist() == [[5, 9], [5, 10], [6, 9], [6, 10]]


def test_self_key_of_pooled_and_query_independent_blocks() -> None:
    # sub-sampled NL: the own key is the 1x2x2 max-pooling window holding the query
    block = _randomise(NonLocal3d(8, zero_init=False, sub_sample=True))
    model = nn.Sequential(nn.Conv3d(3, 8, 1), block)
    from nonlocalnet.viz.attention import query_attention
    from nonlocalnet.viz.geometry import trace_geometry

    clip = torch.randn(1, 3, 2, 4, 6)
    inputs, geos = trace_geometry(model, clip, block)
    att = query_attention(block, inputs, geos, [(1, 2, 3), (0, 1, 4)])
    # key grid (2, 2, 3): (1, 2 // 2, 3 // 2) and (0, 1 // 2, 4 // 2)
    assert att.self_key(0) == 1 * 6 + 1 * 3 + 1
    assert att.self_key(1) == 0 * 6 + 0 * 3 + 2
    # GC: one softmax over all positions, key j is position j
    gc = _randomise(GlobalContext(8, ratio=0.25))
    model = _image_model(gc)
    inputs, geos = trace_geometry(model, torch.randn(1, 3, 12, 16), gc)
    att = query_attention(gc, inputs, geos, [(2, 7)])
    assert att.self_key(0) == 2 * 8 + 7
    # a pyramid has no own key, and exclude_self says so
    apnb = _randomise(APNB(8, 8, key_channels=4, value_channels=4, bins=(1, 2)))
    model = _image_model(apnb)
    inputs, geos = trace_geometry(model, torch.randn(1, 3, 12, 16), apnb)
    att = query_attention(apnb, inputs, geos, [(2, 7)])
    assert att.self_key(0) is None
    with pytest.raises(ValueError, match="exclude_self needs a block whose keys are positions"):
        att.topk(0, 3, exclude_self=True)


def test_heatmap_pixels_split_evenly_between_feature_positions() -> None:
    """Stride 2: every feature position gets 2x2 pixels (halves round up, not to even)."""
    from nonlocalnet.viz.attention import _pixel_density, query_attention
    from nonlocalnet.viz.geometry import trace_geometry

    block = _randomise(NonLocal2d(8, zero_init=False))
    model = _image_model(block)
    inputs, geos = trace_geometry(model, torch.randn(1, 3, 12, 16), block)
    att = query_attention(block, inputs, geos, [(0, 0)])
    cells = att.cells[0]
    for key in range(cells.num_keys):
        onehot = torch.zeros(cells.num_keys)
        onehot[key] = 1.0
        owned = np.argwhere(_pixel_density(cells, onehot, (1, 12, 16))[0] > 0)
        h, w = divmod(key, 8)
        # feature h is centred on pixel 2h: pixels 2h - 1 and 2h (pixel 0 alone at the edge,
        # and the last pixel, 2·5 + 1, goes to the last position)
        rows = sorted({int(r) for r, _ in owned})
        cols = sorted({int(c) for _, c in owned})
        assert rows == [r for r in (2 * h - 1, 2 * h) if r >= 0] + ([11] if h == 5 else [])
        assert cols == [c for c in (2 * w - 1, 2 * w) if c >= 0] + ([15] if w == 7 else [])


def test_format_weight() -> None:
    from nonlocalnet.viz.attention import format_weight

    assert [format_weight(w) for w in (0.0625, 0.9961, 2.2e-4, 0.0, 1.0)] == [
        "0.0625",
        "0.996",
        "0.00022",
        "0",
        "1",
    ]
    assert format_weight(0.99996) == ">0.999"  # not "1": the row has other weight
