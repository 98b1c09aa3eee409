"""Placing attention blocks into networks: placement as data, validated against stage depths.

Two kinds of placement, as in the papers:

* **after** a residual block (NL): :func:`insert_blocks` attaches the block to the named
  submodule as its child ``after`` and registers a forward hook that runs it on the submodule's
  output. The existing keys do not change (``layer3.1.conv1.weight`` stays), the block adds
  ``layer3.1.after.*``: a checkpoint of the plain network loads with ``strict=False`` and only
  the new blocks' keys missing. Works on any ``nn.Module`` a user brings, as long as the named
  submodule is called once per forward.
* **inside** a bottleneck (GC): :func:`insert_context_blocks` sets the block's ``gc`` submodule,
  which runs after ``conv3``/``bn3`` and before the residual addition (keys ``layer2.0.gc.*``).

Placement is per stage: ``[[], [1, 3], [1, 3, 5], []]`` lists, for res2..res5 (``layer1``..
``layer4``), the indices of the residual blocks concerned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from nonlocalnet.models.resnet import STAGE_NAMES

__all__ = [
    "NL_PRESETS",
    "check_identity",
    "check_placement",
    "gc_placement",
    "insert_blocks",
    "insert_context_blocks",
    "inserted_blocks",
    "nl_preset",
    "place_blocks",
    "without_blocks",
]

#: attribute under which :func:`insert_blocks` stores a block on its target.
AFTER = "after"

Placement = Sequence[Sequence[int]]


def _run_after(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook: the block stored on ``module`` runs on its output."""
    return getattr(module, AFTER)(output)


def insert_blocks(model: nn.Module, blocks: Mapping[str, nn.Module]) -> nn.Module:
    """Add blocks after named submodules of any model, in place.

    Args:
        model: the network.
        blocks: submodule name (as in ``model.named_modules()``, e.g. ``"layer3.2"``) → block
            to run on that submodule's output. The block must keep the output's shape.

    Returns:
        ``model`` (modified in place).

    Raises:
        KeyError: a name is not a submodule of ``model``.
        ValueError: a submodule already has a block after it.
        TypeError: a block is not an ``nn.Module``.
    """
    modules = dict(model.named_modules())
    for name, block in blocks.items():
        if name not in modules or name == "":
            near = [n for n in modules if n and n.split(".")[0] == name.split(".")[0]][:8]
            raise KeyError(
                f"insert_blocks: {name!r} is not a submodule of {type(model).__name__}"
                + (f"; submodules there include {near}" if near else "")
            )
        if not isinstance(block, nn.Module):
            raise TypeError(
                f"insert_blocks: the block for {name!r} must be an nn.Module, "
                f"got {type(block).__name__}"
            )
        target = modules[name]
        if getattr(target, AFTER, None) is not None:
            raise ValueError(f"insert_blocks: {name!r} already has a block after it")
        target.add_module(AFTER, block)
        target.register_forward_hook(_run_after)
    return model


