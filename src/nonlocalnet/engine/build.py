"""Build the model and the datasets of a run from its config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from nonlocalnet.engine.config import Config

__all__ = ["build_datasets", "build_model", "build_model_from_dict", "collate_for"]

logger = logging.getLogger(__name__)


def build_model_from_dict(config: Mapping[str, Any]) -> nn.Module:
    """The model of a plain-dict config (``config["model"]``, ``config["data"]["num_classes"]``).

    ``num_classes`` comes from the data section unless ``model.kwargs`` sets it. Names starting
    with ``toy_`` are the engine's test models; all others go to
    ``nonlocalnet.models.create_model``.
    """
    model_cfg = config["model"]
    name = model_cfg["name"]
    kwargs = dict(model_cfg.get("kwargs") or {})
    num_classes = (config.get("data") or {}).get("num_classes")
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if name.startswith("toy_"):
        from nonlocalnet.engine.toy import TOY_MODELS

        if name not in TOY_MODELS:
            raise ValueError(
                f"model.name: unknown toy model {name!r}; expected one of {', '.join(TOY_MODELS)}"
            )
        return TOY_MODELS[name](**kwargs)
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
    data = config.data
    if data.format == "random":
        from nonlocalnet.engine.toy import RandomDataset

        common = dict(
            num_samples=data.num_samples,
            num_classes=data.num_classes,
            size=data.train_crop,
            num_frames=data.num_frames,
            **data.kwargs,
        )
        views = config.eval.num_clips * config.eval.num_crops if data.task == "video" else 0
        return (
            RandomDataset(data.task, seed=config.train.seed, **common) if train else None,
            RandomDataset(data.task, seed=config.train.seed + 1, views=views, **common)
            if val
            else None,
        )
    from nonlocalnet.engine import _datasets

    return (
        _datasets.make_dataset(config, "train") if train else None,
        _datasets.make_dataset(config, "val") if val else None,
    )


def collate_for(config: Config) -> Callable[[list[dict[str, Any]]], Any]:
    """The batch collation of ``config``'s task (videos: unreadable test samples dropped)."""
    from nonlocalnet.engine._datasets import collate_fn

    return collate_fn(config)
