"""benchmarks/experiments/label_distill_fmnist.py end to end on tiny data: every method runs and is reported."""

from __future__ import annotations

import json

import pytest

from tests.tiny import make_tiny_teacher, write_fashion_mnist

pytest.importorskip("lightly")


@pytest.mark.slow
def test_label_distill_benchmark_tiny(tmp_path):
    from benchmarks.experiments import label_distill_fmnist as bench

    data = write_fashion_mnist(tmp_path / "data", n=1000)
    write_fashion_mnist(data, n=32, seed=1, split="test")
    teacher = make_tiny_teacher(tmp_path / "teacher")
    report = bench.main(["--teacher", str(teacher), "--data-dir", str(data), "--steps", "2", "--batch-size", "16",
                         "--interpreter-epochs", "1", "--ft-epochs", "1", "--max-test", "32", "--threads", "1",
                         "--tag", "tiny", "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert list(report["results"]) == ["interpreter", "supervised", "feature", "mix", "mix_head", "simclr"]
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert saved["results"] == report["results"]
    table = (tmp_path / "out" / "tiny.md").read_text()
    assert all(f"| {label} |" in table for label in bench.ROWS.values())
