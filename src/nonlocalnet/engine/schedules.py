"""Learning-rate schedules as pure functions of the step, with a linear warm-up."""

from __future__ import annotations

import math
from typing import Any

import torch

from nonlocalnet._checks import check_choice

__all__ = ["LRSchedule", "lr_factor"]


def lr_factor(
    step: int,
    total_steps: int,
    *,
    name: str = "step",
    milestones: list[int] | tuple[int, ...] = (),
    gamma: float = 0.1,
    power: float = 0.9,
    min_ratio: float = 0.0,
    warmup_steps: int = 0,
    warmup_factor: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Args:
        step: the iteration about to be taken.
        total_steps: length of the run.
        name: ``step`` (x gamma at each milestone), ``cosine`` (half cosine from 1 down to
            ``min_ratio``), ``poly`` ((1 - step/total)^power, floored at ``min_ratio``) or
            ``constant``.
        milestones: steps where the ``step`` schedule multiplies by ``gamma``.
        gamma: decay of the ``step`` schedule.
        power: exponent of the ``poly`` schedule (0.9 in PSPNet/ANN).
        min_ratio: final multiplier of ``cosine``/``poly``.
        warmup_steps: the first steps rise linearly from ``warmup_factor`` to the schedule.
        warmup_factor: multiplier at step 0 of the warm-up.
    """
    check_choice("schedule", name, ("step", "cosine", "poly", "constant"))
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    if name == "step":
        factor = gamma ** sum(step >= m for m in milestones)
    elif name == "cosine":
        factor = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "poly":
        factor = max((1.0 - progress) ** power, min_ratio)
    else:
        factor = 1.0
    if step < warmup_steps:
        # Linear ramp from warmup_factor to 1, applied on top of the schedule (Detectron/SlowFast).
        alpha = step / warmup_steps
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


class LRSchedule:
    """Sets each parameter group's lr to ``initial_lr x lr_factor(step)`` before every step.

    Stateless apart from the step counter, so resuming needs only ``state_dict()["step"]``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, **kwargs: Any) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.kwargs = kwargs
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step_count = 0

    def set_step(self, step: int) -> float:
        """Set the lr for iteration ``step``; return the multiplier."""
        self.step_count = step
        factor = lr_factor(step, self.total_steps, **self.kwargs)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_step(int(state["step"]))
