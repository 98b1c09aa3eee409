"""Every registered model: forward, no NaN, gradients everywhere, blocks are the identity at init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nonlocalnet.models import (
    check_identity,
    create_model,
    inserted_blocks,
    list_models,
    model_info,
    without_blocks,
)
from nonlocalnet.models.segmentation import SegmentationModel

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL_INPUT = {"image": (3, 64, 64), "video": (3, 8, 64, 64), "segmentation": (3, 64, 64)}


def _narrow(name: str) -> dict:
    """Overrides that keep a model's structure (depths, inflation, block placement, heads) but
    divide its widths by 8: the width overrides work for every model (the demo uses them)."""
    if "tiny" in name:
        return {}
    kw = {"widths": (8, 16, 32, 64), "stem_channels": 8}
    if model_info(name).task == "segmentation":
        kw["head_channels"] = 16
        if name.startswith("ann"):
            kw["head_kwargs"] = {"key_channels": 8, "value_channels": 8}
    return kw


def _models(names=None):
    """(name, narrow) cases: every model at full width (up to ~3 s each on one thread) and
    narrowed."""
    names = list_models() if names is None else names
    cases = [pytest.param(n, True, id=f"{n}-narrow") for n in names]
    cases += [pytest.param(n, False, id=n) for n in names if "tiny" not in n]
    return cases


def _example(name: str) -> torch.Tensor:
    info = model_info(name)
    size = info.defaults.get("default_input") if "tiny" in name else SMALL_INPUT[info.task]
    return torch.randn(1, *size)


def _output(out) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(v.float().sum() for v in out.values())
    return out.sum()


@pytest.mark.parametrize(("name", "narrow"), _models())
def test_forward_backward_every_model(name, narrow):
    model = create_model(name, num_classes=3, **(_narrow(name) if narrow else {}))
    x = _example(name)
    model.train()
    out = model(x)
    if isinstance(model, SegmentationModel):
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == (1, 3, *x.shape[2:])
        assert out["aux"].shape == (1, 3, *x.shape[2:])
        assert model.aux_weight == 0.4
    else:
        assert out.shape == (1, 3)
    assert torch.isfinite(_output(out))
    _output(out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    # the zero-initialised layer of each inserted block gets a non-zero gradient (it can learn)
    for bname, block in inserted_blocks(model).items():
        grads = [p.grad.abs().sum() for p in block.parameters()]
        assert sum(grads) > 0, bname
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(model, SegmentationModel):
        assert set(out) == {"out"}
    assert hasattr(model, "default_input")


@pytest.mark.parametrize(
    ("name", "narrow"), _models([n for n in list_models() if n.startswith(("nl_", "gc_"))])
)
def test_blocks_are_identity_at_init(name, narrow):
    model = create_model(name, num_classes=3, **(_narrow(name) if narrow else {}))
    if isinstance(model, SegmentationModel):
        plain = without_blocks(model)
        plain.head.block = nn.Identity()
        assert not isinstance(model.head.block, nn.Identity)
    else:
        assert inserted_blocks(model)
        plain = without_blocks(model)
    assert check_identity(plain, model, _example(name))


# the network without blocks, built by its own zoo entry, loaded into the one with blocks:
# the papers' initialisation (a plain checkpoint, strict=False, only the blocks' keys missing)
PAIRS = [
    ("nl_c2d_tiny", "c2d_tiny", False),
    ("nl_resnet50", "resnet50", True),
    ("gc_resnet50", "resnet50", True),
    ("nl_c2d_r50", "c2d_r50", True),
    ("nl_i3d_r50", "i3d_r50", True),
    ("nl_c2d_r50", "c2d_r50", False),
    ("gc_resnet50", "resnet50", False),
]


@pytest.mark.parametrize(("with_blocks", "plain_name", "narrow"), PAIRS)
def test_plain_checkpoint_into_model_with_blocks(with_blocks, plain_name, narrow):
    kw = _narrow(plain_name) if narrow else {}
    plain = create_model(plain_name, num_classes=3, **kw)
    model = create_model(with_blocks, num_classes=3, **kw)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    block_keys = {f"{n}.{k}" for n, b in inserted_blocks(model).items() for k in b.state_dict()}
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {k for k in block_keys if "num_batches" not in k}
    assert check_identity(plain, model, _example(with_blocks))


def test_overrides():
    model = create_model("nl_c2d_tiny", pairwise="dot_product", extent="space", num_classes=5)
    blocks = list(inserted_blocks(model).values())
    assert blocks and all(b.pairwise == "dot_product" and b.extent == "space" for b in blocks)
    assert all(b.sub_sample and b.sub_sample_position == "before" for b in blocks)
    assert model.fc.out_features == 5
    model = create_model("nl_c2d_tiny", sub_sample=False)
    assert not any(b.sub_sample for b in inserted_blocks(model).values())
    with torch.device("meta"):
        gc = create_model("gc_resnet50", ratio=1 / 4)
    assert gc.layer2[0].gc.transform_add[0].out_channels == 512 // 4
    model = create_model("c2d_tiny", dropout=0.3, layers=(1, 2, 1, 1))
    assert len(model.layer2) == 2 and model.dropout.p == 0.3
    with pytest.raises(TypeError, match=r"unknown override\(s\) 'pairwise'.*valid overrides are"):
        create_model("c2d_tiny", pairwise="dot_product")
    with pytest.raises(TypeError, match="'ratio'"):
        create_model("nl_c2d_tiny", ratio=0.5)
    with pytest.raises(ValueError, match="unknown model 'c2d_r18'"):
        create_model("c2d_r18")
    assert create_model("resnet_tiny").model_name == "resnet_tiny"


def test_registry_contents_and_docs():
    required = [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "nl_resnet50",
        "gc_resnet50",
        "gc_resnet50_r4",
        "gc_resnet101",
        "c2d_r50",
        "c2d_r101",
        "i3d_r50",
        "i3d_r101",
        "i3d_r50_3x3x3",
        "i3d_r101_3x3x3",
        "nl_c2d_r50",
        "nl_c2d_r50_1block",
        "nl_c2d_r50_10block",
        "nl_c2d_r101",
        "nl_c2d_r101_1block",
        "nl_c2d_r101_10block",
        "nl_i3d_r50",
        "nl_i3d_r101",
        "fcn_r50_os8",
        "fcn_r101_os8",
        "ann_r50_os8",
        "ann_r101_os8",
        "nl_r101_os8",
        "gc_r101_os8",
        "c2d_tiny",
        "nl_c2d_tiny",
        "resnet_tiny",
    ]
    assert set(required) <= set(list_models())
    for name in list_models():
        assert model_info(name).doc, name
    assert "73.8/91.0" in model_info("nl_c2d_r50").doc
    assert "71.8/89.7" in model_info("c2d_r50").doc
    assert "74.9/91.6" in model_info("nl_i3d_r50").doc
    assert "79.9" in model_info("ann_r101_os8").doc
    assert "39.4/35.7" in model_info("gc_resnet50").doc
    assert "tests and demos" in model_info("c2d_tiny").doc
    assert list_models("nl_c2d_r50*") == ["nl_c2d_r50", "nl_c2d_r50_10block", "nl_c2d_r50_1block"]
    assert "c2d_tiny" in list_models(task="video") and "c2d_tiny" not in list_models(task="image")
    # every model is also a documented function of the zoo module
    from nonlocalnet.models import zoo

    assert zoo.nl_c2d_r50.__doc__.startswith("NL C2D ResNet-50")
    assert "pairwise" in zoo.nl_c2d_r50.__doc__  # lists its overrides
    assert zoo.c2d_tiny(num_classes=2).fc.out_features == 2


def test_models_subcommand(capsys):
    from nonlocalnet.cli import main

    assert main(["models", "*tiny", "--params"]) == 0
    out = capsys.readouterr().out
    assert "c2d_tiny" in out and "resnet_tiny" in out and "c2d_r50 " not in out
    assert main(["models", "no_such_model*"]) == 2
