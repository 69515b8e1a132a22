"""Checks that every process of a multi-node run sees the same folder: the run folder (only rank 0 renames a finished
checkpoint into place, writes recipe.json and rotates old checkpoints) and the feature cache (built by rank 0, read by
all). On node-local disks the other nodes would resume from nothing, or read a cache that is not there."""

from __future__ import annotations

import secrets
from pathlib import Path

import torch

SHARED_MARKER = ".shared_check"


def check_shared_folder(accelerator, folder: Path, what: str) -> None:
    """Rank 0 writes a fresh token into `folder`; every rank reads it back. When any rank does not see it, every
    rank stops with one line naming the ranks that did not (a single process needs no check)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    folder = Path(folder)
    marker = folder / SHARED_MARKER
    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    broadcast_object_list(token)  # also a barrier: rank 0 has written the marker
    seen = marker.read_text() if marker.is_file() else None
    sees = accelerator.gather(torch.tensor([int(seen == token[0])], device=accelerator.device))
    accelerator.wait_for_everyone()  # every rank has read the marker before it goes
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [rank for rank, ok in enumerate(sees.tolist()) if not ok]
    if blind:
        raise ValueError(
            f"{what} {folder} is not shared between the processes: rank(s) {blind} of {accelerator.num_processes} do "
            f"not see what rank 0 wrote there (a node-local disk?); put it on a disk every node mounts at the same "
            f"path (a shared filesystem), then start again")
