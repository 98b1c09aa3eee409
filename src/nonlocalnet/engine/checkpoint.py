"""Checkpoints: atomic writes, plain-type contents, ``weights_only`` loading, safetensors export.

A checkpoint is a ``torch.save`` dict of plain types (tensors, numbers, strings, lists, dicts)::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "step": int, "rng": [{...} per rank], "skips": [[...] per rank], "sampler": {...},
     "pending_eval": bool, "metrics": {"train": {...} | None, "val": {...} | None},
     "config": dict}

(``rng`` and ``skips`` hold one entry per process, by rank; a checkpoint written before that held
one ``rng`` dict, read as rank 0's.)

so ``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects; every
load in this module uses ``weights_only=True``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "capture_rng_state",
    "check_state_dict",
    "clean_temp_files",
    "export_safetensors",
    "is_disk_full",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "rank_entry",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file in ``path``'s folder, fsync, rename over ``path``.

    A reader (or a run killed mid-write) sees either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain types and tensors only) to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def clean_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove the temp files of writes that were killed midway (``.<name>.*.tmp``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
        logger.info("removed the temp file of an interrupted write: %s", p)
    return stale


def is_disk_full(err: BaseException) -> bool:
    """True if ``err`` or an exception it was raised from is ENOSPC (no space left on device)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "[Errno 28]" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(err: BaseException) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in one line.

    Torch's own message advises loading with ``weights_only=False``, which would run any code
    the file holds; that advice is never passed on.
    """
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"it holds a pickled Python object ({found.group(1)}), which is never unpickled: "
            "only tensors and plain types load"
        )
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\n|$)", text)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keep = [line for line in lines if "weights_only" not in line]
    return (keep or [type(err).__name__])[0]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary unpickling).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint dict written by :func:`save_checkpoint`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    if path.stat().st_size == 0:
        raise ValueError(
            f"checkpoint {str(path)!r} is empty (0 bytes): a write that never finished?"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError on foreign files
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read safely: {_reason(err)}"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(
            f"checkpoint {str(path)!r}: expected a dict with a 'model' entry, got "
            f"{type(state).__name__}{' with keys ' + str(list(state)) if isinstance(state, dict) else ''}"
        )
    return state


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint_<step>.pt`` files in ``run_dir``, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step in ``run_dir`` (temp files are ignored), or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states as plain types, and the CUDA generator's of
    ``device`` when it is a CUDA device (only that one: querying every GPU would open a
    context on each)."""
    version, internal, gauss = random.getstate()
    device = torch.device(device) if device is not None else None
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:  # pragma: no cover - numpy is optional
        state["numpy"] = None
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; the CUDA state goes to ``device`` (a CUDA device).

    A state holding every GPU's generator (a list, as ``torch.cuda.get_rng_state_all`` gives)
    restores the entry of ``device``'s index.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    device = torch.device(device) if device is not None else None
    cuda = state.get("cuda")
    if device is not None and device.type == "cuda" and cuda is not None and len(cuda):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def rank_entry(entries: Any, rank: int, world_size: int, what: str) -> tuple[Any, bool]:
    """This process's entry of a per-rank list stored in a checkpoint.

    Args:
        entries: a list by rank, or one entry (a checkpoint of one process: rank 0's).
        rank: this process's rank.
        world_size: the number of processes now.
        what: the entry's name, for the warning.

    Returns:
        ``(entry, same)``: the entry of ``rank`` (rank 0's where the list is shorter), and
        whether the checkpoint was written by as many processes as run now (a warning is logged
        when not).
    """
    if not isinstance(entries, list):
        entries = [entries]
    same = len(entries) == world_size
    if not same and rank == 0:
        logger.warning(
            "--resume: the checkpoint's %s comes from %d process(es), the run has %d: each "
            "process continues from %s, so the random streams differ from the interrupted run's",
            what,
            len(entries),
            world_size,
            "its rank's entry" if len(entries) > world_size else "rank 0's where it has none",
        )
    return (entries[rank] if rank < len(entries) else entries[0]), same


# ----------------------------------------------------------------------------- models


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _model_summary(config: dict[str, Any] | None) -> str | None:
    """``"c2d_tiny with 2 classes"`` from a config dict, or None."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return None
    name = config["model"].get("name")
    classes = (config["model"].get("kwargs") or {}).get("num_classes")
    if classes is None:
        classes = (config.get("data") or {}).get("num_classes")
    return f"{name} with {classes} classes" if classes is not None else str(name)


def check_state_dict(
    model: nn.Module,
    state: dict[str, Any],
    *,
    source: str,
    stored_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Raise one clear ``ValueError`` unless ``state`` fits ``model`` key for key, shape for shape.

    Args:
        model: the model the weights are for.
        state: the weights.
        source: how to name where the weights come from (a path).
        stored_config: the config the weights were trained with (a checkpoint's), if known.
        config: the config ``model`` was built from, if known.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    stored, built = _model_summary(stored_config), _model_summary(config)
    if stored and built and stored != built:
        raise ValueError(f"{source} is a {stored}; the config builds {built}")
    parts = []
    for what, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", shapes),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} keys {what} ({shown})")
    raise ValueError(
        f"{source} does not fit the model{f' {built}' if built else ''}: " + "; ".join(parts)
    )


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The weights of a ``.safetensors`` file or of a checkpoint's ``model`` entry.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is neither.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_checkpoint(path, map_location)["model"]
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None


def export_safetensors(model: nn.Module | dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a model's weights (or a state dict) as a safetensors file, atomically."""
    from safetensors.torch import save

    state = model if isinstance(model, dict) else unwrap_model(model).state_dict()
    # safetensors refuses shared storage and non-contiguous tensors: store independent copies.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    data = save(tensors)
    atomic_write(path, lambda f: f.write(data))


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint from its stored config and load its weights.

    Args:
        path: a ``checkpoint_<step>.pt`` / ``final.pt`` written by training.
        map_location: where to put the weights.

    Returns:
        ``(model, config)``: the model in eval mode, and the run's resolved config as plain dicts
        (``config["model"]["name"]``, ``config["model"]["kwargs"]``, ``config["data"]``...).
    """
    from nonlocalnet.engine.build import build_model_from_dict

    state = load_checkpoint(path, map_location)
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"checkpoint {str(path)!r} has no stored config with a 'model' section")
    model = build_model_from_dict(config)
    check_state_dict(model, state["model"], source=f"checkpoint {str(path)!r}")
    model.load_state_dict(state["model"])
    model.to(map_location).eval()
    return model, config
