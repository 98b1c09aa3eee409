"""create_block / list_blocks / resolve_block."""

from __future__ import annotations

import functools

import pytest
import torch

from nonlocalnet import (
    APNB,
    GlobalContext,
    NonLocal2d,
    NonLocalNd,
    SimplifiedNonLocal,
    SqueezeExcite,
)
from nonlocalnet.layers.registry import create_block, list_blocks, register_block, resolve_block

REQUIRED = ["nl", "nl_gaussian", "nl_dot", "nl_concat", "snl", "gc", "gc_mul", "se", "apnb"]


def test_list_blocks_names_the_required_blocks() -> None:
    names = list_blocks()
    assert set(REQUIRED) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "pairwise"),
    [
        ("nl", "embedded_gaussian"),
        ("nl_gaussian", "gaussian"),
        ("nl_dot", "dot_product"),
        ("nl_concat", "concatenation"),
    ],
)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_nl_presets(name, pairwise, dims) -> None:
    block = create_block(name, 16, dims=dims)
    assert isinstance(block, NonLocalNd) and block.dims == dims
    assert block.pairwise == pairwise and block.channels == 16
    x = torch.randn(2, 16, *([3] * dims))
    assert torch.equal(block(x), x)  # a fresh block is the identity


def test_other_presets() -> None:
    gc = create_block("gc", 64)
    assert isinstance(gc, GlobalContext)
    assert (gc.ratio, gc.pooling, gc.fusion, gc.planes, gc.dims) == (1 / 16, "att", ("add",), 4, 2)
    gc_mul = create_block("gc_mul", 64, dims=1)
    assert gc_mul.fusion == ("mul",) and gc_mul.dims == 1 and gc_mul.transform_add is None
    assert create_block("gc_r4", 64).planes == 16
    snl = create_block("snl", 8, dims=3)
    assert isinstance(snl, SimplifiedNonLocal) and snl.dims == 3
    se = create_block("se", 64)
    assert isinstance(se, SqueezeExcite) and se.planes == 4
    apnb = create_block("apnb", 32, key_channels=8, value_channels=8)
    assert isinstance(apnb, APNB) and apnb.key_channels == 8 and apnb.share_query_key
    x = torch.randn(1, 32, 5, 5)
    assert apnb.attention_map(x).shape == (1, 25, 110)


def test_kwargs_override_preset_defaults() -> None:
    gc = create_block("gc", 64, ratio=1 / 4, fusion=("mul", "add"), impl="reference")
    assert gc.planes == 16 and gc.fusion == ("mul", "add") and gc.impl == "reference"
    nl = create_block("nl", 16, inner_channels=4, sub_sample=True, dims=3, extent="space")
    assert nl.inner_channels == 4 and nl.sub_sample and nl.extent == "space"


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown block 'foo'; known blocks: nl, nl_gaussian"):
        create_block("foo", 8)
    with pytest.raises(TypeError, match="name must be a str"):
        create_block(GlobalContext, 8)
    with pytest.raises(ValueError, match="unknown dims 4"):
        create_block("nl", 8, dims=4)
    with pytest.raises(ValueError, match="unknown dims 0"):
        create_block("gc", 32, dims=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        create_block("snl", 8, nonsense=1)


def test_resolve_block() -> None:
    make = resolve_block("gc", dims=1)
    block = make(32)
    assert isinstance(block, GlobalContext) and block.dims == 1
    assert resolve_block(SqueezeExcite) is SqueezeExcite
    made = resolve_block(GlobalContext, ratio=1 / 4)(32)
    assert made.planes == 8
    partial = functools.partial(GlobalContext, fusion=("mul",))
    assert resolve_block(partial)(32).fusion == ("mul",)
    assert isinstance(resolve_block(lambda c: NonLocal2d(c))(8), NonLocal2d)
    with pytest.raises(ValueError, match="unknown block 'nope'"):
        resolve_block("nope")
    with pytest.raises(TypeError, match="expected a block name, class or callable, got int"):
        resolve_block(3)


def test_register_block() -> None:
    register_block(
        "test_se_r4", lambda c, *, dims=2, **kw: SqueezeExcite(c, 1 / 4, dims=dims, **kw)
    )
    try:
        assert "test_se_r4" in list_blocks()
        assert create_block("test_se_r4", 32, dims=3).planes == 8
        with pytest.raises(ValueError, match="already registered"):
            register_block("test_se_r4", SqueezeExcite)
        with pytest.raises(TypeError, match="must be callable"):
            register_block("x", 3, overwrite=True)
    finally:
        from nonlocalnet.layers import registry

        registry._REGISTRY.pop("test_se_r4", None)


def test_presets_take_the_peer_options() -> None:
    """The options converters need pass through the presets: floor sub-sampling (NL peers),
    LayerNorm eps 1e-6 (timm's GlobalContext)."""
    nl = create_block("nl", 8, sub_sample=True, sub_sample_rounding="floor")
    assert nl.sub_sample_rounding == "floor"
    _, k, _ = nl.embed(torch.randn(1, 8, 7, 9))
    assert k.shape[1] == 3 * 4  # floor: ⌊7/2⌋·⌊9/2⌋ keys
    assert create_block("nl_dot", 8, sub_sample=True).layout((7, 9)).num_keys == 4 * 5
    gc = create_block("gc_mul", 32, norm_eps=1e-6)
    assert gc.transform_mul[1].eps == 1e-6
    with pytest.raises(ValueError, match="GlobalContext: norm_eps must be a positive number"):
        create_block("gc", 32, norm_eps=-1.0)
    with pytest.raises(ValueError, match="NonLocalNd: unknown sub_sample_rounding 'up'"):
        create_block("nl", 8, sub_sample_rounding="up")


@pytest.mark.parametrize(
    ("name", "cls", "attrs"),
    [
        ("dnl", "DisentangledNonLocalNd", {"pairwise": "embedded_gaussian", "temperature": 0.05}),
        ("dnl_dot", "DisentangledNonLocalNd", {"pairwise": "dot_product"}),
        ("cca", "CrissCrossAttention", {"recurrence": 2}),
        ("ema", "EMAU", {"num_bases": 64, "num_stages": 3}),
        ("effattn", "EfficientAttention", {"heads": 1, "normalization": "softmax"}),
        ("nl_effattn", "NonLocalNd", {"pairwise": "efficient"}),
    ],
)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_successor_presets(name, cls, attrs, dims) -> None:
    """The successors build by name, exported at the top level, and start as the identity
    (EMA: its residual branch starts at 0, then a ReLU: ReLU(x))."""
    import nonlocalnet

    block = create_block(name, 16, dims=dims)
    assert type(block).__name__ == cls and isinstance(block, getattr(nonlocalnet, cls))
    for key, value in attrs.items():
        assert getattr(block, key) == value, key
    assert block.dims == dims
    x = torch.randn(2, 16, *([4] * dims))
    want = torch.relu(x) if name == "ema" else x
    assert torch.allclose(block(x), want, rtol=0, atol=1e-6)
    assert name in list_blocks()
