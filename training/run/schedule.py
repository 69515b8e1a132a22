"""The loop's arithmetic, shared by every trainer: the learning-rate schedule, the batch plan, the seeds of its random
streams, and its position (`TrainState`, saved with every checkpoint)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SEED_STRIDE = 1_000_003  # a prime: runs with nearby seeds share no stream's seed below a million streams


def noise_seed(seed: int, stream: int) -> int:
    """The seed of one random stream of a run (a micro-batch's noise, a rank's flips, an epoch's order): a pure
    function of the run's seed and the stream's index, so a resumed run draws exactly what an unbroken one did."""
    return seed * SEED_STRIDE + stream


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def plan_batches(global_batch: int, per_device_batch: int | None, num_processes: int) -> tuple[int, int]:
    """(per-device micro-batch, gradient accumulation steps) that reach `global_batch` exactly: `--batch-size` is
    the global batch in every trainer, `--per-device-batch-size` the micro-batch (default: global / processes,
    capped at 128)."""
    micro = per_device_batch or max(1, min(global_batch // num_processes, 128))
    accumulation, rest = divmod(global_batch, micro * num_processes)
    if rest or accumulation < 1:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of per-device batch {micro} x {num_processes} processes; "
            f"choose --per-device-batch-size dividing {global_batch // num_processes}"
        )
    return micro, accumulation


@dataclass
class TrainState:
    """Where the loop is; registered with `accelerator.register_for_checkpointing` so resume continues exactly.
    Random streams are seeded from (seed, micro_step, rank) with `noise_seed`, never from a saved generator state
    (custom states are saved by the main process only, so every rank would get rank 0's)."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done on each rank (seeds the noise)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (skipped on resume)
    skipped: int = 0  # unreadable images skipped so far (this process)
    images_seen: int = 0  # over all processes
    wall_s: float = 0.0  # training wall time before this process started (a resume adds to it)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)


def set_peak_lr(scheduler, lr: float) -> None:
    """Make a resumed LambdaLR schedule (or Accelerate's wrapper of one) peak at `lr` from the current step on: the
    checkpoint brings back the old peak in the scheduler and the optimizer, so a `--lr` given on resume (after a
    non-finite loss, say) would otherwise be ignored."""
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [lr for _ in inner.base_lrs]
    for group, factor in zip(inner.optimizer.param_groups, inner.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(inner.last_epoch)
