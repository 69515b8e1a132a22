"""Lay out a folder in the Hugging Face cache format, so the real Hub code path loads it offline."""

from __future__ import annotations

import os
from pathlib import Path

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hf_cache(cache_dir: Path, repo_id: str, folder: Path) -> Path:
    """Make `folder`'s files the cached `main` revision of model repo `repo_id` under `cache_dir`."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    for file in folder.iterdir():
        if file.is_file():
            os.symlink(file.resolve(), snapshot / file.name)
    return snapshot
