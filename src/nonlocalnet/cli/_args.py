"""Argument helpers the commands share."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any


def parse_key_values(items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``["num_classes=400", "use_scale=False"]`` → ``{"num_classes": 400, "use_scale": False}``.

    Values are Python literals where they parse as one, strings otherwise.

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
