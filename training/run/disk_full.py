"""A full disk is told as such, in one line, by every writer: checkpoints, metrics, exports, the teacher, the
feature cache.

The writers fail differently when the disk fills up: Python's own files raise ``OSError(ENOSPC)``, safetensors a
``SafetensorError`` naming "os error 28", and ``torch.save`` (Accelerate's optimizer and RNG files) a RuntimeError
that names no cause at all ("unexpected pos 576 vs 534"). `reporting_full_disk` turns each into a `DiskFullError`,
telling a full disk by the error itself or, failing that, by the space left where it was writing. Every writer
stages its output and publishes it with a rename, so what was complete before stays complete; the error says so.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
NEARLY_FULL_BYTES = 1 << 20  # less than this left where a write just failed: the write failed for want of space


class DiskFullError(OSError):
    """Raised instead of a writer's own error when the disk it wrote to is full."""


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer can still use in `folder`'s file system (its nearest existing parent's)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def looks_like_full_disk(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
        return True
    if any(word in str(error) for word in FULL_DISK_WORDS):
        return True
    if not isinstance(error, (OSError, RuntimeError)):  # a writer's I/O failure, never a check on the input
        return False
    free = free_bytes(folder)
    return free is not None and free < NEARLY_FULL_BYTES


@contextlib.contextmanager
def reporting_full_disk(folder: str | Path, what: str) -> Iterator[None]:
    """Run the block that writes `what` into `folder`; if it fails because the disk is full, raise `DiskFullError`
    saying so (the writer's own error chained) instead of the writer's error."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not looks_like_full_disk(e, Path(folder)):
            raise
        free = free_bytes(Path(folder))
        detail = " ".join(str(e).split())[:200]
        raise DiskFullError(errno.ENOSPC, f"the disk is full: {what} could not be written to {folder} "
                            f"({'?' if free is None else free} bytes free; {type(e).__name__}: {detail}). What was "
                            "complete before is kept: free some space, then rerun (with --resume to continue a run "
                            "from its last checkpoint)") from e
