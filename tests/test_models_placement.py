"""Placement of blocks: keys, identity at initialisation, validation, any user model."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from nonlocalnet import NonLocal2d, NonLocal3d
from nonlocalnet.layers.global_context import GlobalContext
from nonlocalnet.models import (
    check_identity,
    check_placement,
    create_resnet,
    create_video_resnet,
    insert_blocks,
    inserted_blocks,
    nl_preset,
    place_blocks,
    without_blocks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_2D = {
    "block": "bottleneck",
    "layers": (2, 2, 3, 2),
    "widths": (4, 8, 16, 32),
    "stem_channels": 8,
}


def _tiny_2d(**kw):
    return create_resnet(num_classes=5, **TINY_2D, **kw)


def test_nl_keys_unchanged_and_plain_checkpoint_loads():
    plain = _tiny_2d()
    with_nl = _tiny_2d(nonlocal_placement=[[], [1], [0, 2], []])
    plain_keys = set(plain.state_dict())
    nl_keys = set(with_nl.state_dict())
    assert plain_keys <= nl_keys
    new = nl_keys - plain_keys
    assert new and all(
        k.startswith(("layer2.1.after.", "layer3.0.after.", "layer3.2.after.")) for k in new
    )
    block_keys = {
        f"{name}.{k}" for name, b in inserted_blocks(with_nl).items() for k in b.state_dict()
    }
    assert new == block_keys
    result = with_nl.load_state_dict(plain.state_dict(), strict=False)
    # BatchNorm never reports num_batches_tracked as missing (it fills in 0)
    assert set(result.missing_keys) == {k for k in block_keys if "num_batches" not in k}
    assert result.unexpected_keys == []
    # the loaded network with its fresh blocks computes exactly the plain one
    x = torch.randn(2, 3, 32, 32)
    assert check_identity(plain, with_nl, x)


def test_gc_inside_bottleneck_keys():
    plain = _tiny_2d()
    with_gc = _tiny_2d(gc_placement=[[], [0, 1], [], [1]], gc_kwargs={"ratio": 1 / 4})
    new = set(with_gc.state_dict()) - set(plain.state_dict())
    prefixes = {k.split(".gc.")[0] for k in new}
    assert prefixes == {"layer2.0", "layer2.1", "layer4.1"}
    assert all(".gc." in k for k in new)
    result = with_gc.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == new
    assert result.unexpected_keys == []
    assert check_identity(plain, with_gc, torch.randn(2, 3, 32, 32))
    # GC runs before the residual addition: with a non-zero transform the output of the
    # bottleneck is relu(gc(bn3(...)) + identity), checked against a hand-written forward.
    blk = with_gc.layer2[0]
    with torch.no_grad():
        blk.gc.transform_add[-1].weight.normal_()
    blk.eval()
    x = torch.randn(1, 16, 8, 8)
    out = blk.relu(blk.bn1(blk.conv1(x)))
    out = blk.relu(blk.bn2(blk.conv2(out)))
    out = blk.gc(blk.bn3(blk.conv3(out)))
    expected = torch.relu(out + blk.downsample(x))
    torch.testing.assert_close(blk(x), expected, rtol=0, atol=0)


def test_blocks_keep_zero_init_and_backbone_is_initialised():
    model = _tiny_2d(nonlocal_placement=[[], [0], [], []], gc_placement=[[], [], [0], []])
    nl = model.layer2[0].after
    assert torch.count_nonzero(nl.norm.weight) == 0  # BN gamma of W_z: zero-init survives
    gc = model.layer3[0].gc
    assert torch.count_nonzero(gc.transform_add[-1].weight) == 0
    assert torch.count_nonzero(gc.transform_add[-1].bias) == 0
    # backbone: Kaiming fan_out for convs (std sqrt(2 / fan_out)), BN 1/0
    conv = model.layer3[0].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    std = conv.weight.std().item()
    assert abs(std - (2 / fan_out) ** 0.5) < 0.25 * (2 / fan_out) ** 0.5
    assert torch.all(model.layer1[0].bn3.weight == 1) and torch.all(model.layer1[0].bn3.bias == 0)


def test_zero_init_residual_option():
    off = _tiny_2d()
    on = _tiny_2d(zero_init_residual=True)
    assert torch.all(off.layer1[0].bn3.weight == 1)
    assert torch.count_nonzero(on.layer1[0].bn3.weight) == 0
    assert torch.all(on.layer1[0].bn1.weight == 1)


def test_placement_errors_name_the_stage():
    with pytest.raises(ValueError, match=r"res4 \(layer3\) has 6 blocks, index 6 out of range"):
        check_placement([[], [], [6], []], (3, 4, 6, 3))
    with pytest.raises(ValueError, match=r"res2 \(layer1\) has 3 blocks, index -1"):
        check_placement([[-1], [], [], []], (3, 4, 6, 3))
    with pytest.raises(ValueError, match="one index list per stage"):
        check_placement([[], []], (3, 4, 6, 3))
    with pytest.raises(ValueError, match=r"res3 \(layer2\): repeated"):
        check_placement([[], [1, 1], [], []], (3, 4, 6, 3))
    with pytest.raises(ValueError, match=r"res5 \(layer4\) has 2 blocks, index 2"):
        _tiny_2d(nonlocal_placement=[[], [], [], [2]])
    with pytest.raises(ValueError, match=r"res4 \(layer3\) has 3 blocks, index 5"):
        create_video_resnet(
            block="basic", layers=(1, 1, 3, 1), nonlocal_placement=[[], [], [5], []]
        )
    assert check_placement([[2, 0], [], [], []], (3, 4, 6, 3)) == [[0, 2], [], [], []]


def test_presets():
    assert nl_preset("5block", 50) == [[], [1, 3], [1, 3, 5], []]
    assert nl_preset("5block", 101) == [[], [1, 3], [6, 13, 20], []]
    assert sum(map(len, nl_preset("10block", 50))) == 10
    assert sum(map(len, nl_preset("10block", 101))) == 10
    assert nl_preset("1block", 50) == [[], [], [2], []]
    for name in ("1block", "5block", "10block"):
        check_placement(nl_preset(name, 50), (3, 4, 6, 3))
        check_placement(nl_preset(name, 101), (3, 4, 23, 3))
    with pytest.raises(ValueError, match="unknown NL preset"):
        nl_preset("3block", 50)


class UserNet(nn.Module):
    """A model a user brings: not a ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_insert_blocks_into_any_model():
    net = UserNet()
    before = copy.deepcopy(net)
    insert_blocks(net, {"features.1": NonLocal2d(8), "features.3": GlobalContext(8, ratio=1 / 4)})
    assert set(net.state_dict()) - set(before.state_dict()) == {
        f"features.1.after.{k}" for k in NonLocal2d(8).state_dict()
    } | {f"features.3.after.{k}" for k in GlobalContext(8, ratio=1 / 4).state_dict()}
    x = torch.randn(2, 3, 12, 12)
    assert check_identity(before, net, x)
    # once the block is trained (non-zero gamma), the output changes: the block really runs
    with torch.no_grad():
        net.features[1].after.norm.weight.fill_(1.0)
    assert not check_identity(before, net, x, raise_error=False)
    with pytest.raises(AssertionError, match="max abs difference"):
        check_identity(before, net, x)
    # and it runs on the output of features.1 (ReLU), before features.2
    feats = {}
    net.features[2].register_forward_pre_hook(lambda m, a: feats.setdefault("in", a[0]))
    net.eval()
    net(x)
    relu_out = torch.relu(net.features[0](x))
    torch.testing.assert_close(feats["in"], net.features[1].after(relu_out))


