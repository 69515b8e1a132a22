"""The checks every trainer makes on every micro-batch, with one answer for all ranks: the non-finite-loss stop
(before its gradient can reach the weights, so the last checkpoint always holds finite weights to resume from) and
the skip of a micro-batch whose images were all unreadable (all ranks skip it together, so none waits at a gradient
sync the others never reach)."""

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


def every_rank_has_images(accelerator, count: int) -> bool:
    """Whether every rank's micro-batch kept at least one readable image (`count` is this rank's). All ranks get
    the same answer, so they train on the micro-batch or skip it together; one process needs no collective."""
    if accelerator.num_processes == 1:
        return count > 0
    counts = accelerator.gather(torch.tensor([count], device=accelerator.device))
    return bool((counts > 0).all())
