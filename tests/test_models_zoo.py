"""Every registered model: forward, no NaN, gradients everywhere, blocks are the identity at init;
the registry (one def per model, declared block options, ranked suggestions, outside models) and
the ``nonlocalnet models`` listing."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

from nonlocalnet.layers import (
    EMAU,
    CrissCrossAttention,
    DisentangledNonLocalNd,
    EfficientAttention,
    GlobalContext,
    NonLocalNd,
)
from nonlocalnet.models import (
    check_identity,
    create_model,
    create_resnet,
    inserted_blocks,
    list_models,
    model_info,
    register_model,
    without_blocks,
    zoo,
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


#: the models that take one input tensor (detectors take lists of images and have their own
#: tests: tests/test_detection_zoo.py).
TENSOR_MODELS = [n for n in list_models() if model_info(n).task != "detection"]


def _models(names=None):
    """(name, narrow) cases: every model at full width (up to ~3 s each on one thread) and
    narrowed."""
    names = TENSOR_MODELS if names is None else names
    cases = [pytest.param(n, True, id=f"{n}-narrow") for n in names]
    cases += [pytest.param(n, False, id=n) for n in names if "tiny" not in n]
    return cases


def _example(name: str) -> torch.Tensor:
    info = model_info(name)
    size = info.default_input() if "tiny" in name else SMALL_INPUT[info.task]
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
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not torch.isfinite(p.grad).all()
    ]
    assert not bad
    # the zero-initialised layer of each inserted block gets a non-zero gradient (it can learn)
    for bname, block in inserted_blocks(model).items():
        grads = [p.grad.abs().sum() for p in block.parameters() if p.requires_grad]
        assert sum(grads) > 0, bname
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(model, SegmentationModel):
        assert set(out) == {"out"}
    assert hasattr(model, "default_input")


@pytest.mark.parametrize(
    ("name", "narrow"), _models([n for n in TENSOR_MODELS if n.startswith(("nl_", "gc_"))])
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
    assert zoo.nl_c2d_r50.__doc__.startswith("NL C2D ResNet-50")
    assert "pairwise" in model_info("nl_c2d_r50").valid_overrides()
    assert zoo.c2d_tiny(num_classes=2).fc.out_features == 2


ZOO_SOURCE = inspect.getsource(zoo)


@pytest.mark.parametrize("name", list_models())
def test_every_model_is_a_def_of_the_zoo(name):
    """Each name is a module-level ``def <name>(**overrides)`` of zoo.py (grep-able), registered
    as itself, whose body builds that very name."""
    assert hasattr(zoo, name)
    fn = getattr(zoo, name)
    assert inspect.isfunction(fn)
    assert fn.__module__ == zoo.__name__
    assert fn.__name__ == fn.__qualname__ == fn.__code__.co_name == name  # a def, not renamed
    assert re.search(rf"^def {name}\(\*\*overrides: Any\) -> nn\.Module:$", ZOO_SOURCE, re.M)
    assert f'return create_model("{name}", **overrides)' in inspect.getsource(fn)
    info = model_info(name)
    assert info.fn is fn
    assert info.doc == inspect.cleandoc(fn.__doc__)


def test_every_model_function_builds_its_model():
    for name in list_models():
        with torch.device("meta"):
            model = getattr(zoo, name)()
        assert model.model_name == name


@pytest.mark.parametrize("name", [n for n in list_models() if "tiny" not in n])
def test_docs_cite_their_paper(name):
    doc = " ".join(model_info(name).doc.split())
    assert any(paper in doc for paper in zoo.PAPERS.values()), name


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_resnet_docs_give_the_parameter_count(name, params):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert f"{params:,} parameters" in model_info(name).doc


def test_block_shortcuts_are_declared_per_model():
    nl_video = set(zoo.NL_VIDEO_OPTIONS)
    assert set(model_info("nl_c2d_r50").shortcuts) == nl_video
    assert "extent" in nl_video and "ratio" not in nl_video
    assert set(model_info("nl_resnet50").shortcuts) == set(zoo.NL_OPTIONS) == nl_video - {"extent"}
    assert set(model_info("gc_resnet50").shortcuts) == set(zoo.GC_OPTIONS)
    assert set(model_info("gc_resnet50").shortcuts) & nl_video == set()
    # the segmentation heads: same builder argument (head_kwargs), options of their own block
    assert set(model_info("nl_r101_os8").shortcuts) == set(zoo.NL_OPTIONS)
    assert set(model_info("gc_r101_os8").shortcuts) == set(zoo.GC_OPTIONS)
    assert model_info("nl_r101_os8").block_key == model_info("gc_r101_os8").block_key
    assert model_info("c2d_r50").shortcuts == model_info("ann_r101_os8").shortcuts == ()
    # every model with inserted blocks declares options; every model without declares none
    for name in list_models():
        info = model_info(name)
        assert bool(info.shortcuts) == (info.block_key is not None), name


def _keywords(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "channels"}


@pytest.mark.parametrize("name", [n for n in list_models() if model_info(n).shortcuts])
def test_shortcuts_reach_the_blocks(name):
    """A declared option is a keyword of the model's block and reaches every inserted block."""
    info = model_info(name)
    successors = {
        zoo.DNL_OPTIONS: (DisentangledNonLocalNd, {"temperature": 0.1, "inner_channels": 4}),
        zoo.CCA_OPTIONS: (CrissCrossAttention, {"recurrence": 3, "inner_channels": 4}),
        zoo.EMA_OPTIONS: (EMAU, {"num_bases": 8, "num_stages": 2}),
        zoo.EFFATTN_OPTIONS: (EfficientAttention, {"heads": 2, "key_channels": 8}),
    }
    if info.shortcuts in successors:
        cls, options = successors[info.shortcuts]
        assert set(info.shortcuts) <= _keywords(cls)
        with torch.device("meta"):
            model = create_model(name, **options)
        blocks = [m for m in model.modules() if isinstance(m, cls)]
        assert len(blocks) == 1
        for k, v in options.items():
            assert getattr(blocks[0], k) == v, k
        return
    if set(info.shortcuts) <= set(zoo.GC_OPTIONS):
        assert set(info.shortcuts) <= _keywords(GlobalContext)
        with torch.device("meta"):
            model = create_model(name, fusion="mul", pooling="avg")
        blocks = [m for m in model.modules() if isinstance(m, GlobalContext)]
        assert blocks and all(b.fusion == ("mul",) and b.pooling == "avg" for b in blocks)
    else:
        assert set(info.shortcuts) <= _keywords(NonLocalNd)
        with torch.device("meta"):
            model = create_model(name, pairwise="dot_product", inner_channels=4)
        blocks = [m for m in model.modules() if isinstance(m, NonLocalNd)]
        assert blocks and all(b.pairwise == "dot_product" for b in blocks)
        assert all(b.inner_channels == 4 for b in blocks)
        # the model's own block options stay unless overridden
        default_kw = info.defaults.get(info.block_key) or {}
        for k, v in default_kw.items():
            assert all(getattr(b, k) == v for b in blocks), k


