"""Residual networks for images (2D) and videos (3D), with torchvision's state_dict keys.

One :class:`ResNet` class serves both: ``dims=2`` builds torchvision's ResNet (same module names
and parameter shapes: ``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...,
``fc``), so a torchvision checkpoint loads with ``strict=True``; ``dims=3`` builds the video
ResNets of Wang et al. (C2D, I3D; see :mod:`nonlocalnet.models.video_resnet`) with the same
keys, so inflating a 2D checkpoint is a per-key operation.

Attention blocks are added after construction (:mod:`nonlocalnet.models.builders`,
:mod:`nonlocalnet.models.placement`), so the backbone's initialisation never touches their
zero-initialised layers. A bottleneck has an
optional ``gc`` submodule (GCNet: after ``bn3``, before the residual addition); it is ``None``
until a block is placed there, and then adds ``layerN.i.gc.*`` keys only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nonlocalnet._checks import check_choice, is_tracing
from nonlocalnet.layers._dims import BATCH_NORM, CONV

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "FrozenBatchNorm",
    "ResNet",
]

#: torchvision's depths.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

#: the papers' stage names (res2..res5 in NL, c2..c5 in GCNet) of ``layer1``..``layer4``.
STAGE_NAMES = ("res2", "res3", "res4", "res5")

NORMS = ("bn", "frozen_bn")


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (all buffers).

    Same state_dict keys as ``nn.BatchNorm2d/3d`` except ``num_batches_tracked``, which is
    accepted and ignored when loading (as torchvision's ``FrozenBatchNorm2d``).

    Args:
        num_features: channels C.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """y = (x - mean) / sqrt(var + eps) · weight + bias, per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (1, C, 1, ...) to broadcast over (B, C, *S)
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _norm(norm: str, dims: int, channels: int) -> nn.Module:
    return FrozenBatchNorm(channels) if norm == "frozen_bn" else BATCH_NORM[dims](channels)


