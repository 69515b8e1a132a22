"""A full disk: every writer's own error becomes one DiskFullError saying so, and what was complete stays complete
(benchmarks/tools/fault_injection.py --full-disk fills a real small file system at each writer)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from tests.tiny import FakeAccelerator
from training.run import disk_full
from training.run.disk_full import DiskFullError, reporting_full_disk
from training.run.layout import CHECKPOINTS_DIR, append_metrics, save_checkpoint, write_text_atomic

TORCH_SAVE_ON_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("error, free", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**9),  # Python's own files
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), 10**9),  # safetensors
    (TORCH_SAVE_ON_FULL_DISK, 4096),  # torch.save names no cause: told by the space left
])
def test_each_writers_full_disk_error_is_told_as_a_full_disk(tmp_path, monkeypatch, error, free):
    monkeypatch.setattr(disk_full, "free_bytes", lambda folder: free)
    with pytest.raises(DiskFullError, match=rf"^\[Errno {errno.ENOSPC}\] the disk is full: checkpoint step_3 could "
                                            rf"not be written to {tmp_path} \({free} bytes free; .*What was complete "
                                            r"before is kept.*--resume") as caught:
        with reporting_full_disk(tmp_path, "checkpoint step_3"):
            raise error
    assert caught.value.__cause__ is error


def test_other_errors_pass_through(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_full, "free_bytes", lambda folder: 10**9)
    with pytest.raises(RuntimeError, match="unexpected pos"), reporting_full_disk(tmp_path, "x"):
        raise TORCH_SAVE_ON_FULL_DISK
    with pytest.raises(KeyError), reporting_full_disk(tmp_path, "x"):
        raise KeyError("a bug")
    monkeypatch.setattr(disk_full, "free_bytes", lambda folder: 0)
    with pytest.raises(ValueError, match="no readable image"), reporting_full_disk(tmp_path, "x"):
        raise ValueError("no readable image among the 3 to cache")  # not an I/O failure, even on a full disk


def test_a_checkpoint_that_fills_the_disk_is_removed_and_the_previous_one_kept(tmp_path, monkeypatch):
    accelerator = FakeAccelerator()
    previous = save_checkpoint(accelerator, tmp_path, 2, keep=2, facts={"seed": 0})

    def full(folder):
        (tmp_path / CHECKPOINTS_DIR / ".tmp_step_3").mkdir()
        raise TORCH_SAVE_ON_FULL_DISK

    monkeypatch.setattr(accelerator, "save_state", full)
    monkeypatch.setattr(disk_full, "free_bytes", lambda folder: 0)
    with pytest.raises(DiskFullError, match="checkpoint step_3 could not be written"):
        save_checkpoint(accelerator, tmp_path, 3, keep=2, facts={"seed": 0})
    assert os.listdir(tmp_path / CHECKPOINTS_DIR) == ["step_2"]  # the failed save's space given back
    assert (previous / "model.safetensors").read_text() == "weights of .tmp_step_2"


def test_atomic_files_and_metrics_lines_on_a_full_disk(tmp_path, monkeypatch):
    (tmp_path / "report.json").write_text("old")
    monkeypatch.setattr(disk_full, "free_bytes", lambda folder: 0)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", no_space)
    with pytest.raises(DiskFullError, match="report.json could not be written"):
        write_text_atomic(tmp_path / "report.json", "new")
    monkeypatch.undo()
    assert (tmp_path / "report.json").read_text() == "old" and os.listdir(tmp_path) == ["report.json"]

    monkeypatch.setattr("json.dumps", no_space)
    with pytest.raises(DiskFullError, match="metrics.jsonl could not be written"):
        append_metrics(tmp_path, {"step": 1})


def test_the_feature_cache_claims_its_disk_space_before_writing(tmp_path, monkeypatch):
    """Writing into a sparse memory map on a full disk kills the process with SIGBUS: the blocks are reserved
    first, so a full disk is an ENOSPC before any write."""
    from training.distill.feature_cache import reserved_memmap

    claimed = []
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: claimed.append((offset, size)), raising=False)
    array = reserved_memmap(tmp_path / "a.npy", (3, 4))
    assert array.shape == (3, 4) and array.dtype == np.float16 and claimed == [(0, os.path.getsize(tmp_path / "a.npy"))]

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        reserved_memmap(tmp_path / "b.npy", (3, 4))

    def unsupported(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    assert reserved_memmap(tmp_path / "c.npy", (2,)).shape == (2,)  # a file system that cannot reserve: sparse