def _similar(name: str) -> list[str]:
    with pytest.raises(ValueError, match=f"unknown model {name!r}") as err:
        create_model(name)
    found = re.search(r"similar: ([^;]*);", str(err.value))
    return found.group(1).split(", ") if found else []


def test_unknown_name_suggestions_are_ranked():
    assert _similar("nl_c2d_tyni")[0] == "nl_c2d_tiny"
    assert _similar("gc_resnet_50")[0] == "gc_resnet50"
    assert _similar("resnet5")[0] == "resnet50"
    assert _similar("i3d_r50_3x3")[0] == "i3d_r50_3x3x3"
    assert _similar("completely_unrelated") == []


@pytest.mark.parametrize("name", list_models())
def test_default_input_is_known_without_building(name):
    info = model_info(name)
    with torch.device("meta"):
        model = create_model(name)
    assert info.default_input() == tuple(model.default_input)


@pytest.fixture
def outside_names():
    """Names registered by a test, removed from the registry afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        zoo._REGISTRY.pop(n, None)


def test_register_model_from_outside(outside_names):
    def my_tiny_net(*, num_classes: int = 7, width: int = 4) -> nn.Module:
        """A net of one's own: a linear layer."""
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))
        model.default_input = (3, 4, 4)
        model.width = width
        return model

    outside_names += ["my_tiny_net", "my_net_alias", "my_nl_resnet18"]
    assert register_model(task="image")(my_tiny_net) is my_tiny_net  # returned as is
    model = create_model("my_tiny_net", num_classes=3, width=2)
    assert model[1].out_features == 3 and model.width == 2
    assert model.model_name == "my_tiny_net"
    assert "my_tiny_net" in list_models(task="image")
    assert "my_tiny_net" not in list_models(task="video")
    info = model_info("my_tiny_net")
    assert info.valid_overrides() == ["num_classes", "width"]
    assert info.summary == "A net of one's own: a linear layer."
    with pytest.raises(TypeError, match=r"unknown override\(s\) 'depth'.*num_classes, width"):
        create_model("my_tiny_net", depth=3)
    # an explicit name; a duplicate (own or of the zoo) is refused, naming who holds it
    register_model(task="video", name="my_net_alias")(my_tiny_net)
    assert model_info("my_net_alias").task == "video"
    with pytest.raises(ValueError, match=r"'my_tiny_net' is already registered by .*my_tiny_net"):
        register_model(task="image")(my_tiny_net)
    with pytest.raises(ValueError, match=r"'resnet50' is already registered by .*zoo\.resnet50"):
        register_model(task="image", name="resnet50")(my_tiny_net)
    assert model_info("resnet50").fn is zoo.resnet50  # untouched
    # a zoo-style entry: a builder, its defaults and the block options it forwards
    register_model(
        task="image",
        name="my_nl_resnet18",
        builder=create_resnet,
        defaults={"depth": 18, "nonlocal_placement": [[], [], [0], []]},
        block_key="nonlocal_kwargs",
        shortcuts=zoo.NL_OPTIONS,
    )(my_tiny_net)
    with torch.device("meta"):
        model = create_model("my_nl_resnet18", pairwise="gaussian")
    assert [b.pairwise for b in inserted_blocks(model).values()] == ["gaussian"]
    assert model_info("my_nl_resnet18").default_input() == (3, 224, 224)


