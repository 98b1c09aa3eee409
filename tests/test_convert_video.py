"""Video checkpoints: pytorchvideo and mmaction2 (installed), SlowFast (a fixture of its keys).

pytorchvideo's ``create_resnet`` (with ``create_nonlocal`` blocks wrapped after residual blocks)
and mmaction2's ``ResNet3d`` (with its ``non_local`` blocks) are built with random weights,
converted, and compared with our model in float64, eval mode (≤ 1e-10 relative). SlowFast is
not installable: its key layout (``resnet_helper``, ``nonlocal_helper``, ``stem_helper``,
``head_helper``) is generated here, and the converted model is checked against forwards
computed from the raw tensors with SlowFast's formulas.

The NL blocks of every peer round their max pooling down on odd sizes; the converted models
reproduce them with ``NonLocalNd(sub_sample_rounding="floor")``, which the odd-size tests check.
"""

from __future__ import annotations

import importlib.util
import site
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet.convert import ConversionError, convert_state_dict
from nonlocalnet.convert._core import supported_nl_options
from nonlocalnet.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_ROUNDING = "sub_sample_rounding" in supported_nl_options()
needs_rounding = pytest.mark.skipif(
    not HAS_ROUNDING, reason="NonLocalNd has no sub_sample_rounding option yet (floor pooling)"
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def randomise(module: nn.Module) -> nn.Module:
    """Random weights, BN affine and statistics near 1 (so deep nets keep their scale).

    θ and φ of the NL blocks get a small std (the official 0.01-ish init): the dot product is
    cubic in its input and would overflow a 50-layer net otherwise.
    """
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                last = name.endswith(("conv3.bn", "bn3", "norm_c", "c_bn"))  # a branch's last BN
                m.weight.uniform_(0.1, 0.3) if last else m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, (nn.Conv3d, nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                small = "theta" in name or "phi" in name
                m.weight.normal_(0, 0.003 if small else (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
        for m in module.modules():  # the NL blocks' last norm: a small residual branch
            if hasattr(m, "conv_out") and (hasattr(m, "theta") or hasattr(m, "conv_theta")):
                norm = getattr(m, "norm", None) or getattr(m, "bn", None)
                norm = norm if norm is not None else getattr(m.conv_out, "bn", None)
                if norm is not None:
                    norm.weight.uniform_(0.05, 0.15)
    return module


def converted(state, source, **kw):
    conv = convert_state_dict(state, source, **kw)
    conv.model.double().eval().load_state_dict(conv.state_dict)
    return conv


# -- pytorchvideo ---------------------------------------------------------------------------------

ptv = pytest.importorskip("pytorchvideo.models.resnet")
from pytorchvideo.layers.nonlocal_net import create_nonlocal  # noqa: E402

NL_5BLOCK = {2: [1, 3], 3: [1, 3, 5]}  # pytorchvideo stage index (blocks.k) -> residual blocks


def ptv_resnet(arch: str, head_pool, nonlocal_: bool, instantiation: str = "softmax") -> nn.Module:
    kernels = {
        "c2d": ((1, 1, 1),) * 4,
        "i3d": ((3, 1, 1), ((3, 1, 1), (1, 1, 1)), ((3, 1, 1), (1, 1, 1)), ((1, 1, 1), (3, 1, 1))),
    }[arch]
    net = ptv.create_resnet(
        model_depth=50,
        model_num_class=10,
        stem_conv_kernel_size=(1, 7, 7) if arch == "c2d" else (5, 7, 7),
        stage1_pool=nn.MaxPool3d,
        stage_conv_a_kernel_size=kernels,
        head_pool_kernel_size=head_pool,
    )
    if nonlocal_:
        for k, (stage, idx) in enumerate(((3, NL_5BLOCK[2]), (4, NL_5BLOCK[3]))):
            res = net.blocks[stage].res_blocks
            dim = 512 if k == 0 else 1024
            for i in idx:
                block = create_nonlocal(
                    dim_in=dim, dim_inner=dim // 2, pool_size=(1, 2, 2), instantiation=instantiation
                )
                res[i] = nn.Sequential(res[i], block)
    return randomise(net).double().eval()


def ptv_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in net.blocks[:-1]:
        x = block(x)
    return x


@pytest.mark.parametrize(
    "arch,nonlocal_", [("c2d", True), pytest.param("i3d", False, marks=pytest.mark.slow)]
)
def test_pytorchvideo_resnet(arch, nonlocal_) -> None:
    x = torch.randn(1, 3, 8, 64, 64, dtype=torch.float64)  # res5: 4x2x2
    theirs = ptv_resnet(arch, (4, 2, 2), nonlocal_)
    conv = converted(theirs.state_dict(), "pytorchvideo")
    assert conv.model_name == ("nl_c2d_r50" if nonlocal_ else "i3d_r50")
    assert conv.overrides["conv1_stride"] == (1, 2, 2) and conv.overrides["pool1_kernel"] == (
        1,
        3,
        3,
    )
    if nonlocal_:
        nl = conv.overrides["nonlocal_kwargs"]
        assert nl["sub_sample_position"] == "before" and nl["use_scale"] is True
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


@needs_rounding
def test_pytorchvideo_resnet_odd_sizes() -> None:
    x = torch.randn(1, 3, 8, 56, 72, dtype=torch.float64)  # res3 7x9, res4 4x5
    theirs = ptv_resnet("c2d", (4, 2, 3), True)
    conv = converted(theirs.state_dict(), "pytorchvideo")
    with torch.no_grad():
        assert rel(conv.model.forward_features(x), ptv_features(theirs, x)) <= 1e-10


@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
@pytest.mark.parametrize(
    "size", [(4, 8, 10), pytest.param((3, 7, 9), marks=needs_rounding)], ids=["even", "odd"]
)
def test_pytorchvideo_nonlocal_block(instantiation, size) -> None:
    theirs = (
        randomise(
            create_nonlocal(
                dim_in=32, dim_inner=16, pool_size=(1, 2, 2), instantiation=instantiation
            )
        )
        .double()
        .eval()
    )
    conv = converted(theirs.state_dict(), "pytorchvideo", instantiation=instantiation)
    assert conv.model.pairwise == (
        "embedded_gaussian" if instantiation == "softmax" else "dot_product"
    )
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


# -- mmaction2 ------------------------------------------------------------------------------------


def _load_resnet3d():
    path = Path(site.getsitepackages()[0]) / "mmaction" / "models" / "backbones" / "resnet3d.py"
    if not path.is_file():
        pytest.skip("mmaction2 is not installed")
    name = "_nonlocalnet_test_mmaction_resnet3d"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # pragma: no cover - depends on the installed mmaction2
        pytest.skip(f"mmaction2's resnet3d.py does not load: {err}")
    sys.modules[name] = module
    return module


def mmaction_i3d(mode: str | None) -> tuple[nn.Module, nn.Linear]:
    resnet3d = _load_resnet3d()
    non_local = ((0, 0, 0), (0, 1, 0, 1), (0, 1, 0, 1, 0, 1), (0, 0, 0)) if mode else (0, 0, 0, 0)
    backbone = resnet3d.ResNet3d(
        depth=50,
        pretrained=None,
        pretrained2d=False,
        conv1_kernel=(5, 7, 7),
        conv1_stride_t=2,
        pool1_stride_t=2,
        inflate=((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0)),
        non_local=non_local,
        non_local_cfg={
            "sub_sample": True,
            "use_scale": False,
            "norm_cfg": {"type": "BN3d", "requires_grad": True},
            "mode": mode or "embedded_gaussian",
        },
    )
    fc = nn.Linear(2048, 10)
    randomise(backbone).double().eval()
    randomise(fc).double()
    return backbone, fc


def recognizer_state(backbone: nn.Module, fc: nn.Linear) -> dict[str, torch.Tensor]:
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"cls_head.fc_cls.{k}": v for k, v in fc.state_dict().items()})
    return state


@pytest.mark.parametrize(
    "mode",
    [
        "dot_product",
        pytest.param("embedded_gaussian", marks=pytest.mark.slow),
        pytest.param("gaussian", marks=pytest.mark.slow),
        pytest.param(None, marks=pytest.mark.slow),
    ],
)
def test_mmaction2_i3d(mode) -> None:
    backbone, fc = mmaction_i3d(mode)
    pairwise = mode if mode in ("dot_product", "embedded_gaussian") else None
    conv = converted(recognizer_state(backbone, fc), "mmaction2", pairwise=pairwise)
    assert conv.model_name == ("nl_i3d_r50" if mode else "i3d_r50")
    if mode:
        nl = conv.overrides["nonlocal_kwargs"]
        assert nl["pairwise"] == mode and nl["sub_sample_position"] == "after"
        assert conv.model.layer2[1].after.pairwise == mode
    x = torch.randn(1, 3, 8, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        feats = backbone(x)
        assert rel(conv.model.forward_features(x), feats) <= 1e-10
        logits = fc(feats.mean(dim=(2, 3, 4)))  # I3DHead: global average, dropout, fc_cls
        assert rel(conv.model(x), logits) <= 1e-10


@needs_rounding
def test_mmaction2_odd_sizes() -> None:
    backbone, fc = mmaction_i3d("dot_product")
    conv = converted(recognizer_state(backbone, fc), "mmaction2", pairwise="dot_product")
    x = torch.randn(1, 3, 8, 56, 72, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model.forward_features(x), backbone(x)) <= 1e-10


def test_mmaction2_mode_from_the_stored_config_or_refused() -> None:
    backbone, fc = mmaction_i3d("dot_product")
    state = recognizer_state(backbone, fc)
    with pytest.raises(ConversionError, match="pass pairwise='embedded_gaussian' or"):
        convert_state_dict(state, "mmaction2")
    cfg = (
        "model = dict(type='Recognizer3D', backbone=dict(type='ResNet3d', "
        "non_local_cfg=dict(sub_sample=True, use_scale=False, norm_cfg=dict(type='BN3d', "
        "requires_grad=True), mode='dot_product'), ...))"
    )
    conv = convert_state_dict({"meta": {"cfg": cfg}, "state_dict": state}, "mmaction2")
    assert conv.model.layer2[1].after.pairwise == "dot_product"
    assert any("stored config" in n for n in conv.report.notes)


# -- SlowFast (not installable): its documented layout, SlowFast's forward written out ---------


def slowfast_keys(arch: str = "i3d", nonlocal_=((1, 3), (1, 3, 5)), classes: int = 400):
    """(key, shape) of SlowFast's ResNet (MODEL.ARCH c2d/i3d, NONLOCAL.LOCATION res3/res4)."""
    tk = {
        "c2d": [[1], [1], [1], [1], [1]],
        "i3d": [[5], [3], [3, 1], [3, 1], [1, 3]],
    }[arch]  # _TEMPORAL_KERNEL_BASIS, repeated over each stage's blocks

    def bn(p, c):
        return [(f"{p}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
            (f"{p}.num_batches_tracked", ())
        ]

    out = [
        ("s1.pathway0_stem.conv.weight", (64, 3, tk[0][0], 7, 7)),
        *bn("s1.pathway0_stem.bn", 64),
    ]
    dim_in = 64
    for s, (n, inner, dim_out) in enumerate(
        zip((3, 4, 6, 3), (64, 128, 256, 512), (256, 512, 1024, 2048), strict=True), start=2
    ):
        for i in range(n):
            p = f"s{s}.pathway0_res{i}"
            t = tk[s - 1][i % len(tk[s - 1])]
            if i == 0:
                out += [
                    (f"{p}.branch1.weight", (dim_out, dim_in, 1, 1, 1)),
                    *bn(f"{p}.branch1_bn", dim_out),
                ]
            out += [
                (f"{p}.branch2.a.weight", (inner, dim_in, t, 1, 1)),
                *bn(f"{p}.branch2.a_bn", inner),
            ]
            out += [
                (f"{p}.branch2.b.weight", (inner, inner, 1, 3, 3)),
                *bn(f"{p}.branch2.b_bn", inner),
            ]
            out += [
                (f"{p}.branch2.c.weight", (dim_out, inner, 1, 1, 1)),
                *bn(f"{p}.branch2.c_bn", dim_out),
            ]
            dim_in = dim_out
            if s in (3, 4) and i in nonlocal_[s - 3]:
                q = f"s{s}.pathway0_nonlocal{i}"
                for c in ("conv_theta", "conv_phi", "conv_g"):
                    out += [
                        (f"{q}.{c}.weight", (dim_out // 2, dim_out, 1, 1, 1)),
                        (f"{q}.{c}.bias", (dim_out // 2,)),
                    ]
                out += [
                    (f"{q}.conv_out.weight", (dim_out, dim_out // 2, 1, 1, 1)),
                    (f"{q}.conv_out.bias", (dim_out,)),
                ]
                out += bn(f"{q}.bn", dim_out)
    out += [("head.projection.weight", (classes, 2048)), ("head.projection.bias", (classes,))]
    return out


def slowfast_state(keys) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in keys:
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var") or (k.endswith("weight") and len(shape) == 1):
            state[k] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        elif len(shape) <= 1:
            state[k] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[k] = torch.randn(shape, generator=g, dtype=torch.float64) * (2.0 / fan_in) ** 0.5
    return state


def sf_bn(x, st, p):
    return F.batch_norm(
        x,
        st[f"{p}.running_mean"],
        st[f"{p}.running_var"],
        st[f"{p}.weight"],
        st[f"{p}.bias"],
        False,
        0.0,
        1e-5,
    )


def sf_stem(x, st):
    w = st["s1.pathway0_stem.conv.weight"]
    y = F.conv3d(x, w, stride=(1, 2, 2), padding=(w.shape[2] // 2, 3, 3))
    y = torch.relu(sf_bn(y, st, "s1.pathway0_stem.bn"))
    return F.max_pool3d(y, (1, 3, 3), (1, 2, 2), (0, 1, 1))


def sf_resblock(x, st, p, stride):
    a_w = st[f"{p}.branch2.a.weight"]
    a = torch.relu(
        sf_bn(F.conv3d(x, a_w, padding=(a_w.shape[2] // 2, 0, 0)), st, f"{p}.branch2.a_bn")
    )
    b = F.conv3d(a, st[f"{p}.branch2.b.weight"], stride=(1, stride, stride), padding=(0, 1, 1))
    b = torch.relu(sf_bn(b, st, f"{p}.branch2.b_bn"))
    f_x = sf_bn(F.conv3d(b, st[f"{p}.branch2.c.weight"]), st, f"{p}.branch2.c_bn")
    if f"{p}.branch1.weight" in st:
        x = sf_bn(
            F.conv3d(x, st[f"{p}.branch1.weight"], stride=(1, stride, stride)),
            st,
            f"{p}.branch1_bn",
        )
    return torch.relu(x + f_x)


def sf_nonlocal(x, st, p):
    n, _, t_, h, w = x.shape

    def conv(z, c):
        return F.conv3d(z, st[f"{p}.{c}.weight"], st[f"{p}.{c}.bias"])

    theta = conv(x, "conv_theta")
    pooled = F.max_pool3d(x, (1, 2, 2), (1, 2, 2))
    phi, g = conv(pooled, "conv_phi"), conv(pooled, "conv_g")
    d = theta.shape[1]
    theta_phi = torch.einsum("nct,ncp->ntp", theta.reshape(n, d, -1), phi.reshape(n, d, -1))
    theta_phi = torch.softmax(theta_phi * d**-0.5, dim=2)
    y = torch.einsum("ntg,ncg->nct", theta_phi, g.reshape(n, d, -1)).reshape(n, d, t_, h, w)
    return x + sf_bn(conv(y, "conv_out"), st, f"{p}.bn")


@pytest.fixture(scope="module")
def slowfast():
    state = slowfast_state(slowfast_keys())
    conv = converted({"model_state": state, "epoch": 196}, "slowfast")
    return state, conv


def test_slowfast_conversion_infers_the_model(slowfast) -> None:
    state, conv = slowfast
    assert conv.model_name == "nl_i3d_r50"
    assert conv.overrides["conv1_stride"] == (1, 2, 2) and conv.overrides["pool1_stride"] == (
        1,
        2,
        2,
    )
    nl = conv.overrides["nonlocal_kwargs"]
    assert nl["sub_sample_position"] == "before" and nl["pairwise"] == "embedded_gaussian"
    assert len(conv.report.mapped) == len(state) and not conv.report.derived


def test_slowfast_stem_bottleneck_and_nonlocal(slowfast) -> None:
    st, conv = slowfast
    m = conv.model
    x = torch.randn(1, 3, 4, 30, 34, dtype=torch.float64)
    with torch.no_grad():
        assert rel(m.maxpool(m.relu(m.bn1(m.conv1(x)))), sf_stem(x, st)) <= 1e-10
        z = torch.randn(1, 256, 2, 9, 11, dtype=torch.float64)
        assert rel(m.layer2[0](z), sf_resblock(z, st, "s3.pathway0_res0", 2)) <= 1e-10
        z = torch.randn(1, 512, 2, 8, 10, dtype=torch.float64)
        expected = sf_nonlocal(
            sf_resblock(z, st, "s3.pathway0_res1", 1), st, "s3.pathway0_nonlocal1"
        )
        assert rel(m.layer2[1](z), expected) <= 1e-10


@needs_rounding
def test_slowfast_nonlocal_odd_sizes(slowfast) -> None:
    st, conv = slowfast
    z = torch.randn(1, 1024, 2, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert (
            rel(conv.model.layer3[3].after(z), sf_nonlocal(z, st, "s4.pathway0_nonlocal3")) <= 1e-10
        )


def test_slowfast_dot_product_and_c2d() -> None:
    state = slowfast_state(slowfast_keys("c2d", nonlocal_=((), (2,))))
    conv = convert_state_dict(state, "slowfast", instantiation="dot_product")
    assert conv.model_name == "nl_c2d_r50"
    assert conv.overrides["nonlocal_placement"] == [[], [], [2], []]
    assert conv.model.layer3[2].after.pairwise == "dot_product"
    with pytest.raises(ConversionError, match="unknown non-local instantiation"):
        convert_state_dict(state, "slowfast", instantiation="gaussian")


def test_a_given_model_with_another_stem_is_refused(slowfast) -> None:
    state, _ = slowfast
    floor = {"sub_sample_rounding": "floor"} if HAS_ROUNDING else {}
    c2d_strides = create_model("nl_i3d_r50", nonlocal_kwargs=floor)  # 32x2 stem: stride 2 in time
    with pytest.raises(
        ConversionError, match=r"conv1_stride is \(2, 2, 2\), the source's \(1, 2, 2\)"
    ):
        convert_state_dict(state, "slowfast", c2d_strides)
