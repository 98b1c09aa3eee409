"""Every peer of our blocks: how to build it, which options of ours match it, the weight map.

A :class:`BlockSpec` says what a benchmark row computes (block kind, widths, input shape). For a
spec, :func:`build_ours` builds our block (random, non-zero weights: the branch is never the
identity) and each :class:`Peer` builds its own module, names the options of our block under which
both compute the same function (scale convention, pooling position), and maps our state dict onto
its own (:func:`copy_weights`: every key of the peer is written, every key of ours is used or
named as dropped, so a forgotten parameter fails loudly).

Peers (name: source):

* NL, ``mmcv``: ``mmcv.cnn.NonLocal{1,2,3}d`` of mmcv-lite (package).
* NL, ``alexhex7``: stand-in :mod:`peers.alexhex7` (AlexHex7/Non-local_pytorch, not on PyPI).
* NL, ``timm``: ``timm.layers.NonLocalAttn`` (package; 2d only, 3d inputs run on the
  (T·H, W) view, which for attention over all positions without sub-sampling is the same
  function).
* NL, ``slowfast``: ``slowfast.models.nonlocal_helper.Nonlocal`` when that package is importable,
  else the stand-in :mod:`peers.slowfast` (3d only: 2d inputs run as T = 1 videos).
* NL, ``pytorchvideo``: ``pytorchvideo.layers.nonlocal_net.create_nonlocal`` (package; 3d only).
* GC, ``mmcv``: ``mmcv.cnn.ContextBlock`` (package). GC, ``timm``: ``timm.layers.GlobalContext``.
* APNB, ``ann``: stand-in :mod:`peers.ann` (MendelXu/ANN ``models/seg/utils/apnb.py``).

Every NL peer max-pools with floor rounding, ours with ceil rounding: the rows use even sizes,
where both agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet import APNB, GlobalContext, NonLocalNd

__all__ = [
    "KINDS",
    "PEERS",
    "BlockSpec",
    "Peer",
    "build_ours",
    "copy_weights",
    "corrupt_weights",
    "find_peer",
    "peers_for",
    "randomise",
    "unwrap",
]

KINDS = ("nl", "gc", "apnb")


@dataclass(frozen=True)
class BlockSpec:
    """What a block row computes.

    Attributes:
        kind: ``"nl"``, ``"gc"`` or ``"apnb"``.
        channels: C.
        size: spatial size of the input; its length is the number of dims (2: images, 3: video).
        batch: batch size.
        inner_channels: NL width C'; APNB key and value width.
        pairwise: NL pairwise function (the mmcv peer takes all four; the others the two
            Gaussian forms).
        sub_sample: NL max-pooling of the key/value side (1×2×2 in 3d, 2×2 in 2d).
        ratio: GC bottleneck ratio.
        dropout: APNB dropout after the fusion.
    """

    kind: str
    channels: int
    size: tuple[int, ...]
    batch: int = 1
    inner_channels: int = 0
    pairwise: str = "embedded_gaussian"
    sub_sample: bool = False
    ratio: float = 1 / 16
    dropout: float = 0.05

    @property
    def dims(self) -> int:
        """Number of spatial dims of the input."""
        return len(self.size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(B, C, *size)``."""
        return (self.batch, self.channels, *self.size)

    @property
    def positions(self) -> int:
        """N, the number of positions of one input."""
        return math.prod(self.size)


@dataclass(frozen=True)
class Peer:
    """One other implementation of a block kind.

    Attributes:
        name: short name (``"mmcv"``, ``"timm"``, ...), unique within a kind.
        kind: the block kind it implements.
        describe: the code it runs (package and version, or stand-in and commit).
        unsupported: why it cannot compute a spec (None when it can).
        ours_options: keywords of our block's constructor that make it the same function.
        build: the peer's module, taking our input layout (wrapped in :class:`_Reshaped` when the
            peer needs another number of dims).
        rules: ``(peer key prefix, our key prefix)`` pairs, tried in order.
        notes: the weight-mapping facts, for the report.
        prepare_ours: weight-level changes of ours that make the functions equal (zeroing a
            parameter the peer does not have, an eps); they do not change what ours computes
            per pass, so ours' own timing cases do not apply them.
        dropped: our keys the peer has no counterpart for (made neutral by ``prepare_ours``).
        transform: ``(peer key, our value, spec) -> value`` for keys that need more than a
            reshape (a scale convention).
    """

    name: str
    kind: str
    describe: Callable[[], str]
    unsupported: Callable[[BlockSpec], str | None]
    ours_options: Callable[[BlockSpec], dict[str, Any]]
    build: Callable[[BlockSpec], nn.Module]
    rules: Callable[[BlockSpec], Sequence[tuple[str, str]]]
    notes: str
    prepare_ours: Callable[[nn.Module, BlockSpec], None] | None = None
    dropped: Sequence[str] = field(default_factory=tuple)
    transform: Callable[[str, Tensor, BlockSpec], Tensor] | None = None