def test_register_model_refuses_bad_entries(outside_names):
    def net(*, num_classes: int = 2) -> nn.Module:
        return nn.Linear(2, num_classes)

    outside_names.append("net")
    with pytest.raises(ValueError, match="unknown task 'speech'"):
        register_model(task="speech")
    with pytest.raises(ValueError, match="need a block_key"):
        register_model(task="image", shortcuts=("pairwise",))(net)
    with pytest.raises(
        ValueError, match=r"defaults \['depht'\] are not arguments of create_resnet"
    ):
        register_model(task="image", builder=create_resnet, defaults={"depht": 50})(net)
    with pytest.raises(ValueError, match="block_key 'nl_kwargs' is not an argument"):
        register_model(
            task="image", builder=create_resnet, block_key="nl_kwargs", shortcuts=("pairwise",)
        )(net)
    with pytest.raises(ValueError, match="also arguments of create_resnet"):
        register_model(
            task="image", builder=create_resnet, block_key="nonlocal_kwargs", shortcuts=("depth",)
        )(net)
    with pytest.raises(ValueError, match="name must be a non-empty word"):
        register_model(task="image", name="my net")(net)
    assert "net" not in list_models()  # nothing half-registered
    register_model(task="image", name="not_a_module")(lambda **kw: "a string")
    outside_names.append("not_a_module")
    with pytest.raises(TypeError, match=r"must return an nn\.Module, got str"):
        create_model("not_a_module")
    with pytest.raises(ValueError, match="unknown task 'audio'"):
        list_models(task="audio")


def _listing(capsys, *argv: str) -> list[str]:
    from nonlocalnet.cli import main

    assert main(["models", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_models_subcommand(capsys):
    from nonlocalnet.cli import main

    lines = _listing(capsys, "*tiny", "--params")
    assert lines[0].split() == ["name", "task", "params", "input", "description"]
    out = "\n".join(lines)
    assert "c2d_tiny" in out and "resnet_tiny" in out and "c2d_r50 " not in out
    assert main(["models", "no_such_model*"]) == 2


def test_models_listing_has_a_default_input_on_every_row(capsys):
    lines = _listing(capsys)
    assert lines[0].split() == ["name", "task", "input", "description"]
    rows = lines[1:]
    assert [r.split()[0] for r in rows] == list_models()
    for row in rows:
        name, task, size = row.split()[:3]
        assert task == model_info(name).task
        assert re.fullmatch(r"\d+(x\d+)+", size), row
        assert tuple(int(s) for s in size.split("x")) == model_info(name).default_input()


def test_models_listing_cuts_descriptions_at_a_word(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    lines = _listing(capsys)
    start = lines[0].index("description")
    cut = 0
    for row in lines[1:]:
        assert len(row) <= 100, row
        summary = model_info(row.split()[0]).summary
        text = row[start:]
        if text.endswith(" …"):
            kept = text[: -len(" …")]
            cut += 1
            assert summary.startswith(kept) and summary[len(kept)] == " ", (kept, summary)
        else:
            assert text == summary
    assert cut > 0  # the width above does cut some


def test_models_listing_full_doc(capsys):
    lines = _listing(capsys, "nl_c2d_r50_1block", "--doc")
    out = "\n".join(lines)
    assert "72.7/90.5" in out and "dot_product 72.9" in out
    assert "block options (into nonlocal_kwargs): pairwise" in out