def _conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    temporal_kernel: int = 1,
    temporal_stride: int = 1,
) -> nn.Module:
    """A k×k (2D) or t×k×k (3D) convolution without bias, 'same' padding."""
    pad = dilation * (kernel - 1) // 2
    if dims == 2:
        if temporal_kernel != 1 or temporal_stride != 1:
            raise ValueError(
                f"a 2D ResNet has no time axis: temporal kernel/stride must be 1, got "
                f"{temporal_kernel}/{temporal_stride}"
            )
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
    return nn.Conv3d(
        in_channels,
        out_channels,
        (temporal_kernel, kernel, kernel),
        stride=(temporal_stride, stride, stride),
        padding=(temporal_kernel // 2, pad, pad),
        dilation=(1, dilation, dilation),
        groups=groups,
        bias=False,
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34).

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: spatial stride of ``conv1``.
        downsample: projection of the shortcut, or None.
        groups: must be 1.
        base_width: must be 64.
        dilation: dilation of both convolutions.
        norm: ``"bn"`` or ``"frozen_bn"``.
        dims: 2 (images) or 3 (videos).
        temporal_kernel: temporal size of ``conv1`` (3D only; 3 inflates it).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: str = "bn",
        *,
        dims: int = 2,
        temporal_kernel: int = 1,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock supports groups=1 and base_width=64, got {groups} and {base_width}"
            )
        self.conv1 = _conv(
            dims,
            inplanes,
            planes,
            3,
            stride=stride,
            dilation=dilation,
            temporal_kernel=temporal_kernel,
        )
        self.bn1 = _norm(norm, dims, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(dims, planes, planes, 3, dilation=dilation)
        self.bn2 = _norm(norm, dims, planes)
        self.downsample = downsample
        self.stride = stride
        self.gc: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.gc is not None:
            out = self.gc(out)
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        """The norm whose gamma ``zero_init_residual`` zeroes."""
        return self.bn2


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 bottleneck with a residual connection (ResNet-50/101/152).

    Stride on the 3×3 convolution (torchvision's "ResNet v1.5"). ``gc``, when set, runs after
    ``conv3``/``bn3`` and before the residual addition (GCNet's placement).

    Args:
        inplanes: input channels.
        planes: width of the bottleneck; the output has ``planes * 4`` channels.
        stride: spatial stride of ``conv2``.
        downsample: projection of the shortcut, or None.
        groups: groups of ``conv2`` (ResNeXt).
        base_width: width per group (ResNeXt).
        dilation: dilation of ``conv2``.
        norm: ``"bn"`` or ``"frozen_bn"``.
        dims: 2 (images) or 3 (videos).
        temporal_kernel: temporal size of ``conv1`` (I3D 3×1×1 inflation), 3D only.
        temporal_kernel_mid: temporal size of ``conv2`` (I3D 3×3×3 inflation), 3D only.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: str = "bn",
        *,
        dims: int = 2,
        temporal_kernel: int = 1,
        temporal_kernel_mid: int = 1,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(dims, inplanes, width, 1, temporal_kernel=temporal_kernel)
        self.bn1 = _norm(norm, dims, width)
        self.conv2 = _conv(
            dims,
            width,
            width,
            3,
            stride=stride,
            dilation=dilation,
            groups=groups,
            temporal_kernel=temporal_kernel_mid,
        )
        self.bn2 = _norm(norm, dims, width)
        self.conv3 = _conv(dims, width, planes * self.expansion, 1)
        self.bn3 = _norm(norm, dims, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.gc: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.gc is not None:
            out = self.gc(out)
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        """The norm whose gamma ``zero_init_residual`` zeroes."""
        return self.bn3


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _per_block(
    values: Sequence[Sequence[int]] | None, layers: Sequence[int], what: str
) -> list[list[int]]:
    """Per-stage, per-block temporal kernel sizes (all 1 when None), checked against depths."""
    if values is None:
        return [[1] * n for n in layers]
    if len(values) != len(layers):
        raise ValueError(f"{what} must have one list per stage ({len(layers)}), got {len(values)}")
    out = []
    for s, (vals, n) in enumerate(zip(values, layers, strict=True)):
        vals = list(vals)
        if len(vals) != n:
            raise ValueError(
                f"{what}: {STAGE_NAMES[s]} (layer{s + 1}) has {n} blocks, got {len(vals)} "
                f"temporal kernel sizes {vals}"
            )
        for v in vals:
            if not isinstance(v, int) or v < 1 or v % 2 == 0:
                raise ValueError(f"{what}: temporal kernel sizes must be odd ints >= 1, got {v!r}")
        out.append(vals)
    return out


def _triple(value: int | Sequence[int], what: str, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"{what} must be an int or {dims} ints, got {value}")
    return value


class ResNet(nn.Module):
    """A ResNet for images (``dims=2``) or videos (``dims=3``), with torchvision's keys.

    Forward: ``conv1 → bn1 → relu → maxpool → layer1 → pool2 → layer2 → layer3 → layer4 →
    avgpool → dropout → fc``. ``pool2`` (video only) is a temporal max pooling after res2;
    without it, and with ``dropout=0``, this is exactly torchvision's forward.

    ``deep_stem=True`` replaces ``conv1``/``bn1`` by the deep stem of mmseg's ResNetV1c (Bag of
    Tricks' ResNet-C): ``stem`` = [3×3 conv (stride ``conv1_stride``) to ``stem_channels // 2``,
    BN, ReLU, 3×3 conv, BN, ReLU, 3×3 conv to ``stem_channels``, BN, ReLU], bias-free convs with
    padding 1, so that ``stem.{0,1,3,4,6,7}`` are the keys and shapes of mmseg's
    ``backbone.stem``. The other keys do not change.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: residual blocks per stage (any positive depths).
        num_classes: classes of ``fc``; 0 removes the head (``fc`` is then ``nn.Identity``).
        in_channels: input channels.
        stem_channels: channels of ``conv1`` (of the stem's last conv with ``deep_stem``).
        deep_stem: three 3×3 convs instead of the 7×7 ``conv1`` (2D only; see above).
        widths: ``planes`` of each stage (output channels ``planes * expansion``).
        groups: groups of the 3×3 convolutions (ResNeXt).
        width_per_group: width per group (ResNeXt).
        replace_stride_with_dilation: for layer2..layer4, use dilation instead of stride
            (torchvision's semantics); ``(False, True, True)`` gives output stride 8.
        zero_init_residual: zero the last BN gamma of each residual block (off: torchvision's
            default).
        norm: ``"bn"``, or ``"frozen_bn"`` for fixed BatchNorm statistics and affine
            parameters.
        grad_checkpointing: recompute each residual block in the backward pass (training only).
        dims: 2 or 3.
        conv1_kernel: kernel of ``conv1``: k, or (t, k, k) for video.
        conv1_stride: stride of ``conv1``.
        pool1_kernel: kernel of the max pooling after the stem, or None for no pooling.
        pool1_stride: its stride.
        pool1_padding: its padding; None pads ``(k - 1) // 2`` per axis (torchvision's 1 for the
            3×3 pooling: 112 → 56); the official Caffe2 video nets pad 0 (112 → 55).
        pool2_temporal: temporal kernel and stride of ``pool2`` after res2 (video only); 1 = off.
        temporal_kernels: per stage, per block, the temporal size of the first conv of each
            block (bottleneck ``conv1``, basic ``conv1``), video only.
        temporal_kernels_mid: per stage, per block, the temporal size of a bottleneck's
            ``conv2``, video only.
        dropout: dropout probability before ``fc``.
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem_channels: int = 64,
        deep_stem: bool = False,
        widths: Sequence[int] = (64, 128, 256, 512),
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        zero_init_residual: bool = False,
        norm: str = "bn",
        grad_checkpointing: bool = False,
        dims: int = 2,
        conv1_kernel: int | Sequence[int] = 7,
        conv1_stride: int | Sequence[int] = 2,
        pool1_kernel: int | Sequence[int] | None = 3,
        pool1_stride: int | Sequence[int] = 2,
        pool1_padding: int | Sequence[int] | None = None,
        pool2_temporal: int = 1,
        temporal_kernels: Sequence[Sequence[int]] | None = None,
        temporal_kernels_mid: Sequence[Sequence[int]] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("block", block, tuple(_BLOCKS))
        check_choice("dims", dims, (2, 3))
        check_choice("norm", norm, NORMS)
        layers = tuple(layers)
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints (blocks per stage), got {layers}")
        widths = tuple(widths)
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints, got {widths}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation must have 3 entries (layer2..layer4), got "
                f"{tuple(replace_stride_with_dilation)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if dims == 2 and (temporal_kernels is not None or temporal_kernels_mid is not None):
            raise ValueError("temporal_kernels need a video ResNet (dims=3)")
        if dims == 2 and pool2_temporal != 1:
            raise ValueError("pool2_temporal needs a video ResNet (dims=3)")
        block_cls = _BLOCKS[block]
        t_first = _per_block(temporal_kernels, layers, "temporal_kernels")
        t_mid = _per_block(temporal_kernels_mid, layers, "temporal_kernels_mid")
        if block == "basic" and any(t != 1 for ts in t_mid for t in ts):
            raise ValueError("temporal_kernels_mid applies to bottleneck blocks only")

        self.block = block
        self.layers = layers
        self.dims = dims
        self.norm = norm
        self.grad_checkpointing = grad_checkpointing
        self.num_classes = num_classes
        self._groups = groups
        self._base_width = width_per_group
        self.inplanes = stem_channels
        self.dilation = 1

        self.deep_stem = bool(deep_stem)
        k1 = _triple(conv1_kernel, "conv1_kernel", dims)
        s1 = _triple(conv1_stride, "conv1_stride", dims)
        if self.deep_stem:
            self.stem = self._deep_stem(in_channels, stem_channels, s1, norm, dims)
        else:
            self.conv1 = CONV[dims](
                in_channels,
                stem_channels,
                k1,
                stride=s1,
                padding=tuple(k // 2 for k in k1),
                bias=False,
            )
            self.bn1 = _norm(norm, dims, stem_channels)
        self.relu = nn.ReLU(inplace=True)
        if pool1_kernel is None:
            self.maxpool: nn.Module = nn.Identity()
        else:
            kp = _triple(pool1_kernel, "pool1_kernel", dims)
            sp = _triple(pool1_stride, "pool1_stride", dims)
            if pool1_padding is None:
                pp = tuple((k - 1) // 2 for k in kp)
            else:
                pp = _triple(pool1_padding, "pool1_padding", dims)
                if any(p < 0 or 2 * p > k for p, k in zip(pp, kp, strict=True)):
                    raise ValueError(
                        f"pool1_padding must lie in [0, kernel // 2] per axis (kernel {kp}), "
                        f"got {pp}"
                    )
            pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
            self.maxpool = pool(kp, stride=sp, padding=pp)
        self.layer1 = self._make_layer(
            block_cls, widths[0], layers[0], 1, False, t_first[0], t_mid[0]
        )
        if pool2_temporal > 1:
            self.pool2: nn.Module = nn.MaxPool3d(
                (pool2_temporal, 1, 1), stride=(pool2_temporal, 1, 1)
            )
        else:
            self.pool2 = nn.Identity()
        rsd = tuple(replace_stride_with_dilation)
        self.layer2 = self._make_layer(
            block_cls, widths[1], layers[1], 2, rsd[0], t_first[1], t_mid[1]
        )
        self.layer3 = self._make_layer(
            block_cls, widths[2], layers[2], 2, rsd[1], t_first[2], t_mid[2]
        )
        self.layer4 = self._make_layer(
            block_cls, widths[3], layers[3], 2, rsd[2], t_first[3], t_mid[3]
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = widths[3] * block_cls.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_init_residual=zero_init_residual)

    @staticmethod
    def _deep_stem(
        in_channels: int, channels: int, stride: tuple[int, ...], norm: str, dims: int
    ) -> nn.Sequential:
        """mmseg's ResNetV1c stem: 3×3 convs in → C/2 (strided) → C/2 → C, each BN + ReLU."""
        if dims != 2:
            raise ValueError("deep_stem is a 2D stem (mmseg's ResNetV1c); video ResNets use conv1")
        if channels % 2 or channels < 2:
            raise ValueError(f"deep_stem needs an even stem_channels >= 2, got {channels}")
        half = channels // 2
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(((in_channels, half), (half, half), (half, channels))):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride if i == 0 else 1, padding=1, bias=False),
                _norm(norm, dims, c_out),
                nn.ReLU(inplace=True),
            ]
        return nn.Sequential(*layers)

    def _make_layer(
        self,
        block_cls: type[nn.Module],
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
        t_first: list[int],
        t_mid: list[int],
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        expansion = block_cls.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                _conv(self.dims, self.inplanes, planes * expansion, 1, stride=stride),
                _norm(self.norm, self.dims, planes * expansion),
            )
        mids = {} if block_cls is BasicBlock else {"temporal_kernel_mid": t_mid[0]}
        layers = [
            block_cls(
                self.inplanes,
                planes,
                stride,
                downsample,
                self._groups,
                self._base_width,
                previous_dilation,
                self.norm,
                dims=self.dims,
                temporal_kernel=t_first[0],
                **mids,
            )
        ]
        self.inplanes = planes * expansion
        for i in range(1, blocks):
            mids = {} if block_cls is BasicBlock else {"temporal_kernel_mid": t_mid[i]}
            layers.append(
                block_cls(
                    self.inplanes,
                    planes,
                    groups=self._groups,
                    base_width=self._base_width,
                    dilation=self.dilation,
                    norm=self.norm,
                    dims=self.dims,
                    temporal_kernel=t_first[i],
                    **mids,
                )
            )
        return nn.Sequential(*layers)

    @torch.no_grad()
    def init_weights(self, *, zero_init_residual: bool = False) -> None:
        """torchvision's initialisation: Kaiming-normal (fan_out) convs, BN weight 1 / bias 0.

        Call it before inserting attention blocks (the builders do): it visits every module,
        so calling it afterwards would re-initialise the blocks' zero-initialised layers.

        Args:
            zero_init_residual: zero the last BN gamma of each residual block.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def stages(self) -> list[nn.Sequential]:
        """``[layer1, layer2, layer3, layer4]``."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for blk in stage:
            x = checkpoint(blk, x, use_reentrant=False)
        return x

    def forward_stem(self, x: Tensor) -> Tensor:
        """The stem before the max pooling: ``relu(bn1(conv1(x)))``, or the deep stem."""
        if self.deep_stem:
            return self.stem(x)
        return self.relu(self.bn1(self.conv1(x)))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The stem, then the outputs of the four stages (res2..res5, ``layer1``..``layer4``).

        The output of res2 is taken before ``pool2`` (the temporal pooling of video ResNets),
        which then feeds res3.

        Returns:
            ``[c2, c3, c4, c5]``, each ``(B, C_k, *S_k)``.
        """
        x = self.maxpool(self.forward_stem(x))
        c2 = self._run_stage(self.layer1, x)
        c3 = self._run_stage(self.layer2, self.pool2(c2))
        c4 = self._run_stage(self.layer3, c3)
        c5 = self._run_stage(self.layer4, c4)
        return [c2, c3, c4, c5]

    def forward_features(self, x: Tensor) -> Tensor:
        """The stem and the four stages: ``(B, num_features, *S')``, the output of res5."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x: Tensor) -> Tensor:
        """Global average pooling, dropout and ``fc``: ``(B, num_classes)``."""
        x = self.avgpool(x).flatten(1)  # (B, C)
        return self.fc(self.dropout(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of a ``(B, C, H, W)`` image or ``(B, C, T, H, W)`` clip.

        The input checks step aside while :mod:`torch.fx` traces (the input is then a proxy
        without a shape), so fx-based tools such as torchvision's ``create_feature_extractor``
        trace the network.
        """
        if not is_tracing(x):
            self._check_input(x)
        return self.forward_head(self.forward_features(x))

    def _check_input(self, x: Tensor) -> None:
        """A tensor of the network's rank, and a clip long enough for the temporal strides."""
        expected = self.dims + 2
        if not isinstance(x, Tensor):
            raise TypeError(f"ResNet: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != expected:
            layout = "(B, C, H, W)" if self.dims == 2 else "(B, C, T, H, W)"
            raise ValueError(
                f"ResNet: input must be a {expected}-d tensor {layout}, got shape {tuple(x.shape)}"
            )
        if self.dims == 3 and self.frames_at_res5(x.shape[2]) < 1:
            raise ValueError(
                f"ResNet: a clip of {x.shape[2]} frames is too short for the temporal strides "
                f"of conv1/pool1/pool2; at least {self.min_frames()} frames are needed"
            )

    def frames_at_res5(self, frames: int) -> int:
        """Temporal size after conv1, pool1 and pool2 for a clip of ``frames`` (video only)."""
        t = frames
        for m in (self.conv1, self.maxpool):
            if isinstance(m, (nn.Conv3d, nn.MaxPool3d)):
                k, s, p = (_first(v) for v in (m.kernel_size, m.stride, m.padding))
                t = (t + 2 * p - k) // s + 1
        if isinstance(self.pool2, nn.MaxPool3d):
            t //= _first(self.pool2.kernel_size)
        return t

    def min_frames(self) -> int:
        """The shortest clip a video ResNet accepts."""
        t = 1
        while self.frames_at_res5(t) < 1:
            t += 1
        return t


def _first(v: int | Sequence[int]) -> int:
    return v if isinstance(v, int) else int(v[0])
