"""The learning-rate schedule and the loop's position, both saved with every checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainState:
    """Where the loop is; registered with `accelerator.register_for_checkpointing` so resume continues exactly."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done (seeds the teacher's noise)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (skipped on resume)
    skipped: int = 0  # unreadable images skipped so far (this process)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)