class _Reshaped(nn.Module):
    """A peer block run on another view of our input.

    ``"as_2d"``: ``(B, C, T, H, W)`` → ``(B, C, T·H, W)`` (attention over all positions without
    sub-sampling does not depend on how they are arranged). ``"as_3d"``: ``(B, C, H, W)`` →
    ``(B, C, 1, H, W)``.
    """

    def __init__(self, block: nn.Module, view: str) -> None:
        super().__init__()
        if view not in ("as_2d", "as_3d"):
            raise ValueError(f"_Reshaped: view must be 'as_2d' or 'as_3d', got {view!r}")
        self.block = block
        self.view = view

    def forward(self, x: Tensor) -> Tensor:
        if self.view == "as_2d":
            b, c, t, h, w = x.shape
            y = self.block(x.reshape(b, c, t * h, w))  # (B, C, T·H, W)
            return y.reshape(b, c, t, h, w)  # (B, C, T, H, W)
        return self.block(x.unsqueeze(2)).squeeze(2)  # via (B, C, 1, H, W)


def unwrap(module: nn.Module) -> nn.Module:
    """The peer's own module inside a :class:`_Reshaped` view (or the module itself)."""
    return module.block if isinstance(module, _Reshaped) else module


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


# -- our blocks -----------------------------------------------------------------------------------


