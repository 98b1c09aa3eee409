"""OpenMMLab checkpoints: mmcv blocks, mmdet GC/NL backbones, mmseg ANN/NL/GC segmentors.

``mmcv.cnn`` imports (mmcv-lite: no compiled ops). ``mmdet.models`` and ``mmseg.models`` do not
(their package ``__init__`` needs ``mmcv._ext``), but the module files used here load once the
parent packages are stubbed in ``sys.modules`` (empty packages with the right ``__path__``, plus
``mmseg.utils`` as type aliases): mmdet's ``backbones/resnet.py`` with ``layers/res_layer.py``,
mmseg's ``backbones/resnet.py``, ``utils/{res_layer,self_attention_block,wrappers}.py``,
``losses/{accuracy,cross_entropy_loss}.py`` and ``decode_heads/{decode_head,fcn_head,ann_head,
nl_head,gc_head}.py``. The stubs live only while this module's tests run.
"""

from __future__ import annotations

import importlib
import site
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from nonlocalnet.convert import ConversionError, convert_state_dict
from nonlocalnet.convert._core import supported_nl_options
from nonlocalnet.layers import NonLocal2d
from nonlocalnet.models import create_model, insert_context_blocks

mmcv_cnn = pytest.importorskip("mmcv.cnn")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # mmseg: build_loss, avg_non_ignore
]

SITE = Path(site.getsitepackages()[0])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def randomise(module: nn.Module) -> nn.Module:
    """Random weights; BN statistics random; residual branches' last BN small (stable depth)."""
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                last = name.endswith(("bn3", "conv3.bn"))
                m.weight.uniform_(0.1, 0.3) if last else m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
    return module


def prepared(module: nn.Module) -> nn.Module:
    """Random float64 weights, eval mode (mm ResNets' ``train()`` returns None: no chaining)."""
    randomise(module).double()
    module.eval()
    return module


def converted(state, source, model=None, **kw):
    conv = convert_state_dict(state, source, model, **kw)
    conv.model.double().eval().load_state_dict(conv.state_dict)
    return conv


