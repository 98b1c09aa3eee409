"""Build the model and the datasets of a run from its config.

``model.name`` is a registered model (:func:`nonlocalnet.models.create_model`) or the import path
``"package.module:function"`` of the user's own builder; ``data.format`` is a built-in reader or
the import path ``"package.module:function"`` of a function ``(config, split) -> Dataset``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from nonlocalnet.engine.config import Config, is_import_path

__all__ = ["build_datasets", "build_model", "build_model_from_dict", "collate_for", "import_object"]

logger = logging.getLogger(__name__)


def import_object(path: str, what: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"``.

    Raises:
        ValueError: the module cannot be imported or has no such callable (naming both).
    """
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{what}: cannot import module {module_name!r} of {path!r}: {err}"
        ) from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ValueError(f"{what}: module {module_name!r} has no callable {attr!r}")
    return obj


def build_model_from_dict(config: Mapping[str, Any]) -> nn.Module:
    """The model of a plain-dict config (``config["model"]``, ``config["data"]["num_classes"]``).

    ``num_classes`` comes from the data section unless ``model.kwargs`` sets it.
    """
    model_cfg = config["model"]
    name = model_cfg["name"]
    kwargs = dict(model_cfg.get("kwargs") or {})
    num_classes = (config.get("data") or {}).get("num_classes")
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if is_import_path(name):
        return import_object(name, "model.name")(**kwargs)
    from nonlocalnet.models import create_model

    return create_model(name, **kwargs)


def build_model(config: Config) -> nn.Module:
    """The model of a :class:`Config` (see :func:`build_model_from_dict`)."""
    return build_model_from_dict(
        {
            "model": {"name": config.model.name, "kwargs": config.model.kwargs},
            "data": {"num_classes": config.data.num_classes},
        }
    )


def build_datasets(
    config: Config, *, train: bool = True, val: bool = True
) -> tuple[Dataset | None, Dataset | None]:
    """The training dataset (random clips/crops) and the validation dataset (test protocol).

    Videos of the validation set come as ``num_clips x num_crops`` views of each video
    (``eval`` section); images and segmentation use one centre view.

    Returns:
        ``(train_set, val_set)``, None for a split not asked for.
    """
    if is_import_path(config.data.format):
        make = import_object(config.data.format, "data.format")
    else:
        from nonlocalnet.engine._datasets import make_dataset as make
    return (make(config, "train") if train else None, make(config, "val") if val else None)


def collate_for(config: Config) -> Callable[[list[dict[str, Any]]], Any]:
    """The batch collation of ``config``'s task (videos: unreadable test samples dropped)."""
    from nonlocalnet.engine._datasets import collate_fn

    return collate_fn(config)
