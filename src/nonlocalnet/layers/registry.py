"""Build any single-input block of the project by name, so backbones can take ``attn_layer=``.

    >>> block = create_block("gc", 256)                    # GlobalContext(256), 2d
    >>> block = create_block("nl_dot", 512, dims=3)        # NonLocal3d(512, pairwise="dot_product")
    >>> block = create_block("cca", 512)                   # CrissCrossAttention(512), R = 2
    >>> make = resolve_block("snl", dims=1)                # a constructor: make(channels) -> block

The successors of the NL block are registered too: ``"dnl"`` (disentangled non-local, mmseg's
DNLHead settings: embedded Gaussian, temperature 0.05, scaled logits), ``"dnl_dot"``,
``"cca"`` (criss-cross attention, two recurrent steps, q/k at C/8), ``"ema"`` (EMA unit,
K = 64 bases, T = 3 EM steps), ``"effattn"`` (efficient attention, one head, softmax
normalisation) and ``"nl_effattn"`` (the NL block with efficient attention as its pairwise
function).

Every block takes its channel count first and ``dims`` (1, 2 or 3) as a keyword. Keyword
arguments override the preset's defaults (``create_block("gc", 256, ratio=1/4)``).

:class:`~nonlocalnet.layers.asymmetric.AFNB` takes two inputs and two channel counts, so it is
not a preset; build it directly.

This module depends on torch alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from nonlocalnet.layers.asymmetric import APNB
from nonlocalnet.layers.criss_cross import CrissCrossAttention
from nonlocalnet.layers.dnl import DisentangledNonLocalNd
from nonlocalnet.layers.efficient_attention import EfficientAttention
from nonlocalnet.layers.ema import EMAU
from nonlocalnet.layers.global_context import GlobalContext, SimplifiedNonLocal, SqueezeExcite
from nonlocalnet.layers.nonlocal_block import NonLocalNd

__all__ = ["create_block", "list_blocks", "register_block", "resolve_block"]

BlockFactory = Callable[..., nn.Module]


def _preset(cls: type[nn.Module], **defaults: Any) -> BlockFactory:
    def make(channels: int, *, dims: int = 2, **kwargs: Any) -> nn.Module:
        return cls(channels, dims=dims, **{**defaults, **kwargs})

    make.__doc__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in defaults.items())})."
    return make


#: name -> factory(channels, *, dims=2, **kwargs), in the order :func:`list_blocks` gives.
_REGISTRY: dict[str, BlockFactory] = {
    "nl": _preset(NonLocalNd, pairwise="embedded_gaussian"),
    "nl_gaussian": _preset(NonLocalNd, pairwise="gaussian"),
    "nl_dot": _preset(NonLocalNd, pairwise="dot_product"),
    "nl_concat": _preset(NonLocalNd, pairwise="concatenation"),
    "nl_effattn": _preset(NonLocalNd, pairwise="efficient"),
    "snl": _preset(SimplifiedNonLocal),
    "gc": _preset(GlobalContext, ratio=1 / 16, pooling="att", fusion=("add",)),
    "gc_r4": _preset(GlobalContext, ratio=1 / 4, pooling="att", fusion=("add",)),
    "gc_mul": _preset(GlobalContext, ratio=1 / 16, pooling="att", fusion=("mul",)),
    "se": _preset(SqueezeExcite, ratio=1 / 16),
    "apnb": _preset(APNB),
    "dnl": _preset(DisentangledNonLocalNd, pairwise="embedded_gaussian"),
    "dnl_dot": _preset(DisentangledNonLocalNd, pairwise="dot_product"),
    "cca": _preset(CrissCrossAttention, recurrence=2),
    "ema": _preset(EMAU, num_bases=64, num_stages=3),
    "effattn": _preset(EfficientAttention, heads=1, normalization="softmax"),
}


def list_blocks() -> list[str]:
    """Names :func:`create_block` accepts."""
    return list(_REGISTRY)


def register_block(name: str, factory: BlockFactory, *, overwrite: bool = False) -> None:
    """Add a block under ``name``.

    Args:
        name: the registry name.
        factory: ``factory(channels, *, dims=2, **kwargs) -> nn.Module``.
        overwrite: replace an existing entry instead of raising.

    Raises:
        ValueError: ``name`` is taken and ``overwrite`` is False.
        TypeError: ``factory`` is not callable.
    """
    if not callable(factory):
        raise TypeError(f"register_block: factory must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_block: {name!r} is already registered")
    _REGISTRY[name] = factory


def create_block(name: str, channels: int, *, dims: int = 2, **kwargs: Any) -> nn.Module:
    """Build the block registered as ``name``.

    Args:
        name: one of :func:`list_blocks`.
        channels: the block's input channels.
        dims: number of dimensions after (B, C): 1, 2 or 3.
        **kwargs: constructor arguments; they override the preset's defaults.

    Returns:
        The block.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a bad argument.
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"create_block: name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown block {name!r}; known blocks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](channels, dims=dims, **kwargs)


def resolve_block(spec: str | type[nn.Module] | BlockFactory, **defaults: Any) -> BlockFactory:
    """A constructor ``make(channels, **kwargs)`` from a name, a class or a callable (timm-style).

    Args:
        spec: a registry name (built with :func:`create_block`), or a class / callable taking the
            channel count first (returned as is, or with ``defaults`` bound).
        **defaults: keyword arguments bound into the constructor (e.g. ``dims=3`` for a name;
            a class receives them as they are).

    Returns:
        A callable building the block from its channel count.

    Raises:
        ValueError: unknown name.
        TypeError: ``spec`` is neither a string nor callable.
    """
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(f"unknown block {spec!r}; known blocks: {', '.join(_REGISTRY)}")
        return functools.partial(create_block, spec, **defaults)
    if callable(spec):
        return functools.partial(spec, **defaults) if defaults else spec
    raise TypeError(
        f"resolve_block: expected a block name, class or callable, got {type(spec).__name__}"
    )
