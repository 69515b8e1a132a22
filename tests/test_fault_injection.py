"""kill -9 both trainers inside checkpoint writes, renames, rotation, metrics and export; every resume completes
bit-exactly and nothing is lost (benchmarks/tools/fault_injection.py runs every site at more random points)."""

from __future__ import annotations

import pytest

from benchmarks.tools import fault_injection


@pytest.mark.slow
@pytest.mark.parametrize("trainer, sites", [
    ("pretrain", ["checkpoint rename", "rotation"]),
    ("teacher", ["checkpoint write"]),
])
def test_killed_runs_resume_to_the_same_weights_and_lose_nothing(tmp_path, trainer, sites):
    report = fault_injection.run_trainer(trainer, sites, points=1, seed=0, work=tmp_path)
    assert report.kills_landed == report.kills_tried == len(sites), report.log
    assert report.weights_equal, report.log
    assert report.lost == []
