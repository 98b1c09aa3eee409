"""Attention figures: the drawn keys are the block's k largest reference weights, at honest pixels."""

from __future__ import annotations

import math

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


def _expected_px(num_panels: int) -> tuple[int, int]:
    w, h = grid_figsize(num_panels)
    return round(w * DPI), round(h * DPI)


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
    for p in res.paths[0]:
        assert _png_size(p) == _expected_px(1)


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
    for p in res.paths[0]:
        assert _png_size(p) == _expected_px(4)


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
    assert _png_size(path) == _expected_px(6)
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
