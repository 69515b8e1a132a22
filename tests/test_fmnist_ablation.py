"""benchmarks/experiments/fmnist_ablation.py: the choosing score, and a finished sweep re-rendered without
training."""

from __future__ import annotations

import json

import pytest

from benchmarks.experiments import fmnist_ablation


def result(linear: float, knn: float, ft1: float, ft10: float) -> dict:
    return {"args": ["--lr", "1e-3"], "train_seconds": 1.0,
            "scores": dict(zip(fmnist_ablation.PROTOCOL_KEYS, (linear, knn, ft1, ft10), strict=True))}


def test_the_best_mean_of_the_four_protocols_is_marked():
    results = {"a": result(90, 80, 70, 80), "b": result(85, 85, 75, 81)}  # means 80.0 and 81.5
    assert fmnist_ablation.mean_score(results["b"]) == pytest.approx(81.5)
    text = fmnist_ablation.table(results)
    assert "| **b** | 85.00 | 85.00 | 75.00 | 81.00 | 81.50 |" in text and "| a | " in text


def test_a_finished_sweep_is_rerendered_without_training(tmp_path, monkeypatch):
    import training.pretrain as pretrain

    report = {"split": "validation", "results": {"recipe": result(90, 80, 70, 80)}, "machine": "m"}
    (tmp_path / "t.json").write_text(json.dumps(report))
    monkeypatch.setattr(pretrain, "main", lambda argv: pytest.fail("a finished variant was trained again"))
    fmnist_ablation.main(["--tag", "t", "--variants", "recipe", "--out-dir", str(tmp_path)])
    assert "| **recipe** |" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit, match="scored on the validation split, not test"):
        fmnist_ablation.main(["--tag", "t", "--split", "test", "--out-dir", str(tmp_path)])


def test_a_variant_finished_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch):
    import training.evaluate as evaluate
    import training.pretrain as pretrain

    out = tmp_path / "t.json"
    other = {"split": "validation", "results": {"at_3": result(85, 85, 75, 81)}, "machine": "m"}
    monkeypatch.setattr(pretrain, "main", lambda argv: out.write_text(json.dumps(other)))  # lands while this trains
    scores = dict(zip(fmnist_ablation.PROTOCOL_KEYS, (90, 80, 70, 80), strict=True))
    monkeypatch.setattr(evaluate, "main", lambda argv: {"results": {k: {"top1": v} for k, v in scores.items()}})
    fmnist_ablation.main(["--tag", "t", "--variants", "recipe", "--out-dir", str(tmp_path),
                          "--work-dir", str(tmp_path / "runs")])
    assert set(json.loads(out.read_text())["results"]) == {"at_3", "recipe"}


def test_each_variant_names_its_machine_and_an_older_files_variants_get_its_one_machine(tmp_path, monkeypatch):
    import training.evaluate as evaluate
    import training.pretrain as pretrain

    out = tmp_path / "t.json"
    out.write_text(json.dumps({"split": "validation", "results": {"at_3": result(85, 85, 75, 81)},
                               "machine": "AMD EPYC"}))  # a file from before per-variant machines
    monkeypatch.setattr(fmnist_ablation, "describe_machine", lambda: "Intel Xeon")
    monkeypatch.setattr(pretrain, "main", lambda argv: None)
    scores = dict(zip(fmnist_ablation.PROTOCOL_KEYS, (90, 80, 70, 80), strict=True))
    monkeypatch.setattr(evaluate, "main", lambda argv: {"results": {k: {"top1": v} for k, v in scores.items()}})
    fmnist_ablation.main(["--tag", "t", "--variants", "recipe,lamb", "--out-dir", str(tmp_path),
                          "--work-dir", str(tmp_path / "runs")])
    saved = json.loads(out.read_text())
    assert "machine" not in saved
    assert {name: r["machine"] for name, r in saved["results"].items()} == {
        "at_3": "AMD EPYC", "recipe": "Intel Xeon", "lamb": "Intel Xeon"}
    assert "machines: AMD EPYC (at_3); Intel Xeon (recipe, lamb)" in (tmp_path / "t.md").read_text()