def test_insert_blocks_errors():
    net = UserNet()
    with pytest.raises(KeyError, match=r"'features\.9' is not a submodule"):
        insert_blocks(net, {"features.9": NonLocal2d(8)})
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        insert_blocks(net, {"features.1": "nl"})
    insert_blocks(net, {"features.1": NonLocal2d(8)})
    with pytest.raises(ValueError, match="already has a block"):
        insert_blocks(net, {"features.1": NonLocal2d(8)})


def test_deepcopy_and_pickle_keep_hooks_on_the_copy():
    model = _tiny_2d(nonlocal_placement=[[], [0], [], []])
    with torch.no_grad():
        model.layer2[0].after.norm.weight.fill_(1.0)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.layer2[0].after.norm.weight.fill_(3.0)
    model.eval()
    clone.eval()
    x = torch.randn(1, 3, 32, 32)
    # the clone's hook runs the clone's block (weight 3), not the original's (weight 1)
    assert not torch.allclose(model(x), clone(x))
    stripped = without_blocks(model)
    assert check_identity(stripped, _copy_plain(model), x)


def _copy_plain(model):
    plain = _tiny_2d()
    plain.load_state_dict(model.state_dict(), strict=False)
    return plain


def test_place_blocks_on_video_model_3d():
    model = create_video_resnet(
        block="basic", layers=(1, 2, 1, 1), widths=(4, 8, 8, 8), stem_channels=4, num_classes=3
    )
    before = copy.deepcopy(model)
    added = place_blocks(model, [[0], [1], [], [0]], lambda c: NonLocal3d(c, sub_sample=True))
    assert sorted(added) == ["layer1.0", "layer2.1", "layer4.0"]
    assert check_identity(before, model, torch.randn(1, 3, 8, 32, 32))


def test_gc_in_video_bottlenecks():
    kw = {"block": "bottleneck", "layers": (1, 2, 1, 1), "widths": (4, 8, 16, 16), "num_classes": 3}
    plain = create_video_resnet(**kw)
    with_gc = create_video_resnet(
        gc_placement=[[], [0, 1], [0], []], gc_kwargs={"ratio": 1 / 4}, **kw
    )
    assert isinstance(with_gc.layer2[1].gc.transform_add[0], nn.Conv3d)
    with_gc.load_state_dict(plain.state_dict(), strict=False)
    assert check_identity(plain, with_gc, torch.randn(1, 3, 8, 32, 32))


def _model_imports() -> dict[str, set[str]]:
    """Module of ``nonlocalnet.models`` -> the modules of ``nonlocalnet.models`` it imports
    (at module level or inside functions)."""
    import nonlocalnet.models as pkg

    graph = {}
    for path in Path(pkg.__file__).parent.glob("*.py"):
        name = f"nonlocalnet.models.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m.startswith("nonlocalnet.models.")} - {name}
    return graph


def test_no_import_cycle_in_models():
    graph = _model_imports()
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    # the backbone does not know about placement or the builders; placement only of the backbone
    assert graph["nonlocalnet.models.resnet"] == set()
    assert graph["nonlocalnet.models.placement"] == {"nonlocalnet.models.resnet"}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, (*path, node))
        done.add(node)

    for node in graph:
        visit(node, ())
