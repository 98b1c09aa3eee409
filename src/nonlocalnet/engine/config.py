"""Typed run configuration: nested dataclasses loaded from YAML, with dotted ``key=value`` overrides.

A config file has six sections, each a dataclass below::

    model:    {name: nl_c2d_tiny, kwargs: {num_classes: 2}}
    data:     {task: video, format: list, root: data/, train_split: train.txt, ...}
    optim:    {lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4, ...}
    schedule: {name: step, milestones: [150000, 300000], gamma: 0.1, warmup_steps: 0}
    train:    {steps: 400000, batch_size: 8, seed: 0, ...}
    eval:     {batch_size: 1, num_clips: 10, num_crops: 3, ...}

Every key is checked: an unknown key is an error naming its full dotted path and the keys that
exist there, a value of the wrong type names the key, the expected type and the value that came,
and numbers must lie in their range (finite, positive where a count or a rate). Overrides
(``optim.lr=0.1 train.steps=100``) parse their value with ``yaml.safe_load`` and go through the
same checks.

A file may start from others: ``_base_: kinetics_nl_c2d_r50_32x2.yaml`` (or a list, merged in
order) names files relative to it; the file's own keys are merged over them, section by section
and key by key (a mapping merges, any other value replaces), and the result is checked as one
config. Relative paths inside a config (``data.root``, ``train.out_dir``, ``model.init``) are
taken relative to the current directory, not to the file; the splits (``data.train_split``,
``data.val_split``) relative to ``data.root``.

The configs shipped with the package (:data:`CONFIG_DIR`) are found by their bare name:
``load_config("kinetics_nl_c2d_r50_32x2")`` (or ``--config kinetics_nl_c2d_r50_32x2.yaml``) reads
the shipped file unless a file of that name exists where it is asked for
(:func:`resolve_config_path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nonlocalnet._checks import check_choice

__all__ = [
    "CONFIG_DIR",
    "DATA_FORMATS",
    "RESUMABLE_KEYS",
    "TASKS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "is_import_path",
    "load_config",
    "resolve_config_path",
    "save_config",
    "shipped_configs",
]

#: the configs shipped with the package (``configs/`` of a checkout links here).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


#: the keys that may differ between a checkpoint's config and the config that resumes it: the
#: length of the run and how often it logs, evaluates and checkpoints (none changes the weights
#: of the steps both runs train), where it writes, and the data loader's worker count. The length
#: may change under a step or constant schedule only: cosine and poly set each step's lr from
#: step / train.steps, so another length changes the lr of every step, and resuming refuses it.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.out_dir",
    "train.export_safetensors",
    "train.threads",
    "data.num_workers",
    # where a new run starts from: a resumed run continues from its checkpoint
    "model.init",
    "model.init_format",
    "model.init_options",
)

#: the built-in dataset readers of ``data.format``.
DATA_FORMATS = (
    "list",
    "csv",
    "folder",
    "cityscapes",
    "pairs",
    "synthetic",
    "coco",
    "synthetic_detection",
)

#: the tasks of ``data.task``: each has its loss, batches and metrics.
TASKS = ("video", "image", "segmentation", "detection")


def is_import_path(name: str) -> bool:
    """True for ``"package.module:attribute"``: a user's own model builder or dataset reader."""
    module, sep, attr = name.partition(":")
    return bool(sep and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")))


@dataclass
class ModelConfig:
    """Which network to build: ``nonlocalnet.models.create_model(name, **kwargs)``, or the
    user's builder ``function(**kwargs)`` when ``name`` is an import path
    ``"package.module:function"``."""

    name: str = "c2d_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The checkpoint a new run starts from (None: the builder's initialisation), e.g. the
    # torchvision ImageNet file resnet50-0676ba61.pth; inflated into video models, loaded into
    # the backbone of segmentation and detection models; inserted blocks stay zero-initialised.
    init: str | None = None
    # Its format: "torchvision", "nonlocalnet" (a checkpoint or safetensors file of this
    # library), or a converter source (caffe2, slowfast, pytorchvideo, mmaction2, mmdet, mmseg,
    # mmcv, timm), with the converter's options in init_options.
    init_format: str = "torchvision"
    init_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the data lives and how clips/images are sampled and transformed.

    ``task`` selects the loss and the metrics; ``format`` the dataset reader (paths relative to
    ``root``):

    - video: ``list`` (``<path> <label>`` list files ``train_split`` / ``val_split``), ``csv``
      (Kinetics CSV files, videos under ``root``), ``folder`` (one folder per class under
      ``root/<split>``), ``synthetic`` (the built-in benchmark, generated once into ``root``;
      ``kwargs`` = fields of ``SyntheticVideoSpec``);
    - image: ``folder`` (``root/<split>/<class>/*``);
    - segmentation: ``cityscapes`` (``root/leftImg8bit/<split>``, ``root/gtFine/<split>``),
      ``pairs`` (``root/<split>/images`` and ``root/<split>/masks``, matched by file stem);
    - detection: ``coco`` (COCO's layout: images in ``root/<split>/``, annotations in
      ``root/annotations/instances_<split>.json``, e.g. ``train_split: train2017``; labels are
      the category ids, ``num_classes: 91`` for COCO), ``synthetic_detection`` (the built-in
      set that needs context, generated once into ``root``; ``kwargs`` = fields of
      ``SyntheticDetectionSpec``, the others go to ``COCODetection``). Images are resized and
      normalised inside the detector (``model.kwargs``: ``min_size``, ``max_size``), so
      ``mean``/``std``/crops do not apply; masks are read for Mask R-CNN only (``kwargs.masks``
      overrides);
    - any task: the import path ``"package.module:function"`` of a function
      ``(config, split) -> Dataset`` yielding the pipeline's dicts (the user's own reader).

    ``kwargs`` go to the dataset class (``VideoDataset``, ``ImageFolderDataset``,
    ``SegmentationDataset``, ``COCODetection``).
    """

    task: str = "video"
    format: str = "list"
    root: str = ""
    # List file / CSV / split folder of the training and the validation set (relative to root).
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 400
    # Video clips: T frames taken every `sampling_rate` frames (the NL paper's 32x2 and 8x8).
    num_frames: int = 8
    sampling_rate: int = 8
    # Training: short side jittered in [min, max], random square crop, horizontal flip.
    train_jitter: list[int] = field(default_factory=lambda: [256, 320])
    train_crop: int = 224
    # Random horizontal flip in training (off for data whose left and right differ).
    flip: bool = True
    # Testing: short side resized, `num_crops` crops of `test_crop` per clip (eval section: K, crops).
    test_short_side: int = 256
    test_crop: int = 256
    # Segmentation: random scale range and crop [H, W] (mmseg Cityscapes: 512x1024 or 769x769).
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    seg_crop: list[int] = field(default_factory=lambda: [512, 1024])
    ignore_index: int = 255
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])
    # Fraction of unreadable videos tolerated before the run stops.
    max_skip_fraction: float = 0.05
    num_workers: int = 2
    # Extra keyword arguments passed to the dataset reader.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """SGD with momentum; no weight decay on BatchNorm/LayerNorm weights and biases."""

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1.0e-4
    # Apply weight decay to norm parameters and biases too (the official recipes do not).
    decay_norm_and_bias: bool = False
    # Clip the global gradient norm to this value (0 = no clipping).
    clip_grad_norm: float = 0.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over ``train.steps`` iterations, after a linear warm-up.

    ``step``: lr x gamma at each milestone; ``cosine``: half cosine from lr to ``min_lr``;
    ``poly``: lr x (1 - step/steps)^power (+ ``min_lr``); ``constant``.
    """

    name: str = "step"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    power: float = 0.9
    min_lr: float = 0.0
    warmup_steps: int = 0
    # The warm-up starts at lr x warmup_factor and rises linearly to the scheduled lr.
    warmup_factor: float = 0.1


@dataclass
class TrainConfig:
    """Length, batch, precision and bookkeeping of a training run."""

    steps: int = 1000
    # Per process; the global batch is batch_size x world size.
    batch_size: int = 8
    seed: int = 0
    # "none", "bfloat16" (CPU or CUDA) or "float16" (CUDA, with a gradient scaler).
    amp: str = "none"
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 1000
    # Number of step checkpoints kept in the run dir (the final one is always kept).
    keep_checkpoints: int = 2
    # Evaluate on the validation set every N steps (0 = only at the end; -1 = never).
    eval_every: int = 0
    # Recompute BatchNorm running statistics over N training batches before evaluating (0 = off).
    precise_bn_batches: int = 0
    # Segmentation: weight of the auxiliary head's loss when the model does not state it.
    aux_weight: float = 0.4
    out_dir: str = "runs/default"
    export_safetensors: bool = True
    progress: bool = True
    # torch's intra-op CPU threads during the run (0: as they are). The thread count sets the
    # order of float sums, so two counts give runs that differ after enough steps.
    threads: int = 0


@dataclass
class EvalConfig:
    """Test protocol: K clips x crops per video (softmax averaged per video), top-k accuracy."""

    batch_size: int = 1
    num_clips: int = 10
    num_crops: int = 3
    topk: list[int] = field(default_factory=lambda: [1, 5])
    # Evaluate at most this many samples (0 = all); handy for quick checks.
    max_samples: int = 0


@dataclass
class Config:
    """A whole run: model, data, optimiser, schedule, training and evaluation settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Check values that types alone cannot (choices, ranges); return self."""
        check_choice("data.task", self.data.task, TASKS)
        if not is_import_path(self.data.format):
            check_choice(
                "data.format", self.data.format, (*DATA_FORMATS, "<package.module:function>")
            )
        check_choice("schedule.name", self.schedule.name, ("step", "cosine", "poly", "constant"))
        check_choice("train.amp", self.train.amp, ("none", "bfloat16", "float16"))
        positive = {
            "train.steps": self.train.steps,
            "train.batch_size": self.train.batch_size,
            "train.log_every": self.train.log_every,
            "train.checkpoint_every": self.train.checkpoint_every,
            "eval.batch_size": self.eval.batch_size,
            "eval.num_clips": self.eval.num_clips,
            "eval.num_crops": self.eval.num_crops,
            "data.num_classes": self.data.num_classes,
            "data.num_frames": self.data.num_frames,
            "data.sampling_rate": self.data.sampling_rate,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"{key}: expected a positive integer, got {value}")
        for key, value in {
            "train.seed": self.train.seed,
            "train.keep_checkpoints": self.train.keep_checkpoints,
            "train.precise_bn_batches": self.train.precise_bn_batches,
            "train.threads": self.train.threads,
            "schedule.warmup_steps": self.schedule.warmup_steps,
            "data.num_workers": self.data.num_workers,
            "eval.max_samples": self.eval.max_samples,
        }.items():
            if value < 0:
                raise ValueError(f"{key}: expected an integer >= 0, got {value}")
        if self.train.eval_every < -1:
            raise ValueError(
                f"train.eval_every: expected -1 (never), 0 (at the end) or a step count, "
                f"got {self.train.eval_every}"
            )
        _check_numbers(self)
        if (
            len(self.data.train_jitter) != 2
            or self.data.train_jitter[0] > self.data.train_jitter[1]
        ):
            raise ValueError(
                f"data.train_jitter: expected [min, max] with min <= max, got {self.data.train_jitter}"
            )
        if sorted(self.schedule.milestones) != list(self.schedule.milestones):
            raise ValueError(
                f"schedule.milestones: expected increasing steps, got {self.schedule.milestones}"
            )
        if any(k <= 0 for k in self.eval.topk):
            raise ValueError(f"eval.topk: expected positive integers, got {self.eval.topk}")
        return self


def _check_range(key: str, value: float, low: float, high: float, closed: str = "[]") -> None:
    """``value`` finite and in the interval (``closed``: which ends belong to it, "[)"...)."""
    ok = math.isfinite(value)
    ok = ok and (value >= low if closed[0] == "[" else value > low)
    ok = ok and (value <= high if closed[1] == "]" else value < high)
    if not ok:
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(
            f"{key}: expected a number in {closed[0]}{low:g}, {hi}{closed[1]}, got {value}"
        )


def _check_numbers(config: Config) -> None:
    """Every float of the config finite and in its range."""
    inf = math.inf
    o, s, t, d = config.optim, config.schedule, config.train, config.data
    _check_range("optim.lr", o.lr, 0, inf, "()")
    _check_range("optim.momentum", o.momentum, 0, 1, "[)")
    _check_range("optim.weight_decay", o.weight_decay, 0, inf, "[)")
    _check_range("optim.clip_grad_norm", o.clip_grad_norm, 0, inf, "[)")
    _check_range("schedule.gamma", s.gamma, 0, inf, "()")
    _check_range("schedule.power", s.power, 0, inf, "()")
    _check_range("schedule.min_lr", s.min_lr, 0, o.lr, "[]")
    _check_range("schedule.warmup_factor", s.warmup_factor, 0, 1, "(]")
    _check_range("train.aux_weight", t.aux_weight, 0, inf, "[)")
    _check_range("data.max_skip_fraction", d.max_skip_fraction, 0, 1, "[]")
    for i, v in enumerate(d.scale_range):
        _check_range(f"data.scale_range[{i}]", v, 0, inf, "()")
    for i, v in enumerate(d.mean):
        _check_range(f"data.mean[{i}]", v, -inf, inf, "()")
    for i, v in enumerate(d.std):
        _check_range(f"data.std[{i}]", v, 0, inf, "()")


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (sections compared key by key)."""
    out = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}.{key}" if prefix else str(key)
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping) and prefix == "":
            out += config_diff(va, vb, path)
        elif va != vb:
            out.append(path)
    return out


# ----------------------------------------------------------------------------- type checking


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` checked (and, int -> float only, converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            with contextlib.suppress(TypeError, ValueError):
                return _coerce(key, value, arg)
        raise TypeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(f"{key}.<key>", k, key_tp): _coerce(f"{key}.{k}", v, val_tp)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept it where a float is expected.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected str, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not input


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the dotted path of every bad key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ValueError(f"{path}: unknown key; expected one of {', '.join(names)}")
        kwargs[key] = _coerce(path, value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain dicts."""
    return _from_dict(Config, data).validate()


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as nested plain dicts/lists (what checkpoints and ``config.yaml`` store)."""
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------- YAML and overrides


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted == "a.b.c"``, checking every key on the way."""
    parts = dotted.split(".")
    cls: Any = Config
    node = data
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if cls is not None:
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise ValueError(f"{path}: unknown key; expected one of {', '.join(names)}")
            tp = typing.get_type_hints(cls)[part]
            cls = tp if dataclasses.is_dataclass(tp) else None
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TypeError(f"{path}: cannot set a sub-key of the value {child!r}")
            node = child


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a nested dict (values parsed with ``yaml.safe_load``).

    Raises:
        ValueError: an override without ``=`` or naming an unknown key.
    """
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key.path=value, e.g. optim.lr=0.1")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r}: empty key; expected key.path=value")
        _set_dotted(data, key, yaml.safe_load(raw) if raw.strip() else "")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply overrides, validate.

    Args:
        path: YAML file, or the name of a shipped config (:func:`resolve_config_path`); None
            starts from the defaults.
        overrides: ``key.path=value`` strings applied after the file.

    Raises:
        FileNotFoundError: the file does not exist (nor a shipped config of that name).
        ValueError, TypeError: unknown key, bad value or bad type, naming the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        data = _read_with_bases(path, ())
    apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as err:
        where = f"{path}: " if path is not None else ""
        raise type(err)(f"{where}{err}") from None


def shipped_configs() -> list[str]:
    """The names of the configs shipped with the package (without ``.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """The config file of ``name``: the path itself when it exists, else, for a bare file name
    (no folder, with or without ``.yaml``), the shipped config of that name in
    :data:`CONFIG_DIR`.

    Raises:
        FileNotFoundError: neither exists, naming the shipped configs.
    """
    path = Path(name)
    if path.exists():
        return path
    bare = path.name == str(name) and path.name not in ("", ".", "..")
    if bare:
        shipped = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    known = ", ".join(shipped_configs())
    raise FileNotFoundError(
        f"config file {str(name)!r} not found"
        + (f" (nor a shipped config of that name: {known})" if bare else "")
    )


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings merge key by key, other values replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A YAML config with its ``_base_`` files merged under it (relative to the file)."""
    import yaml

    if not path.is_file():
        where = f" (a _base_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file {str(path)!r} not found{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ValueError(f"{path}: _base_ files include each other: {' -> '.join(map(str, chain))}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise TypeError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    loaded = loaded or {}
    bases = loaded.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise TypeError(f"{path}: _base_: expected a file name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, _read_with_bases(path.parent / base, (*chain, resolved)))
    return _merge(merged, loaded)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
