"""torchvision ResNets: our ResNet has torchvision's keys, so the mapping is the identity.

``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv,bn}{1,2,3}``, ``layer{k}.0.downsample.{0,1}``,
``fc``: every key maps to itself, and the conversion only checks that the checkpoint is a ResNet
of the target's depth (same keys, same shapes). torchvision's BatchNorm eps is 1e-5, as ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._core import KeyMap, Rule
from nonlocalnet.models.weights import TORCHVISION_PATTERNS

__all__ = ["rename"]

NAME = "torchvision"
DESCRIPTION = "torchvision ResNet-18/34/50/101/152 (identity mapping)"

#: the keys of a torchvision ResNet (those a pretrained start with format "torchvision" takes),
#: each to itself.
RULES = [Rule(pattern, lambda m: m.group(0)) for pattern in TORCHVISION_PATTERNS]


def rename(state: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None) -> KeyMap:
    """Every key of a torchvision ResNet maps to itself; any other key is refused."""
    km = KeyMap(NAME, dict(state))
    km.rename_all(RULES)
    km.refuse_unmapped("a torchvision ResNet")
    return km
