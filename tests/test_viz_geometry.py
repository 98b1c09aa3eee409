"""Feature position -> input pixel mapping, against hand-computed centres."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet import NonLocal2d, NonLocal3d
from nonlocalnet.viz.geometry import Layer, compose, layer_of, ratio_geometry, trace_geometry


def _conv(k: int, s: int, p: int) -> Layer:
    return Layer((k, k), (s, s), (p, p), (1, 1))


def _trace(model: nn.Module, x: torch.Tensor, block: nn.Module):
    model.eval()
    _, geos = trace_geometry(model, x, block)
    return geos[0]


def test_stride_1_same_padding_keeps_pixels() -> None:
    geo = compose([_conv(3, 1, 1), _conv(3, 1, 1)], (10, 12))
    assert geo.size == (10, 12)
    assert geo.to_pixel((5, 7)) == (5.0, 7.0)


def test_stride_1_unpadded_conv_shifts_by_half_kernel() -> None:
    # 3x3 conv without padding: output 0 sees pixels 0..2, centred on 1.
    geo = compose([_conv(3, 1, 0)], (10, 10))
    assert geo.size == (8, 8)
    assert geo.to_pixel((0, 4)) == (1.0, 5.0)


def test_stride_2_conv_and_pool() -> None:
    # 3x3/2 conv, padding 1: position i centred on pixel 2i.
    geo = compose([_conv(3, 2, 1)], (16, 16))
    assert geo.axes[0].jump == 2 and geo.size == (8, 8)
    assert geo.to_pixel((3, 5)) == (6.0, 10.0)
    # 2x2/2 max pool: position i covers pixels 2i, 2i+1, centred between them.
    pool = layer_of(nn.MaxPool2d(2), (16, 16))
    geo = compose([pool], (16, 16))
    assert geo.to_pixel((3, 0)) == (6.5, 0.5)


def test_stride_4_resnet_stem_and_unpadded_pools() -> None:
    # ResNet stem: 7x7/2 conv pad 3, 3x3/2 max pool pad 1: jump 4, position i on pixel 4i.
    stem = [_conv(7, 2, 3), layer_of(nn.MaxPool2d(3, 2, 1), (224, 224))]
    geo = compose(stem, (224, 224))
    assert geo.size == (56, 56)
    assert geo.axes[1].jump == 4
    assert geo.to_pixel((3, 10)) == (12.0, 40.0)
    # 3x3 valid conv then two 2x2/2 pools: position 0 sees pixels 0..5 (centre 2.5), jump 4.
    pools = [_conv(3, 1, 0), layer_of(nn.MaxPool2d(2), (1, 1)), layer_of(nn.MaxPool2d(2), (1, 1))]
    geo = compose(pools, (18, 18))
    assert geo.size == (4, 4)
    assert geo.to_pixel((0, 1)) == (2.5, 6.5)


def test_stride_8_resnet_layer2() -> None:
    stem = [_conv(7, 2, 3), layer_of(nn.MaxPool2d(3, 2, 1), (1, 1)), _conv(3, 2, 1)]
    geo = compose(stem, (64, 64))
    assert geo.size == (8, 8)
    assert geo.axes[0].jump == 8
    assert geo.to_pixel((2, 7)) == (16.0, 56.0)


def test_temporal_stride_2() -> None:
    # C2D conv1 1x7x7 with strides (2, 2, 2): feature frame t on input frame 2t.
    conv1 = layer_of(nn.Conv3d(3, 4, (1, 7, 7), (2, 2, 2), (0, 3, 3)), (8, 32, 32))
    geo = compose([conv1], (8, 32, 32))
    assert geo.size == (4, 16, 16)
    assert geo.to_pixel((3, 1, 2)) == (6.0, 2.0, 4.0)
    # then a 2x1x1 temporal max pool (stride 2): t covers conv frames 2t, 2t+1, i.e. input
    # frames 4t and 4t+2, centred on 4t+1.
    pool = layer_of(nn.MaxPool3d((2, 1, 1), (2, 1, 1)), (4, 16, 16))
    geo = compose([conv1, pool], (8, 32, 32))
    assert geo.size == (2, 16, 16)
    assert geo.axes[0].jump == 4
    assert geo.to_pixel((1, 0, 0)) == (5.0, 0.0, 0.0)


def test_ceil_mode_size_matches_pytorch() -> None:
    pool = nn.MaxPool2d(2, 2, ceil_mode=True)
    x = torch.zeros(1, 1, 7, 9)
    geo = compose([layer_of(pool, (7, 9))], (7, 9))
    assert geo.size == tuple(pool(x).shape[2:])


class _Bottleneck(nn.Module):
    """Residual block whose shortcut conv runs after the main path (as in torchvision)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1)
        self.conv2 = nn.Conv2d(c, c, 3, 2, 1)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.downsample = nn.Conv2d(c, c, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return torch.relu(out + self.downsample(x))


def test_trace_counts_the_main_path_once_and_stops_at_the_block() -> None:
    block = NonLocal2d(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 7, 2, 3),
        nn.MaxPool2d(3, 2, 1),
        _Bottleneck(4),
        block,
        nn.Conv2d(4, 4, 3, 2, 1),  # after the block: must not count
    )
    geo = _trace(model, torch.randn(1, 3, 64, 48), block)
    assert geo.exact
    assert geo.size == (8, 6)
    assert [a.jump for a in geo.axes] == [8.0, 8.0]
    assert geo.to_pixel((2, 5)) == (16.0, 40.0)


def test_trace_3d_temporal_stride() -> None:
    block = NonLocal3d(4)
    model = nn.Sequential(
        nn.Conv3d(3, 4, (1, 7, 7), (2, 2, 2), (0, 3, 3)),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        nn.MaxPool3d((2, 1, 1), (2, 1, 1)),
        block,
    )
    geo = _trace(model, torch.randn(1, 3, 8, 32, 32), block)
    assert geo.size == (2, 8, 8)
    assert geo.to_pixel((1, 2, 3)) == (5.0, 8.0, 12.0)


class _Resized(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.avg_pool2d(self.conv(x), 4))  # not a module: invisible to hooks


def test_trace_falls_back_to_the_shape_ratio(caplog: pytest.LogCaptureFixture) -> None:
    block = NonLocal2d(4)
    geo = _trace(_Resized(block), torch.randn(1, 3, 16, 16), block)
    assert not geo.exact
    assert geo == ratio_geometry((16, 16), (4, 4))
    assert geo.to_pixel((1, 2)) == (5.5, 9.5)  # cell of pixels 4..7 and 8..11
    assert "shape ratio" in caplog.text


def test_block_never_called_and_bad_positions() -> None:
    with pytest.raises(ValueError, match="was not called"):
        trace_geometry(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 8, 8), NonLocal2d(4))
    geo = compose([_conv(3, 2, 1)], (8, 8))
    with pytest.raises(ValueError, match="outside the grid"):
        geo.to_pixel((4, 0))
    with pytest.raises(ValueError, match="2 coordinates"):
        geo.to_pixel((1, 2, 3))