def inserted_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Blocks added by :func:`insert_blocks` (``"layer3.1.after"``) or as ``gc`` of a block."""
    found = {}
    for name, m in model.named_modules():
        for attr in (AFTER, "gc"):
            child = getattr(m, attr, None)
            if isinstance(child, nn.Module) and child in m.children():
                found[f"{name}.{attr}" if name else attr] = child
    return found


def check_placement(placement: Placement, depths: Sequence[int]) -> list[list[int]]:
    """Validate per-stage block indices against the stage depths.

    Args:
        placement: one index list per stage (res2..res5).
        depths: number of residual blocks of each stage.

    Returns:
        The placement as sorted lists.

    Raises:
        ValueError: wrong number of stages, or an index out of range / repeated; the message
            names the stage (e.g. ``res4 (layer3) has 6 blocks, index 6 out of range``).
    """
    placement = [list(p) for p in placement]
    if len(placement) != len(depths):
        raise ValueError(
            f"placement must have one index list per stage ({len(depths)}: "
            f"{', '.join(STAGE_NAMES[: len(depths)])}), got {len(placement)}"
        )
    out = []
    for s, (idx, depth) in enumerate(zip(placement, depths, strict=True)):
        stage = f"{STAGE_NAMES[s]} (layer{s + 1})"
        for i in idx:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"{stage}: block indices must be ints, got {i!r}")
            if not 0 <= i < depth:
                raise ValueError(
                    f"{stage} has {depth} blocks, index {i} out of range [0, {depth - 1}]"
                )
        if len(set(idx)) != len(idx):
            raise ValueError(f"{stage}: repeated block index in {idx}")
        out.append(sorted(idx))
    return out


def _stage_depths(model: nn.Module) -> list[int]:
    return [len(getattr(model, f"layer{s + 1}")) for s in range(4)]


def _stage_channels(model: nn.Module, s: int) -> int:
    last = getattr(model, f"layer{s + 1}")[-1]
    norm = last.last_norm() if hasattr(last, "last_norm") else None
    return int(norm.num_features)  # type: ignore[union-attr]


def place_blocks(
    model: nn.Module, placement: Placement, factory: Callable[[int], nn.Module]
) -> dict[str, nn.Module]:
    """Add a block after each listed residual block of a ResNet (NL placement).

    Args:
        model: a network with ``layer1``..``layer4`` (our :class:`ResNet`, or torchvision's).
        placement: per stage, indices of the residual blocks after which to add a block.
        factory: ``factory(channels) -> block``.

    Returns:
        name → block added.
    """
    placement = check_placement(placement, _stage_depths(model))
    blocks = {
        f"layer{s + 1}.{i}": factory(_stage_channels(model, s))
        for s, idx in enumerate(placement)
        for i in idx
    }
    insert_blocks(model, blocks)
    return blocks


def insert_context_blocks(
    model: nn.Module, placement: Placement, factory: Callable[[int], nn.Module]
) -> dict[str, nn.Module]:
    """Put a block inside listed residual blocks, before the residual addition (GC placement).

    Args:
        model: our :class:`~nonlocalnet.models.resnet.ResNet` (blocks with a ``gc`` slot).
        placement: per stage, indices of the residual blocks that get a block.
        factory: ``factory(channels) -> block`` (channels of the block's output).

    Returns:
        name (``"layer2.0.gc"``) → block added.
    """
    placement = check_placement(placement, _stage_depths(model))
    added = {}
    for s, idx in enumerate(placement):
        stage = getattr(model, f"layer{s + 1}")
        for i in idx:
            blk = stage[i]
            if not hasattr(blk, "gc"):
                raise TypeError(
                    f"layer{s + 1}.{i} ({type(blk).__name__}) has no gc slot; use "
                    "nonlocalnet.models.resnet blocks or insert_blocks"
                )
            if blk.gc is not None:
                raise ValueError(f"layer{s + 1}.{i} already has a gc block")
            blk.gc = factory(_stage_channels(model, s))
            added[f"layer{s + 1}.{i}.gc"] = blk.gc
    return added


#: NL placements of the paper (per stage: indices of residual blocks followed by a block).
NL_PRESETS: dict[str, dict[int, list[list[int]]]] = {
    # one block in res4, after its 3rd block (index 2 of 6 in R50, as the paper's usual choice).
    "1block": {50: [[], [], [2], []], 101: [[], [], [2], []]},
    # every other block of res3 and res4 (official R101: res3 1,3 and res4 6,13,20).
    "5block": {50: [[], [1, 3], [1, 3, 5], []], 101: [[], [1, 3], [6, 13, 20], []]},
    # R50: every block of res3 and res4 (the paper). R101 (no paper setting): 10 blocks too,
    # all of res3 and every 4th block of res4 (this library's choice, described in the zoo).
    "10block": {
        50: [[], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], []],
        101: [[], [0, 1, 2, 3], [0, 4, 8, 12, 16, 20], []],
    },
}


def nl_preset(name: str, depth: int) -> list[list[int]]:
    """The paper's NL placement ``name`` (1block / 5block / 10block) for R50 or R101."""
    if name not in NL_PRESETS:
        raise ValueError(f"unknown NL preset {name!r}; expected one of {sorted(NL_PRESETS)}")
    if depth not in NL_PRESETS[name]:
        raise ValueError(f"NL preset {name!r} is defined for depths 50 and 101, got {depth}")
    return [list(p) for p in NL_PRESETS[name][depth]]


def gc_placement(depths: Sequence[int], stages: Sequence[int] = (1, 2, 3)) -> list[list[int]]:
    """Every block of the given stages (default c3–c5, i.e. layer2..layer4), GCNet's setting."""
    return [list(range(d)) if s in stages else [] for s, d in enumerate(depths)]


@torch.no_grad()
def check_identity(
    model_before: nn.Module,
    model_after: nn.Module,
    example: Tensor | Sequence[Tensor],
    *,
    atol: float = 0.0,
    raise_error: bool = True,
) -> bool:
    """Check that inserted blocks leave a network's output unchanged (eval mode).

    Both models are evaluated in eval mode on copies (their own train/eval state and weights
    are left alone).

    Args:
        model_before: the network without the blocks.
        model_after: the same network (same weights) with blocks inserted.
        example: the input (or inputs).
        atol: largest allowed absolute difference (0: exact).
        raise_error: raise ``AssertionError`` with the difference instead of returning False.

    Returns:
        True when every output element agrees within ``atol``.
    """
    args = (example,) if isinstance(example, Tensor) else tuple(example)
    outs = []
    for m in (model_before, model_after):
        m = copy.deepcopy(m).eval()
        outs.append(m(*args))
    diff = _max_abs_diff(outs[0], outs[1])
    ok = diff <= atol
    if not ok and raise_error:
        raise AssertionError(
            f"inserted blocks change the output: max abs difference {diff:.3g} > atol {atol:g}"
        )
    return ok


def _max_abs_diff(a: object, b: object) -> float:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            raise AssertionError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        return float((a - b).abs().max()) if a.numel() else 0.0
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise AssertionError(f"output keys differ: {sorted(a)} vs {sorted(b)}")
        return max(_max_abs_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return max(_max_abs_diff(x, y) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cannot compare outputs of types {type(a).__name__}, {type(b).__name__}")


def without_blocks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose inserted blocks are removed (``after`` → identity, ``gc``
    → None), sharing no parameters with ``model`` but holding the same backbone weights."""
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(getattr(m, AFTER, None), nn.Module) and not isinstance(m.after, nn.Identity):
            m.after = nn.Identity()
        if isinstance(getattr(m, "gc", None), nn.Module):
            m.gc = None
    return clone
