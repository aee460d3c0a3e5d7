"""Learning-rate schedules of ``FusionModule``: linear warm-up, then constant or cosine decay to a floor."""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def lr_factor(step: int, warmup: int, total: int | None, schedule: str = "constant", floor: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / (warmup + 1)`` for the first ``warmup`` steps. Then ``constant``: 1; ``cosine``:
    ``floor + (1 - floor) * (1 + cos(pi * progress)) / 2``, ``progress`` going from 0 after the warm-up to 1 at
    ``total`` steps (the trainer's ``max_steps`` or its estimate), then staying at ``floor``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or not total:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
