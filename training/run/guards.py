"""The non-finite-loss stop every trainer makes: checked on every micro-batch and every rank, before its gradient
can reach the weights, so the last checkpoint always holds finite weights to resume from."""

from __future__ import annotations

from pathlib import Path

import torch

from training.run.layout import latest_checkpoint


def stop_if_not_finite(accelerator, loss: torch.Tensor, *, step: int, micro_step: int, run_dir: Path) -> None:
    """Raise FloatingPointError (a one-line user error) when `loss` is not finite on any rank. `step` is the
    optimizer step being computed (1-based), `micro_step` the micro-batch."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.gather(finite).all():
        return
    last = latest_checkpoint(run_dir)
    raise FloatingPointError(
        f"non-finite loss at step {step} (micro-batch {micro_step}); stopped before the optimizer step, without "
        f"saving. Last checkpoint (finite weights): {last or 'none'}. Lower the learning rate (--lr) or run in fp32 "
        f"(--mixed-precision no), then --resume {last or 'latest'}")
