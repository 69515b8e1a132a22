"""benchmarks/experiments/ssl_tuning.py: each baseline's grid, run as indomain_fmnist.py trials that score on
validation, share one calibration and choose by the mean of the four protocols."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lightly")

from benchmarks.experiments import ssl_tuning  # noqa: E402
from benchmarks.experiments.ssl_baselines import SETTINGS  # noqa: E402


def test_each_grid_starts_at_the_defaults_and_stays_within_the_ablations_ten_trials():
    for method, grid in ssl_tuning.GRIDS.items():
        assert grid[0] == SETTINGS[method] and len(grid) <= 10
        assert len({ssl_tuning.trial_name(method, s) for s in grid}) == len(grid)
    assert ssl_tuning.trial_name("simclr", {"temperature": 0.2, "lr_scale": 2}) == "simclr_temperature0.2_lr_scale2"


def fake_report(tag: str, methods: list[str], settings: dict[str, str]) -> dict:
    """An indomain_fmnist report whose scores encode the trial: SimCLR scores best at temperature 0.2, lr x1."""
    results = {}
    for method in methods:
        temperature = float(settings.get("temperature", 0.5))
        lr_scale = float(settings.get("lr_scale", 1.0))
        top1 = 80 - 10 * abs(temperature - 0.2) - abs(lr_scale - 1.0)
        results[f"{method}/seed0"] = {
            "pretrain": {"steps": 7, "train_s": 1.0},
            "evaluation": {"results": {k: {"top1": top1} for k in ssl_tuning.PROTOCOL_KEYS}}}
    return {"tag": tag, "methods": results, "machine": {"facts": "test machine"}}


def test_trials_score_on_validation_share_the_first_calibration_and_choose_the_best_mean(tmp_path, monkeypatch):
    from benchmarks.experiments import indomain_fmnist

    calls = []

    def fake_main(argv):
        calls.append(argv)
        value = dict(zip(argv, argv[1:], strict=False))
        settings = dict(a.split(".", 1)[1].split("=") for a in argv if a.startswith(("simclr.", "byol.")))
        return fake_report(value["--tag"], [m.split(":")[0] for m in value["--methods"].split(",")], settings)

    timings = []
    monkeypatch.setattr(indomain_fmnist, "main", fake_main)
    monkeypatch.setattr(ssl_tuning, "dreamteacher_budget",
                        lambda args: timings.append(1) or {"dreamteacher_steps": 187, "budget_minutes": 3.5})
    summary = ssl_tuning.main(["--tag", "t", "--trials", "4", "--out-dir", str(tmp_path / "new"), "--no-progress"])

    first, *rest = calls
    assert "--steps-from" not in first and first[first.index("--methods") + 1] == "simclr:0,byol:0"
    assert all(c[c.index("--steps-from") + 1] == "t_defaults" for c in rest)
    assert all(c[c.index("--split") + 1] == "validation" for c in calls)
    assert len(summary["trials"]) == 8  # 4 settings each, the defaults among them
    tried = [row["trial"] for row in summary["trials"] if row["method"] == "simclr"]
    assert tried == ["simclr_temperature0.5_lr_scale1", "simclr_temperature0.5_lr_scale2",
                     "simclr_temperature0.5_lr_scale0.5", "simclr_temperature0.2_lr_scale1"]
    assert summary["chosen"]["simclr"] == "simclr_temperature0.2_lr_scale1"
    saved = json.loads((tmp_path / "new" / "t.json").read_text())
    assert saved["chosen"] == summary["chosen"] and saved["split"] == "validation"
    assert "**simclr_temperature0.2_lr_scale1**" in (tmp_path / "new" / "t.md").read_text()
    assert all(c[c.index("--budget-minutes") + 1] == "3.5" for c in calls)
    # a rerun keeps the budget its first trials had instead of timing DreamTeacher again
    ssl_tuning.main(["--tag", "t", "--trials", "1", "--out-dir", str(tmp_path / "new"), "--no-progress"])
    assert len(timings) == 1 and calls[-1][calls[-1].index("--budget-minutes") + 1] == "3.5"
    # a finished trial of the same settings is read back, not reopened: its files stay as they were written
    (tmp_path / "new" / "trials").mkdir()
    finished = {**fake_report("t_defaults", ["simclr", "byol"], {}),
                "settings": {"budget_minutes": 3.5, "max_train": 20000, "max_test": 5000, "calibration_steps": 12,
                             "seed": 0, "split": "validation"}}
    (tmp_path / "new" / "trials" / "t_defaults.json").write_text(json.dumps(finished))
    before = len(calls)
    again = ssl_tuning.main(["--tag", "t", "--trials", "1", "--out-dir", str(tmp_path / "new"), "--no-progress"])
    assert len(calls) == before and [row["trial"] for row in again["trials"]] == [
        "simclr_temperature0.5_lr_scale1", "byol_momentum_base0.99_lr_scale1"]
    # one of other settings goes to indomain_fmnist, whose --resume refuses it by name
    ssl_tuning.main(["--tag", "t", "--trials", "1", "--max-test", "1000", "--out-dir", str(tmp_path / "new"),
                     "--no-progress"])
    assert len(calls) == before + 1