# -- mmcv blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "gaussian", "concatenation"])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_mmcv_nonlocal2d(mode, sub_sample) -> None:
    theirs = mmcv_cnn.NonLocal2d(
        32, reduction=2, mode=mode, sub_sample=sub_sample, norm_cfg={"type": "BN"}
    )
    randomise(theirs).double().eval()
    conv = converted(theirs.state_dict(), "mmcv", pairwise=mode)
    ours = conv.model
    assert ours.pairwise == mode and ours.sub_sample == sub_sample
    if sub_sample:
        assert ours.sub_sample_position == "after"
        assert conv.report.block_options["nl.sub_sample_rounding"] == "floor"
    assert ("zero bias (the source's conv has none)") in {h for _, h in conv.report.derived}
    x = torch.randn(2, 32, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel(ours(x), theirs(x)) <= 1e-10


def test_mmcv_nonlocal3d_without_norm() -> None:
    theirs = randomise(mmcv_cnn.NonLocal3d(16, mode="dot_product", sub_sample=True)).double().eval()
    conv = converted(theirs.state_dict(), "mmcv", pairwise="dot_product")
    assert conv.model.norm is None and conv.model.dims == 3
    x = torch.randn(2, 16, 3, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


@pytest.mark.parametrize(
    "pooling,fusion",
    [("att", ("channel_add",)), ("att", ("channel_mul",)), ("avg", ("channel_add", "channel_mul"))],
)
def test_mmcv_context_block(pooling, fusion) -> None:
    theirs = mmcv_cnn.ContextBlock(64, ratio=1 / 4, pooling_type=pooling, fusion_types=fusion)
    randomise(theirs).double().eval()
    conv = converted(theirs.state_dict(), "mmcv")
    assert set(conv.model.fusion) == {f.split("_")[1] for f in fusion}
    assert conv.report.exact  # mmcv's LayerNorm eps is ours
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel(conv.model(x), theirs(x)) <= 1e-10


# -- loading mmdet / mmseg module files ------------------------------------------------------------


def _stub(name: str, path: bool = True) -> types.ModuleType:
    module = types.ModuleType(name)
    if path:
        module.__path__ = [str(SITE / name.replace(".", "/"))]
    return module


@pytest.fixture(scope="module")
def mm():
    """``mmdet_resnet``, ``mmseg_resnet``, ``heads`` (mmseg decode_heads modules)."""
    if not (SITE / "mmdet").is_dir() or not (SITE / "mmseg").is_dir():
        pytest.skip("mmdet / mmseg are not installed")
    saved = dict(sys.modules)
    try:
        for name in [
            "mmdet.models", "mmdet.models.backbones", "mmdet.models.layers",
            "mmseg.models", "mmseg.models.backbones", "mmseg.models.utils",
            "mmseg.models.decode_heads", "mmseg.models.losses",
        ]:  # fmt: skip
            sys.modules[name] = _stub(name)
        utils = _stub("mmseg.utils", path=False)
        for alias in ("ConfigType", "SampleList", "OptConfigType", "MultiConfig", "OptMultiConfig"):
            setattr(utils, alias, object)
        sys.modules["mmseg.utils"] = utils
        imp = importlib.import_module
        sys.modules["mmdet.models.layers"].ResLayer = imp("mmdet.models.layers.res_layer").ResLayer
        mmdet_resnet = imp("mmdet.models.backbones.resnet")
        seg_utils = sys.modules["mmseg.models.utils"]
        seg_utils.ResLayer = imp("mmseg.models.utils.res_layer").ResLayer
        seg_utils.SelfAttentionBlock = imp(
            "mmseg.models.utils.self_attention_block"
        ).SelfAttentionBlock
        seg_utils.resize = imp("mmseg.models.utils.wrappers").resize
        sys.modules["mmseg.models.losses"].accuracy = imp("mmseg.models.losses.accuracy").accuracy
        imp("mmseg.models.losses.cross_entropy_loss")
        mmseg_resnet = imp("mmseg.models.backbones.resnet")
        heads = {
            n: imp(f"mmseg.models.decode_heads.{n}")
            for n in ("fcn_head", "ann_head", "nl_head", "gc_head")
        }
    except Exception as err:  # pragma: no cover - depends on the installed versions
        sys.modules.clear()
        sys.modules.update(saved)
        pytest.skip(f"mmdet/mmseg module files do not load with stubs: {err}")
    yield types.SimpleNamespace(mmdet_resnet=mmdet_resnet, mmseg_resnet=mmseg_resnet, heads=heads)
    for name in [n for n in sys.modules if n not in saved]:
        del sys.modules[name]
    sys.modules.update(saved)


# -- mmdet ------------------------------------------------------------------------------------------


def test_mmdet_gc_backbone(mm) -> None:
    """GCNet's mask-rcnn_r50-gcb-r16-c3-c5 backbone (the detector parts are dropped)."""
    plugins = [
        {
            "cfg": {"type": "ContextBlock", "ratio": 1.0 / 16},
            "stages": (False, True, True, True),
            "position": "after_conv3",
        }
    ]
    theirs = prepared(mm.mmdet_resnet.ResNet(depth=50, plugins=plugins))
    state = {f"backbone.{k}": v for k, v in theirs.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 256, 1, 1)
    state["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 1024)
    conv = converted(state, "mmdet")
    assert conv.model_name == "gc_resnet50" and conv.overrides["num_classes"] == 0
    assert conv.overrides["gc_kwargs"] == {
        "ratio": 1 / 16, "pooling": "att", "fusion": ["add"], "layer_norm": True
    }  # fmt: skip
    assert conv.report.ignored_counts() == {
        "detector parts (FPN neck, RPN/RoI heads): only the backbone converts": 2
    }
    x = torch.randn(1, 3, 67, 75, dtype=torch.float64)
    with torch.no_grad():
        for ours, ref in zip(conv.model.forward_stages(x), theirs(x), strict=True):
            assert rel(ours, ref) <= 1e-10


def test_mmdet_nonlocal_plugin_needs_a_model_with_blocks_inside(mm) -> None:
    plugins = [
        {
            "cfg": {"type": "NonLocal2d", "reduction": 2, "norm_cfg": {"type": "BN"}},
            "stages": (False, False, True, False),
            "position": "after_conv3",
        }
    ]
    theirs = prepared(mm.mmdet_resnet.ResNet(depth=50, plugins=plugins))
    with pytest.raises(ConversionError, match="insert_context_blocks"):
        convert_state_dict(theirs.state_dict(), "mmdet")
    ours = create_model("resnet50", num_classes=0)
    insert_context_blocks(
        ours, [[], [], list(range(6)), []], lambda c: NonLocal2d(c, sub_sample=False)
    )
    conv = convert_state_dict(theirs.state_dict(), "mmdet", ours)
    assert conv.model is ours and conv.report.exact
    ours.double().eval().load_state_dict(conv.state_dict)
    x = torch.randn(1, 3, 67, 75, dtype=torch.float64)
    with torch.no_grad():
        assert rel(ours.forward_stages(x)[-1], theirs(x)[-1]) <= 1e-10


def test_a_given_model_with_other_block_options_is_refused(mm) -> None:
    theirs = mmcv_cnn.NonLocal2d(32, mode="dot_product", sub_sample=True, norm_cfg={"type": "BN"})
    floor = (
        {"sub_sample_rounding": "floor"} if "sub_sample_rounding" in supported_nl_options() else {}
    )
    ours = NonLocal2d(32, pairwise="dot_product", sub_sample=True, **floor)  # pools after: right
    assert convert_state_dict(
        theirs.state_dict(), "mmcv", ours, pairwise="dot_product"
    ).report.exact
    before = NonLocal2d(
        32, pairwise="dot_product", sub_sample=True, sub_sample_position="before", **floor
    )
    with pytest.raises(
        ConversionError, match="sub_sample_position is 'before', the source's 'after'"
    ):
        convert_state_dict(theirs.state_dict(), "mmcv", before, pairwise="dot_product")


# -- mmseg ------------------------------------------------------------------------------------------


def mmseg_backbone(mm, deep_stem: bool = False) -> nn.Module:
    return mm.mmseg_resnet.ResNet(
        depth=50,
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        contract_dilation=True,
        deep_stem=deep_stem,
        norm_cfg={"type": "BN"},
    )


def mmseg_head(mm, kind: str, concat_input: bool = False) -> nn.Module:
    common = {"in_index": 3, "channels": 128, "num_classes": 5, "norm_cfg": {"type": "BN"}}
    if kind == "ann":
        return mm.heads["ann_head"].ANNHead(
            in_channels=[1024, 2048], in_index=[2, 3], channels=128, project_channels=64,
            num_classes=5, norm_cfg={"type": "BN"},
        )  # fmt: skip
    if kind == "nl":
        return mm.heads["nl_head"].NLHead(in_channels=2048, concat_input=concat_input, **common)
    return mm.heads["gc_head"].GCHead(
        in_channels=2048, ratio=1 / 4, concat_input=concat_input, **common
    )


def mmseg_aux(mm) -> nn.Module:
    return mm.heads["fcn_head"].FCNHead(
        in_channels=1024, in_index=2, channels=64, num_convs=1, concat_input=False,
        num_classes=5, norm_cfg={"type": "BN"},
    )  # fmt: skip


def segmentor_state(backbone, head, aux) -> dict[str, torch.Tensor]:
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"decode_head.{k}": v for k, v in head.state_dict().items()})
    state.update({f"auxiliary_head.{k}": v for k, v in aux.state_dict().items()})
    state["data_preprocessor.mean"] = torch.zeros(3, 1, 1)
    return state


def mmseg_logits(backbone, head, x: torch.Tensor) -> torch.Tensor:
    """The segmentor's inference (EncoderDecoder.encode_decode): backbone, then the decode
    head's own ``predict`` (its forward, then bilinear resizing to the image)."""
    return head.predict(backbone(x), [{"img_shape": x.shape[2:]}], None)


@pytest.mark.parametrize(
    "kind,concat_input", [("ann", False), ("nl", False), ("nl", True), ("gc", False), ("gc", True)]
)
def test_mmseg_segmentor(mm, kind, concat_input) -> None:
    backbone, aux = mmseg_backbone(mm), mmseg_aux(mm)
    head = mmseg_head(mm, kind, concat_input)
    for m in (backbone, head, aux):
        prepared(m)
    conv = converted(segmentor_state(backbone, head, aux), "mmseg")
    assert conv.model_name == {"ann": "ann_r50_os8", "nl": "nl_r101_os8", "gc": "gc_r101_os8"}[kind]
    assert conv.overrides.get("concat_input", False) is concat_input
    model = conv.model
    x = torch.randn(1, 3, 65, 81, dtype=torch.float64)
    with torch.no_grad():
        feats = backbone(x)
        ours = model.backbone.forward_stages(x)
        for a, b in zip(ours, feats, strict=True):
            assert rel(a, b) <= 1e-10
        if kind == "ann":
            assert rel(model.head(ours[2], ours[3]), head(list(feats))) <= 1e-10
        else:
            assert rel(model.head(ours[3]), head(list(feats))) <= 1e-10
        assert rel(model.aux_head(ours[2]), aux(list(feats))) <= 1e-10
        # end to end: the logits at the image's size
        assert rel(model(x)["out"], mmseg_logits(backbone, head, x)) <= 1e-10
    if kind == "gc":
        assert conv.report.exact


def test_mmseg_refuses_what_our_models_lack(mm) -> None:
    backbone, head = mmseg_backbone(mm), mmseg_head(mm, "nl", True)
    aux = mm.heads["fcn_head"].FCNHead(
        in_channels=1024, in_index=2, channels=64, num_convs=1, concat_input=True,
        num_classes=5, norm_cfg={"type": "BN"},
    )  # fmt: skip
    with pytest.raises(ConversionError, match="auxiliary_head is an FCNHead with concat_input"):
        convert_state_dict(segmentor_state(backbone, head, aux), "mmseg")
    state = segmentor_state(backbone, head, mmseg_aux(mm))
    plain = create_model("nl_r101_os8", depth=50, num_classes=5, head_channels=128)
    with pytest.raises(ConversionError, match=r"create_segmentation_model\(concat_input=True\)"):
        convert_state_dict(state, "mmseg", plain)


def test_mmseg_resnetv1c_deep_stem(mm) -> None:
    """A V1c (*-d8) segmentor converts into a model built with deep_stem=True, end to end."""
    deep, head, aux = mmseg_backbone(mm, deep_stem=True), mmseg_head(mm, "gc", True), mmseg_aux(mm)
    for m in (deep, head, aux):
        prepared(m)
    state = segmentor_state(deep, head, aux)
    conv = converted(state, "mmseg")
    assert conv.overrides["deep_stem"] is True and conv.overrides["concat_input"] is True
    model = conv.model
    assert model.backbone.deep_stem and not hasattr(model.backbone, "conv1")
    x = torch.randn(1, 3, 65, 81, dtype=torch.float64)
    with torch.no_grad():
        feats = deep(x)
        ours = model.backbone.forward_stages(x)
        for a, b in zip(ours, feats, strict=True):
            assert rel(a, b) <= 1e-10
        assert rel(model(x)["out"], mmseg_logits(deep, head, x)) <= 1e-10
    v1b = create_model("gc_r101_os8", **{**conv.overrides, "deep_stem": False})
    with pytest.raises(ConversionError, match="deep_stem is False, the source's True"):
        convert_state_dict(state, "mmseg", v1b)
