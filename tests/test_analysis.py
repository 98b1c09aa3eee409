"""GCNet's query-independence analysis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nonlocalnet import (
    AFNB,
    APNB,
    GlobalContext,
    NonLocal1d,
    NonLocal2d,
    NonLocal3d,
    SimplifiedNonLocal,
    SqueezeExcite,
)
from nonlocalnet.analysis import QueryIndependence, cosine_distance, query_independence


def _randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.eval()


def test_cosine_distance() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 5.0], [-2.0, -4.0], [0.0, 0.0], [6.0, 8.0], [1.0, 0.0]])
    expected = torch.tensor([1.0, 2.0, 0.0, 0.0, 1 - 2**-0.5], dtype=torch.float64)
    torch.testing.assert_close(cosine_distance(a, b), expected)


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product", "concatenation"])
def test_two_positions_give_the_exact_distances(pairwise: str) -> None:
    """With N = 2 every pair is (0, 1) or (1, 0): the result is known exactly."""
    block = _randomize(NonLocal1d(6, 4, pairwise=pairwise)).double()
    x = torch.randn(1, 6, 2, dtype=torch.float64)
    r = query_independence(block, x, num_pairs=10)
    assert isinstance(r, QueryIndependence) and r.num_pairs == 10
    x0, x1 = x[0, :, 0], x[0, :, 1]
    assert r.input_distance == pytest.approx(1 - float(x0 @ x1 / (x0.norm() * x1.norm())))
    with torch.no_grad():
        out = block.residual(x)[0]
    o0, o1 = out[:, 0], out[:, 1]
    assert r.output_distance == pytest.approx(1 - float(o0 @ o1 / (o0.norm() * o1.norm())))
    m = block.attention_map(x)[0]  # (2, 2)
    m = m / m.sum(-1, keepdim=True)  # dot product / concatenation rows normalised to sum 1
    expected = 1 - float(m[0] @ m[1] / (m[0].norm() * m[1].norm()))
    assert r.attention_distance == pytest.approx(expected, abs=1e-12)
    assert r.as_dict()["attention_distance"] == r.attention_distance


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product"])
def test_queries_without_information_give_zero_attention_distance(pairwise: str) -> None:
    block = _randomize(NonLocal2d(16, 8, pairwise=pairwise))
    x = torch.randn(2, 16, 7, 6)
    random = query_independence(block, x, num_pairs=300, generator=torch.Generator().manual_seed(0))
    assert random.attention_distance > 0.1
    assert random.input_distance > 0.5
    with torch.no_grad():
        block.theta.weight.zero_()  # θ(x_i) = b_θ for every query i
    zeroed = query_independence(block, x, num_pairs=300, generator=torch.Generator().manual_seed(0))
    assert zeroed.attention_distance < 1e-10
    assert zeroed.output_distance < 1e-10  # same map, so the same y_i everywhere
    assert zeroed.input_distance == random.input_distance  # same pairs, same inputs


def test_extent_space_folds_frames() -> None:
    block = _randomize(NonLocal3d(8, 4, extent="space"))
    x = torch.randn(1, 8, 3, 5, 5)
    assert query_independence(block, x, num_pairs=100).attention_distance > 0.05
    with torch.no_grad():
        block.theta.weight.zero_()
    assert query_independence(block, x, num_pairs=100).attention_distance < 1e-10


@pytest.mark.parametrize(
    "block",
    [
        SimplifiedNonLocal(16, zero_init=False),
        GlobalContext(16, ratio=1 / 4, zero_init=False),
        GlobalContext(16, ratio=1 / 4, pooling="avg", fusion=("mul",), zero_init=False),
    ],
)
def test_global_context_blocks_are_query_independent(block) -> None:
    x = torch.randn(2, 16, 6, 6)
    r = query_independence(_randomize(block), x, num_pairs=200)
    assert r.attention_distance == 0.0 and r.output_distance == 0.0
    assert r.input_distance > 0.5


def test_asymmetric_blocks() -> None:
    apnb = _randomize(APNB(16, key_channels=8, value_channels=8), 0.5)
    x = torch.randn(2, 16, 9, 9)
    r = query_independence(apnb, x, num_pairs=200)
    assert r.attention_distance > 0.05 and r.output_distance > 0.0
    afnb = _randomize(AFNB(8, 16, 12, key_channels=8, value_channels=8), 0.5)
    low = torch.randn(2, 8, 12, 12)
    r2 = query_independence(afnb, (low, x), 200, torch.Generator().manual_seed(5))
    assert r2.attention_distance > 0.01
    # the input features are those of the queries (high), sampled the same way
    assert (
        r2.input_distance
        == query_independence(apnb, x, 200, torch.Generator().manual_seed(5)).input_distance
    )
    with torch.no_grad():
        afnb.f_query[0].weight.zero_()  # queries no longer depend on the position
    assert query_independence(afnb, (low, x), num_pairs=200).attention_distance < 1e-10


def test_fresh_nl_block_outputs_zero_everywhere() -> None:
    r = query_independence(NonLocal2d(8).eval(), torch.randn(1, 8, 4, 4), num_pairs=50)
    assert r.output_distance == 0.0  # BN gamma = 0: every output is the zero vector


def test_large_input_only_computes_sampled_rows() -> None:
    """N = 16384: the full map would be 1 GiB; only 2·chunk_pairs rows are ever asked for."""
    block = _randomize(NonLocal2d(8, 4), 0.3)
    x = torch.randn(1, 8, 128, 128)
    asked: list[int] = []
    original = block.attention_map

    def spy(*args, queries=None, **kwargs):
        asked.append(len(queries))
        return original(*args, queries=queries, **kwargs)

    block.attention_map = spy
    r = query_independence(block, x, num_pairs=100, chunk_pairs=32)
    assert asked == [64, 64, 64, 8]
    assert 0 < r.attention_distance < 2 and 0 < r.input_distance < 2


def test_reproducible_with_generator() -> None:
    block = _randomize(NonLocal2d(8, 4))
    x = torch.randn(2, 8, 6, 6)
    a = query_independence(block, x, 50, generator=torch.Generator().manual_seed(3))
    b = query_independence(block, x, 50, generator=torch.Generator().manual_seed(3))
    c = query_independence(block, x, 50, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"attention_map\(\) method .* got SqueezeExcite"):
        query_independence(SqueezeExcite(16), torch.randn(1, 16, 4, 4))
    block = NonLocal1d(4)
    with pytest.raises(ValueError, match="at least 2 query positions per sample, got N=1"):
        query_independence(block, torch.randn(2, 4, 1))
    with pytest.raises(ValueError, match="num_pairs must be a positive int, got 0"):
        query_independence(block, torch.randn(2, 4, 5), num_pairs=0)
    with pytest.raises(ValueError, match="chunk_pairs must be a positive int"):
        query_independence(block, torch.randn(2, 4, 5), chunk_pairs=-1)
    with pytest.raises(TypeError, match="tensor or a sequence of tensors"):
        query_independence(block, [1, 2])
