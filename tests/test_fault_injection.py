"""kill -9 every trainer inside its writers (checkpoint saves, the moved-aside window of a replacement, rotation,
metrics, the feature-cache build, exports) and before its first checkpoint; every resume completes bit-exactly and
nothing is lost (benchmarks/tools/fault_injection.py runs every site at more random points, on 2 processes and on a
full disk too)."""

from __future__ import annotations

import pytest

from benchmarks.tools import fault_injection


@pytest.mark.slow
@pytest.mark.parametrize("trainer, sites", [
    ("pretrain", ["rotation", "early kill", "moved aside"]),
    ("teacher", ["checkpoint write", "training step"]),
    ("interpreter", ["export"]),
    ("pretrain-cache", ["cache build"]),
])
def test_killed_runs_resume_to_the_same_weights_and_lose_nothing(tmp_path, trainer, sites):
    report = fault_injection.run_trainer(trainer, sites, points=1, seed=0, work=tmp_path)
    assert report.kills_landed == report.kills_tried == len(sites), report.log
    assert report.weights_equal, report.log
    assert report.lost == []
