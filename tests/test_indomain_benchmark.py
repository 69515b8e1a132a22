"""benchmarks/indomain_fmnist.py end to end on tiny data: every method pretrains, every protocol is reported."""

from __future__ import annotations

import json

import pytest

from tests.tiny import make_tiny_teacher, write_fashion_mnist

pytest.importorskip("lightly")


@pytest.mark.slow
def test_indomain_benchmark_tiny(tmp_path, capsys):
    from benchmarks import indomain_fmnist as bench

    data = write_fashion_mnist(tmp_path / "data", n=64, split="train")
    write_fashion_mnist(data, n=32, seed=1, split="test")
    teacher = make_tiny_teacher(tmp_path / "teacher")
    out_dir = tmp_path / "out"
    report = bench.main([
        "--budget-minutes", "0.02", "--calibration-steps", "2", "--batch-size", "16", "--threads", "1",
        "--data-dir", str(data), "--teacher", str(teacher), "--max-train", "64", "--max-test", "32",
        "--ft-epochs", "2", "--out-dir", str(out_dir), "--work-dir", str(tmp_path / "work"), "--tag", "tiny",
        "--no-progress", "--set", "teacher.timestep=100",
    ])

    keys = bench.protocol_keys()
    assert keys == ("linear probe", "kNN k=20", "fine-tune 1%", "fine-tune 10%")
    saved = json.loads((out_dir / "tiny.json").read_text())
    assert list(saved["methods"]) == list(bench.METHODS)
    assert saved["settings"]["timestep"] == 100 and saved["settings"]["overrides"] == ["teacher.timestep=100"]
    for method in bench.METHODS:
        results = saved["methods"][method]["evaluation"]["results"]
        expected = keys[:2] if method == "teacher" else keys
        assert list(results) == list(expected), method
        assert all(0 <= results[k]["top1"] <= 100 for k in expected)
    for method in bench.PRETRAINED:
        pre = saved["methods"][method]["pretrain"]
        assert pre["steps"] >= 1 and pre["images"] == pre["steps"] * 16 and pre["images_per_s"] > 0
        assert pre["calibration"]["seconds_per_step"] > 0
    assert saved["methods"]["dreamteacher"]["pretrain"]["timestep"] == 100
    assert (tmp_path / "work" / "tiny" / "dreamteacher" / "export" / "model.safetensors").is_file()

    table = (out_dir / "tiny.md").read_text()
    for label in bench.LABELS.values():
        assert f"| {label} |" in table
    for header in ("linear top-1", "kNN top-1", "fine-tune 1%", "fine-tune 10%", "images/s", "steps"):
        assert header in table
    assert "machine: torch" in table
    printed = capsys.readouterr().out
    assert report["table"] in printed and "machine: torch" in printed


def test_indomain_benchmark_rejects_unknown_method():
    from benchmarks import indomain_fmnist as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "random,moco"])
    assert bench.parse_methods("teacher,random") == ["random", "teacher"]