def build_ours(spec: BlockSpec, options: dict[str, Any] | None = None) -> nn.Module:
    """Our block for ``spec`` (its default ``impl``, zero_init off), with the peer-matching
    ``options`` (which may name an ``impl``)."""
    options = dict(options or {})
    if spec.kind == "nl":
        return NonLocalNd(
            spec.channels,
            spec.inner_channels,
            pairwise=spec.pairwise,
            sub_sample=spec.sub_sample,
            zero_init=False,
            dims=spec.dims,
            **options,
        )
    if spec.kind == "gc":
        return GlobalContext(
            spec.channels,
            spec.ratio,
            pooling="att",
            fusion=("add",),
            zero_init=False,
            dims=spec.dims,
            **options,
        )
    if spec.kind == "apnb":
        return APNB(
            spec.channels,
            spec.channels,
            key_channels=spec.inner_channels,
            value_channels=spec.inner_channels,
            dropout=spec.dropout,
            zero_init=False,
            dims=spec.dims,
            **options,
        )
    raise ValueError(f"build_ours: kind must be one of {KINDS}, got {spec.kind!r}")


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights, the same for every process that builds the same block with ``seed``.

    Convolutions: weight ~ N(0, 1/fan_in), bias ~ N(0, 0.01). Norms: weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.01), BatchNorm running mean ~ N(0, 0.01) and variance ~ U(0.5, 1.5) (so that
    eval mode is not the identity either). An NL block whose embedded-Gaussian logits are not
    scaled (``scale == 1``) gets θ and φ scaled by C'^-1/4 each, so its logits have the spread
    of the scaled form's: unscaled logits of random weights would make the softmax one-hot and
    its tail denormal floats, whose arithmetic is many times slower and would dominate both
    sides' times.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    def uniform(t: Tensor, lo: float, hi: float) -> None:
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))

    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            normal(m.weight, m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                normal(m.bias, 0.1)
        elif isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                uniform(m.weight, 0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                normal(m.bias, 0.1)
            if getattr(m, "running_mean", None) is not None:
                normal(m.running_mean, 0.1)
                uniform(m.running_var, 0.5, 1.5)
    nl = isinstance(module, NonLocalNd) and module.pairwise == "embedded_gaussian"
    if nl and module.scale == 1.0:
        gain = module.inner_channels**-0.25
        for conv in (module.theta, module.phi):
            conv.weight.mul_(gain)
            conv.bias.mul_(gain)


# -- weight copy ----------------------------------------------------------------------------------


def _map_key(peer: Peer, spec: BlockSpec, key: str) -> str:
    for peer_prefix, our_prefix in peer.rules(spec):
        if key.startswith(peer_prefix):
            return our_prefix + key[len(peer_prefix) :]
    raise KeyError(f"{peer.kind}/{peer.name}: no rule maps the peer's key {key!r}")


@torch.no_grad()
def copy_weights(ours: nn.Module, peer_module: nn.Module, peer: Peer, spec: BlockSpec) -> None:
    """Write our block's parameters and buffers into the peer's module.

    Every key of the peer's state dict is written (``load_state_dict(strict=True)``); every key of
    ours is used or in ``peer.dropped``.

    Raises:
        KeyError: a peer key without a rule or without our counterpart, or an unused key of ours.
        ValueError: sizes that do not match.
    """
    if peer.prepare_ours is not None:
        peer.prepare_ours(ours, spec)
    src = ours.state_dict()
    target = unwrap(peer_module)
    new: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, value in target.state_dict().items():
        our_key = _map_key(peer, spec, key)
        if our_key not in src:
            raise KeyError(
                f"{peer.kind}/{peer.name}: the peer's {key!r} maps to {our_key!r}, "
                "which our block does not have"
            )
        v = src[our_key]
        if peer.transform is not None:
            v = peer.transform(key, v, spec)
        if v.numel() != value.numel():
            raise ValueError(
                f"{peer.kind}/{peer.name}: {key!r} has shape {tuple(value.shape)}, "
                f"our {our_key!r} has {tuple(v.shape)}"
            )
        new[key] = v.reshape(value.shape).to(value.dtype).clone()
        used.add(our_key)
    unused = sorted(set(src) - used - set(peer.dropped))
    if unused:
        raise KeyError(f"{peer.kind}/{peer.name}: our {unused} have no counterpart in the peer")
    target.load_state_dict(new, strict=True)


@torch.no_grad()
def corrupt_weights(module: nn.Module, seed: int = 1) -> str:
    """A deliberately wrong copy: noise of 1% of its spread on the first weight matrix.

    Returns:
        The name of the parameter changed.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in unwrap(module).named_parameters():
        if p.dim() >= 2:
            p.add_(torch.randn(p.shape, generator=gen) * 0.01 * p.std())
            return name
    raise ValueError("corrupt_weights: the module has no weight matrix")


# -- the peers ------------------------------------------------------------------------------------


def _nl_unsupported(
    pairwise: Sequence[str], dims: Sequence[int], sub_sample: bool, who: str
) -> Callable[[BlockSpec], str | None]:
    def check(spec: BlockSpec) -> str | None:
        if spec.pairwise not in pairwise:
            return f"{who} has no {spec.pairwise} form"
        if spec.dims not in dims:
            return f"{who} takes no {spec.dims}d input"
        if spec.sub_sample and not sub_sample:
            return f"{who} has no sub-sampling"
        return None

    return check


def _position(position: str) -> Callable[[BlockSpec], dict[str, Any]]:
    """Our ``sub_sample_position`` when the spec sub-samples (nothing otherwise)."""
    return lambda spec: {"sub_sample_position": position} if spec.sub_sample else {}


def _build_mmcv_nl(spec: BlockSpec) -> nn.Module:
    from mmcv.cnn import NonLocal1d, NonLocal2d, NonLocal3d

    cls = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}[spec.dims]
    if spec.channels % spec.inner_channels:
        raise ValueError(f"mmcv: C' = C / reduction; {spec.channels} / {spec.inner_channels}")
    block = cls(
        spec.channels,
        sub_sample=spec.sub_sample,
        reduction=spec.channels // spec.inner_channels,
        use_scale=True,
        norm_cfg={"type": f"BN{spec.dims}d"},
        mode=spec.pairwise,
    )
    if block.inter_channels != spec.inner_channels:
        raise ValueError(f"mmcv: inter_channels {block.inter_channels} != {spec.inner_channels}")
    return block


def _zero_conv_out_bias(ours: nn.Module, spec: BlockSpec) -> None:
    ours.conv_out.bias.zero_()


MMCV_NL = Peer(
    name="mmcv",
    kind="nl",
    describe=lambda: f"mmcv-lite {_version('mmcv-lite', 'mmcv')} (package): mmcv.cnn.NonLocalNd",
    unsupported=_nl_unsupported(
        ("embedded_gaussian", "gaussian", "dot_product", "concatenation"), (1, 2, 3), True, "mmcv"
    ),
    ours_options=_position("after"),
    build=_build_mmcv_nl,
    rules=lambda spec: [
        ("concat_project.conv.", "concat_project."),
        ("g.0.conv.", "g."),
        ("g.conv.", "g."),
        ("theta.conv.", "theta."),
        ("phi.0.conv.", "phi."),
        ("phi.conv.", "phi."),
        ("conv_out.conv.", "conv_out."),
        ("conv_out.bn.", "norm."),
    ],
    notes=(
        "NonLocal{d}d(C, reduction=C/C', use_scale=True, norm_cfg=BN{d}d, mode, sub_sample): "
        "embedded logits x C'^-1/2 = our default (gaussian unscaled in both); pools after "
        "phi/g (ours: sub_sample_position='after'), floor rounding (even sizes); conv_out has "
        "no bias before its BN: our conv_out.bias is zeroed; dot product and concatenation "
        "divide by the number of keys as ours (its concatenation materialises the "
        "(B, 2C', N, M) pair features); keys g[.0].conv, theta.conv, phi[.0].conv, "
        "concat_project.conv, conv_out.conv, conv_out.bn <- g, theta, phi, concat_project, "
        "conv_out, norm"
    ),
    prepare_ours=_zero_conv_out_bias,
    dropped=("conv_out.bias",),
)


def _alexhex7_options(spec: BlockSpec) -> dict[str, Any]:
    options = _position("after")(spec)
    if spec.pairwise == "embedded_gaussian":
        options["use_scale"] = False
    return options


def _build_alexhex7(spec: BlockSpec) -> nn.Module:
    from peers import alexhex7

    return alexhex7.make_block(
        spec.pairwise, spec.channels, spec.inner_channels, spec.dims, spec.sub_sample
    )


ALEXHEX7 = Peer(
    name="alexhex7",
    kind="nl",
    describe=lambda: "stand-in benchmarks/peers/alexhex7.py (AlexHex7/Non-local_pytorch ec15789)",
    unsupported=_nl_unsupported(("embedded_gaussian", "gaussian"), (1, 2, 3), True, "AlexHex7"),
    ours_options=_alexhex7_options,
    build=_build_alexhex7,
    rules=lambda spec: [
        ("g.0.", "g."),
        ("g.", "g."),
        ("theta.", "theta."),
        ("phi.0.", "phi."),
        ("phi.", "phi."),
        ("W.0.", "conv_out."),
        ("W.1.", "norm."),
    ],
    notes=(
        "NONLocalBlock{d}D(C, C', sub_sample, bn_layer=True): no logit scale (ours: "
        "use_scale=False for embedded; gaussian unscaled in both); pools after phi/g "
        "(sub_sample_position='after'), floor rounding (even sizes); keys g[.0], theta, "
        "phi[.0], W.0, W.1 <- g, theta, phi, conv_out, norm"
    ),
)


def _build_timm_nl(spec: BlockSpec) -> nn.Module:
    from timm.layers import NonLocalAttn

    block = NonLocalAttn(spec.channels, use_scale=True, rd_channels=spec.inner_channels)
    return _Reshaped(block, "as_2d") if spec.dims == 3 else block


def _timm_theta(key: str, value: Tensor, spec: BlockSpec) -> Tensor:
    """timm scales the logits by C^-1/2, ours by C'^-1/2: its t = θ·√(C/C')."""
    if key.startswith("t."):
        return value * math.sqrt(spec.channels / spec.inner_channels)
    return value


TIMM_NL = Peer(
    name="timm",
    kind="nl",
    describe=lambda: f"timm {_version('timm')} (package): timm.layers.NonLocalAttn",
    unsupported=_nl_unsupported(("embedded_gaussian",), (2, 3), False, "timm's NonLocalAttn"),
    ours_options=lambda spec: {},
    build=_build_timm_nl,
    rules=lambda spec: [
        ("t.", "theta."),
        ("p.", "phi."),
        ("g.", "g."),
        ("z.", "conv_out."),
        ("norm.", "norm."),
    ],
    notes=(
        "NonLocalAttn(C, use_scale=True, rd_channels=C'): logits x C^-1/2 (input width) vs our "
        "C'^-1/2: t = theta x sqrt(C/C') (weight and bias); no sub-sampling; 2d only (3d rows "
        "run on the (T*H, W) view); keys t, p, g, z, norm <- theta, phi, g, conv_out, norm"
    ),
    transform=_timm_theta,
)


def _build_slowfast(spec: BlockSpec) -> nn.Module:
    from peers import slowfast

    block = slowfast.make_block(
        spec.channels, spec.inner_channels, [1, 2, 2] if spec.sub_sample else None
    )
    return _Reshaped(block, "as_3d") if spec.dims == 2 else block


def _describe_slowfast() -> str:
    from peers import slowfast

    return slowfast.source()


_VIDEO_NOTES = (
    "softmax logits x C'^-1/2 = our default; pool_size [1, 2, 2] max-pools x before phi/g "
    "(ours: sub_sample_position='before'), floor rounding (even sizes); 3d only (2d rows run "
    "as T = 1 videos); conv_out keeps its bias before the BN"
)

SLOWFAST = Peer(
    name="slowfast",
    kind="nl",
    describe=_describe_slowfast,
    unsupported=_nl_unsupported(("embedded_gaussian",), (2, 3), True, "SlowFast's Nonlocal"),
    ours_options=_position("before"),
    build=_build_slowfast,
    rules=lambda spec: [
        ("conv_theta.", "theta."),
        ("conv_phi.", "phi."),
        ("conv_g.", "g."),
        ("conv_out.", "conv_out."),
        ("bn.", "norm."),
    ],
    notes=(
        "Nonlocal(C, C', pool_size, instantiation='softmax'): "
        + _VIDEO_NOTES
        + "; keys conv_theta, conv_phi, conv_g, conv_out, bn <- theta, phi, g, conv_out, norm"
    ),
)


def _build_pytorchvideo(spec: BlockSpec) -> nn.Module:
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    block = create_nonlocal(
        dim_in=spec.channels,
        dim_inner=spec.inner_channels,
        pool_size=(1, 2, 2) if spec.sub_sample else None,
        instantiation="softmax",
        norm=nn.BatchNorm3d,
    )
    return _Reshaped(block, "as_3d") if spec.dims == 2 else block


PYTORCHVIDEO = Peer(
    name="pytorchvideo",
    kind="nl",
    describe=lambda: (
        f"pytorchvideo {_version('pytorchvideo')} (package): "
        "pytorchvideo.layers.nonlocal_net.create_nonlocal"
    ),
    unsupported=_nl_unsupported(("embedded_gaussian",), (2, 3), True, "pytorchvideo's NonLocal"),
    ours_options=_position("before"),
    build=_build_pytorchvideo,
    rules=lambda spec: [
        ("conv_theta.", "theta."),
        ("conv_phi.", "phi."),
        ("conv_g.", "g."),
        ("conv_out.", "conv_out."),
        ("norm.", "norm."),
    ],
    notes=(
        "create_nonlocal(dim_in=C, dim_inner=C', pool_size, instantiation='softmax', "
        "norm=BatchNorm3d): "
        + _VIDEO_NOTES
        + "; keys conv_theta, conv_phi, conv_g, conv_out, norm <- theta, phi, g, conv_out, norm"
    ),
)


def _gc_unsupported(who: str) -> Callable[[BlockSpec], str | None]:
    return lambda spec: None if spec.dims == 2 else f"{who} takes 2d input only"


def _build_mmcv_gc(spec: BlockSpec) -> nn.Module:
    from mmcv.cnn import ContextBlock

    return ContextBlock(spec.channels, spec.ratio, "att", ("channel_add",))


MMCV_GC = Peer(
    name="mmcv",
    kind="gc",
    describe=lambda: f"mmcv-lite {_version('mmcv-lite', 'mmcv')} (package): mmcv.cnn.ContextBlock",
    unsupported=_gc_unsupported("mmcv's ContextBlock"),
    ours_options=lambda spec: {},
    build=_build_mmcv_gc,
    rules=lambda spec: [("conv_mask.", "conv_mask."), ("channel_add_conv.", "transform_add.")],
    notes=(
        "ContextBlock(C, ratio, 'att', ('channel_add',)): int(C*ratio) planes, LayerNorm eps "
        "1e-5 as ours; keys conv_mask, channel_add_conv.{0,1,3} <- conv_mask, "
        "transform_add.{0,1,3}"
    ),
)


def _build_timm_gc(spec: BlockSpec) -> nn.Module:
    from timm.layers import GlobalContext as TimmGlobalContext

    return TimmGlobalContext(
        spec.channels,
        use_attn=True,
        fuse_add=True,
        fuse_scale=False,
        rd_channels=int(spec.channels * spec.ratio),
    )


def _timm_gc_eps(ours: nn.Module, spec: BlockSpec) -> None:
    ours.transform_add[1].eps = 1e-6


TIMM_GC = Peer(
    name="timm",
    kind="gc",
    describe=lambda: f"timm {_version('timm')} (package): timm.layers.GlobalContext",
    unsupported=_gc_unsupported("timm's GlobalContext"),
    ours_options=lambda spec: {},
    build=_build_timm_gc,
    rules=lambda spec: [
        ("conv_attn.", "conv_mask."),
        ("mlp_add.fc1.", "transform_add.0."),
        ("mlp_add.norm.", "transform_add.1."),
        ("mlp_add.fc2.", "transform_add.3."),
    ],
    notes=(
        "GlobalContext(C, use_attn=True, fuse_add=True, fuse_scale=False, "
        "rd_channels=int(C*ratio)) ('gca'; timm's default 'gc' is the sigmoid scale): "
        "LayerNorm2d eps 1e-6 (ours set to 1e-6), its weight (C',) <- ours (C', 1, 1); keys "
        "conv_attn, mlp_add.fc1/norm/fc2 <- conv_mask, transform_add.0/1/3"
    ),
    prepare_ours=_timm_gc_eps,
)


def _build_ann(spec: BlockSpec) -> nn.Module:
    from peers import ann

    if spec.dims != 2:
        raise ValueError(f"ann: 2d input only, got {spec.dims}d")
    return ann.APNB(
        spec.channels,
        spec.channels,
        spec.inner_channels,
        spec.inner_channels,
        dropout=spec.dropout,
    )


ANN = Peer(
    name="ann",
    kind="apnb",
    describe=lambda: "stand-in benchmarks/peers/ann.py (MendelXu/ANN f4eabeb)",
    unsupported=lambda spec: None if spec.dims == 2 else "the official APNB takes 2d input only",
    ours_options=lambda spec: {},
    build=_build_ann,
    rules=lambda spec: [
        ("stages.0.f_key.0.", "f_key.0."),
        ("stages.0.f_key.1.0.", "f_key.1."),
        ("stages.0.f_query.0.", "f_query.0."),
        ("stages.0.f_query.1.0.", "f_query.1."),
        ("stages.0.f_value.", "f_value."),
        ("stages.0.W.", "conv_out."),
        ("conv_bn_dropout.0.", "fusion.0."),
        ("conv_bn_dropout.1.0.", "fusion.1."),
    ],
    notes=(
        "APNB(C, C, K, V, dropout, sizes=[1], norm_type='batchnorm'): logits x K^-1/2 as ours; "
        "query and key share f_key (applied twice there, once here); bins (1, 3, 6, 8); keys "
        "stages.0.{f_key.0, f_key.1.0, f_query.*, f_value, W}, conv_bn_dropout.{0, 1.0} <- "
        "f_key.{0,1}, f_query.*, f_value, conv_out, fusion.{0,1}"
    ),
)

#: Peers per block kind, in table order.
PEERS: dict[str, tuple[Peer, ...]] = {
    "nl": (MMCV_NL, ALEXHEX7, TIMM_NL, SLOWFAST, PYTORCHVIDEO),
    "gc": (MMCV_GC, TIMM_GC),
    "apnb": (ANN,),
}


def peers_for(spec: BlockSpec) -> list[Peer]:
    """The peers that can compute ``spec``, in table order."""
    return [p for p in PEERS[spec.kind] if p.unsupported(spec) is None]


def find_peer(kind: str, name: str) -> Peer:
    """The peer ``name`` of block kind ``kind``.

    Raises:
        ValueError: no such peer.
    """
    for p in PEERS.get(kind, ()):
        if p.name == name:
            return p
    names = [p.name for p in PEERS.get(kind, ())]
    raise ValueError(f"no {kind!r} peer named {name!r}; expected one of {names}")
