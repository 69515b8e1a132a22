"""benchmarks/experiments/indomain_fmnist.py end to end on tiny data: every method pretrains, every protocol is
reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny_teacher, write_fashion_mnist

pytest.importorskip("lightly")


@pytest.mark.slow
def test_indomain_benchmark_tiny(tmp_path, capsys):
    from benchmarks.experiments import indomain_fmnist as bench

    data = write_fashion_mnist(tmp_path / "data", n=64, split="train")
    write_fashion_mnist(data, n=32, seed=1, split="test")
    teacher = make_tiny_teacher(tmp_path / "teacher")
    out_dir = tmp_path / "out"
    methods = list(bench.METHODS)
    report = bench.main([
        "--budget-minutes", "0.02", "--calibration-steps", "2", "--batch-size", "16", "--threads", "1",
        "--data-dir", str(data), "--teacher", str(teacher), "--max-train", "64", "--max-test", "32",
        "--ft-epochs", "2", "--out-dir", str(out_dir), "--work-dir", str(tmp_path / "work"), "--tag", "tiny",
        "--no-progress", "--set", "teacher.timestep=100", "--methods", ",".join(methods),
    ])

    keys = bench.protocol_keys()
    assert keys == ("linear probe", "kNN k=20", "fine-tune 1%", "fine-tune 10%")
    saved = json.loads((out_dir / "tiny.json").read_text())
    assert list(saved["methods"]) == [f"{m}/seed0" for m in methods]
    assert saved["settings"]["timestep"] == 100 and saved["settings"]["overrides"] == ["teacher.timestep=100"]
    for method in methods:
        results = saved["methods"][f"{method}/seed0"]["evaluation"]["results"]
        expected = keys[:2] if method in bench.FROZEN_REFERENCES else keys
        assert list(results) == list(expected), method
        assert all(0 <= results[k]["top1"] <= 100 for k in expected)
    for method in bench.BUDGETED:
        pre = saved["methods"][f"{method}/seed0"]["pretrain"]
        calibration = saved["calibration"][method]
        assert pre["steps"] == calibration["steps"] >= 1 and calibration["seconds_per_step"] > 0
        assert pre["images"] == pre["steps"] * 16 and pre["images_per_s"] > 0
    assert saved["methods"]["dreamteacher/seed0"]["pretrain"]["timestep"] == 100
    assert (tmp_path / "work" / "tiny" / "dreamteacher_seed0" / "export" / "model.safetensors").is_file()
    assert saved["methods"]["pixels/seed0"]["pretrain"]["feature_dim"] == 3 * 32 * 32
    # the cached entry reads the cache built during its calibration, whose build time its budget paid for
    cache = tmp_path / "work" / "tiny" / "feature_cache_seed0"
    cached_run = json.loads((tmp_path / "work" / "tiny" / "dreamteacher-cached_seed0" / "args.json").read_text())
    assert cached_run["feature_cache"] == str(cache) and (cache / "stride_8.npy").is_file()
    build_s = saved["calibration"]["dreamteacher-cached"]["cache_build_s"]
    assert saved["methods"]["dreamteacher-cached/seed0"]["pretrain"]["cache_build_s"] == build_s >= 0

    table = (out_dir / "tiny.md").read_text()
    for method in methods:
        assert f"| {bench.LABELS[method]} | 0 |" in table
    for header in ("linear top-1", "kNN top-1", "fine-tune 1%", "fine-tune 10%", "images/s", "steps"):
        assert header in table
    assert "machine: torch" in table and f"+ {build_s:.0f} s cache build" in table
    printed = capsys.readouterr().out
    assert report["table"] in printed and "machine: torch" in printed


def test_indomain_benchmark_rejects_unknown_method():
    from benchmarks.experiments import indomain_fmnist as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "random,moco"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "simclr:one"])
    assert bench.parse_entries("teacher,random:3,teacher:0", 0) == [("teacher", 0), ("random", 3)]


def test_indomain_table_has_a_mean_row_per_method_with_two_seeds():
    from benchmarks.experiments import indomain_fmnist as bench

    def entry(method, seed, top1):
        keys = bench.protocol_keys()
        return {"method": method, "seed": seed, "pretrain": {"train_s": 10.0, "steps": 5, "images_per_s": 64.0},
                "evaluation": {"results": {k: {"top1": top1} for k in keys}}}

    table = bench.format_table({"dreamteacher/seed0": entry("dreamteacher", 0, 80.0),
                                "simclr/seed0": entry("simclr", 0, 70.0),
                                "dreamteacher/seed1": entry("dreamteacher", 1, 84.0)})
    assert "| DreamTeacher, mean | 0,1 | | | | | **82.00** (80.00, 84.00) |" in table
    assert "SimCLR (lightly), mean" not in table
    assert bench.verdict_table(dict(enumerate([entry("dreamteacher", 0, 80.0), entry("simclr", 0, 70.0)]))) == ""


@pytest.mark.parametrize(("simclr", "byol", "row"), [
    ((70.0, 71.0), (75.0, 77.0), "BYOL (lightly) 76.00 (2 seeds) | +6.00 | 4.00 | **ahead**"),
    ((70.0, 71.0), (79.0, 80.0), "BYOL (lightly) 79.50 (2 seeds) | +2.50 | 4.00 | **tie**"),
    ((70.0, 71.0), (90.0, 91.0), "BYOL (lightly) 90.50 (2 seeds) | -8.50 | 4.00 | **behind**"),
    ((75.0, 81.0), (70.0, 71.0), "SimCLR (lightly) 78.00 (2 seeds) | +4.00 | 6.00 | **tie**"),  # the rival's range
    ((76.0, 80.0), (70.0, 71.0), "SimCLR (lightly) 78.00 (2 seeds) | +4.00 | 4.00 | **tie**"),  # lead == spread
    ((70.0, 71.0), (90.0,), "BYOL (lightly) 90.00 (1 seed) | -8.00 | 4.00 | no verdict: one seed"),
])
def test_dreamteacher_leads_the_best_baseline_only_by_more_than_the_seed_spread(simclr, byol, row):
    from benchmarks.experiments import indomain_fmnist as bench

    def entry(method, top1):
        return {"method": method, "evaluation": {"results": {k: {"top1": top1} for k in bench.protocol_keys()}}}

    runs = [entry("dreamteacher", 80.0), entry("dreamteacher", 84.0), *(entry("simclr", v) for v in simclr),
            *(entry("byol", v) for v in byol)]
    table = bench.verdict_table(dict(enumerate(runs)))
    assert f"| linear probe | 82.00 | {row} |" in table
    assert table.count(row) == len(bench.protocol_keys())


def test_indomain_resume_refuses_other_settings_and_keeps_finished_entries(tmp_path):
    from benchmarks.experiments import indomain_fmnist as bench

    settings = {k: 1 for k in bench.RESUME_SETTINGS}
    old = {"settings": settings, "methods": {"random/seed0": {"method": "random"}}, "calibration": {"simclr": {}},
           "machine": {"facts": "cpu A", "matmul_gflops": [10.0, 11.0]}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(old))
    fresh = {"settings": dict(settings), "methods": {}, "calibration": {},
             "machine": {"facts": "cpu A", "matmul_gflops": [12.0]}}
    resumed = bench.resumed_report(fresh, path)
    assert resumed["methods"] == old["methods"] and resumed["calibration"] == {"simclr": {}}
    assert resumed["machine"]["matmul_gflops"] == [10.0, 11.0, 12.0]
    fresh["settings"]["batch_size"] = 2
    with pytest.raises(SystemExit, match="batch_size: 1 then, 2 now"):
        bench.resumed_report(fresh, path)


def test_steps_from_takes_an_earlier_runs_step_counts_under_the_same_settings_only(tmp_path):
    from benchmarks.experiments import indomain_fmnist as bench

    settings = {"budget_minutes": 30, "batch_size": 128, "pretrain_images": None, "threads": 2, "device": "cpu"}
    calib = {"dreamteacher": {"steps_timed": 6, "seconds_per_step": 1.05, "steps": 1711},
             "simclr": {"steps_timed": 6, "seconds_per_step": 0.88, "steps": 2056}}
    (tmp_path / "b30.json").write_text(json.dumps({"settings": settings, "calibration": calib}))
    taken = bench.calibration_from(tmp_path / "b30.json", dict(settings), {"dreamteacher"})
    assert taken == {"dreamteacher": {**calib["dreamteacher"], "steps_from": str(tmp_path / "b30.json"),
                                      "threads": 2}}
    line = bench.settings_line({"calibration": taken, "settings": {
        **settings, "steps_from": "b30", "entries": [], "num_workers": 0, "recipe": "r", "teacher": "t",
        "timestep": 50, "overrides": []}})
    assert f"dreamteacher 1711 steps taken from {tmp_path / 'b30.json'} (its 1.050 s/step at 2 threads)" in line
    for key, value in [("batch_size", 64), ("pretrain_images", 10000), ("device", "cuda")]:
        with pytest.raises(SystemExit, match=rf"{key}: {settings[key]!r} then, {value!r} now"):
            bench.calibration_from(tmp_path / "b30.json", {**settings, key: value}, {"dreamteacher"})
    with pytest.raises(SystemExit, match=r"no .*b5\.json; the tags there: b30"):
        bench.calibration_from(tmp_path / "b5.json", settings, {"dreamteacher"})


def test_steps_from_scales_the_timed_steps_to_another_budget_and_back(tmp_path):
    """A baseline given 4x the budget trains floor(4 x 1800 s / its timed s/step) steps, says which budget was
    timed, and a run chained from it back at the timed budget gets the timed budget's steps again."""
    from benchmarks.experiments import indomain_fmnist as bench

    settings = {"budget_minutes": 30, "batch_size": 128, "pretrain_images": None, "threads": 2, "device": "cpu"}
    calib = {"simclr": {"steps_timed": 6, "seconds_per_step": 1.3532, "steps": 1330},
             "dreamteacher-cached": {"seconds_per_step": 1.0, "cache_build_s": 600.0, "steps": 1200}}
    (tmp_path / "b30.json").write_text(json.dumps({"settings": settings, "calibration": calib}))
    taken = bench.calibration_from(tmp_path / "b30.json", {**settings, "budget_minutes": 120},
                                   {"simclr", "dreamteacher-cached"})
    assert taken["simclr"]["steps"] == 5320 and taken["simclr"]["timed_for_budget_minutes"] == 30
    assert taken["dreamteacher-cached"]["steps"] == 6600  # the cache's build time still comes off the budget
    line = bench.settings_line({"calibration": taken, "settings": {
        **settings, "budget_minutes": 120, "steps_from": "b30", "entries": [], "num_workers": 0, "recipe": "r",
        "teacher": "t", "timestep": 50, "overrides": []}})
    assert "simclr 5320 steps taken from" in line
    assert "(its 1.353 s/step at 2 threads, timed for a 30-min budget)" in line

    (tmp_path / "b120.json").write_text(json.dumps({"settings": {**settings, "budget_minutes": 120},
                                                    "calibration": taken}))
    back = bench.calibration_from(tmp_path / "b120.json", settings, {"simclr"})
    assert back["simclr"]["steps"] == 1330 and "timed_for_budget_minutes" not in back["simclr"]
    assert back["simclr"]["steps_from"] == str(tmp_path / "b30.json")


def test_a_budget_timed_once_by_calibrate_only_is_trained_later_at_other_threads(tmp_path, monkeypatch):
    """--calibrate-only times and trains nothing else; a later --steps-from run (pinned to one thread) trains those
    steps without timing anything, and says at how many threads the budget was measured."""
    from benchmarks.experiments import indomain_fmnist as bench
    from training.protocols import evaluation as evaluate_module
    from training.teacher import build as teacher_build

    out = tmp_path / "out"
    trained = {}

    def refuse_timing(*args, **kwargs):
        raise AssertionError("calibrated although --steps-from gave the steps")

    def fake_pretrain(seed, steps, *args, **kwargs):
        trained[seed] = steps
        return torch.nn.Identity(), {"steps": steps}

    evaluation = {"results": {"linear probe": {"top1": 50.0}},
                  "settings": {"train_images": 1, "test_images": 1, "fine_tune": {}, "knn": {}}}
    monkeypatch.setattr(bench, "calibrate_dreamteacher", lambda *a, **k: (1.05, 12.6))
    monkeypatch.setattr(bench, "pretrain_dreamteacher", fake_pretrain)
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: evaluation)
    monkeypatch.setattr(bench, "load_pretrain_images", lambda args, recipe: [None] * 64)
    monkeypatch.setattr(bench, "matmul_gflops", lambda: 1.0)
    monkeypatch.setattr(teacher_build, "build_teacher", lambda *a, **k: "teacher")
    common = ["--budget-minutes", "30", "--batch-size", "16", "--device", "cpu", "--methods", "dreamteacher:0",
              "--out-dir", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress"]
    bench.main([*common, "--threads", "2", "--tag", "b30", "--calibrate-only"])
    assert trained == {}
    assert json.loads((out / "b30.json").read_text())["methods"] == {}

    monkeypatch.setattr(bench, "calibrate_dreamteacher", refuse_timing)
    report = bench.main([*common, "--threads", "1", "--steps-from", "b30", "--tag", "new"])
    assert trained == {0: 1714}  # floor(1800 s / 1.05 s)
    saved = json.loads((out / "new.json").read_text())
    assert saved["settings"]["steps_from"] == "b30" and saved["settings"]["threads"] == 1
    assert saved["calibration"]["dreamteacher"]["steps_from"] == str(out / "b30.json")
    assert "(its 1.050 s/step at 2 threads)" in bench.settings_line(report)


@pytest.mark.parametrize("zero_init_last", [False, True])
def test_every_method_of_the_comparisons_starts_from_the_recipes_init(zero_init_last):
    """random, SimCLR and BYOL start from the backbone DreamTeacher's student starts from: the recipe's
    zero_init_last included (timm's default True would make random init a near-identity, another baseline)."""
    from benchmarks.experiments.dense_fmnist_scenes import pretrained_backbone
    from benchmarks.experiments.indomain_fmnist import fresh_backbone
    from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe
    from training.run.backbones import build_backbone

    recipe = apply_overrides(get_recipe(DEFAULT_RECIPE), [f"zero_init_last={zero_init_last}"])
    backbone = fresh_backbone(recipe, 0)
    last_bn = [block.bn2.weight for stage in (backbone.layer1, backbone.layer4) for block in stage]
    assert all(bool((w == 0).all()) == zero_init_last for w in last_bn)
    torch.manual_seed(0)
    student = build_backbone(recipe)
    dense_random = pretrained_backbone("random", {}, recipe)
    for name, value in student.state_dict().items():
        assert torch.equal(value, backbone.state_dict()[name]) and torch.equal(value, dense_random.state_dict()[name])


def test_rescoring_scripts_refuse_a_missing_run_or_backbone(tmp_path):
    from benchmarks.experiments.dense_fmnist_scenes import load_dense_report

    with pytest.raises(FileNotFoundError, match="run dense_fmnist_scenes.py --tag b30 first"):
        load_dense_report(tmp_path, "b30", ["random"])
    (tmp_path / "b30.json").write_text(json.dumps({"pretraining": {"simclr": {"weights": "w"}}}))
    assert load_dense_report(tmp_path, "b30", ["random", "teacher", "simclr"])["pretraining"]["simclr"]
    with pytest.raises(ValueError, match=r"no pretrained backbone for \['byol'\]; it has \['simclr'\]"):
        load_dense_report(tmp_path, "b30", ["simclr", "byol"])


def test_ssl_set_is_checked_against_each_methods_settings(capsys):
    from benchmarks.experiments import indomain_fmnist as bench

    args = bench.parse_args(["--ssl-set", "simclr.temperature=0.2", "--ssl-set", "byol.lr_scale=2"])
    assert args.ssl_settings == {"simclr": {"temperature": 0.2}, "byol": {"lr_scale": 2.0}}
    for bad, message in (("byol.temperature=0.2", "byol has no setting 'temperature'"),
                         ("temperature=0.2", "takes METHOD.KEY=VALUE"), ("simclr.temperature=low", "not a number")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--ssl-set", bad])
        assert message in capsys.readouterr().err


def test_calibration_rounds_take_turns_and_size_each_method_by_its_median_round(tmp_path, monkeypatch):
    """A slow spell of the host lands on every method alike: the methods are timed in turns, and each gets the
    median of its rounds, not its last or its first."""
    from benchmarks.experiments import indomain_fmnist as bench

    order, times = [], {"simclr": iter([1.0, 3.0, 1.2]), "byol": iter([2.0, 2.2, 9.0])}

    def fake_calibrate(method, *args, **kwargs):
        order.append(method)
        return next(times[method]), 0.0

    monkeypatch.setattr(bench, "calibrate_method", fake_calibrate)
    monkeypatch.setattr(bench, "load_pretrain_images", lambda args, recipe: [None] * 64)
    monkeypatch.setattr(bench, "matmul_gflops", lambda: 1.0)
    report = bench.main(["--budget-minutes", "1", "--threads", "1", "--device", "cpu", "--methods", "simclr,byol",
                         "--calibration-rounds", "3", "--calibrate-only", "--tag", "c", "--out-dir",
                         str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--no-progress"])
    assert order == ["simclr", "byol"] * 3
    assert report["calibration"]["simclr"]["seconds_per_step"] == 1.2
    assert report["calibration"]["simclr"]["steps"] == 50  # floor(60 s / 1.2 s)
    assert report["calibration"]["byol"]["seconds_per_step_by_round"] == [2.0, 2.2, 9.0]
    assert report["calibration"]["byol"]["steps"] == 27  # floor(60 s / 2.2 s)
    with pytest.raises(SystemExit):
        bench.parse_args(["--calibration-rounds", "0"])


def _run(tag: str, entries: dict[str, float], threads: int = 1, **settings) -> dict:
    """A finished indomain_fmnist report whose every protocol scores `entries[key]`."""
    from benchmarks.experiments import indomain_fmnist as bench

    methods = {}
    for key, top1 in entries.items():
        method, seed = key.split("/seed")
        methods[key] = {"method": method, "seed": int(seed), "pretrain": {"steps": 10, "train_s": 1.0},
                        "evaluation": {"results": {k: {"top1": top1} for k in bench.protocol_keys()}}}
    base = {"budget_minutes": 30.0, "batch_size": 128, "pretrain_images": None, "ssl_augment": "tensor",
            "recipe": "r", "overrides": [], "teacher": "t", "timestep": 50, "data": "d", "max_train": None,
            "max_test": None, "split": "test", "ft_epochs": None, "input_size": [3, 32, 32], "zero_init_last": False,
            "threads": threads, "num_workers": 0, "entries": list(entries), "ssl_overrides": {},
            "evaluation": {"train_images": 60000, "test_images": 10000}}
    calibration = {m: {"steps": 10, "seconds_per_step": 1.0} for m in {e.split("/")[0] for e in entries}}
    return {"tag": tag, "settings": {**base, **settings}, "calibration": calibration, "methods": methods,
            "machine": {"facts": "test machine", "matmul_gflops": [1.0]}}


def test_combine_puts_each_methods_seeds_run_apart_into_one_table_with_mean_rows(tmp_path):
    from benchmarks.experiments import indomain_fmnist as bench

    out = tmp_path / "out"
    out.mkdir()
    runs = {"dt": _run("dt", {"dreamteacher/seed0": 90.0, "dreamteacher/seed1": 92.0}),
            "ssl": _run("ssl", {"simclr/seed0": 85.0, "simclr/seed1": 86.0}, threads=2,
                        ssl_overrides={"simclr": {"lr_scale": 0.5}}),
            "other_budget": _run("other_budget", {"byol/seed0": 80.0}, budget_minutes=5.0),
            "again": _run("again", {"dreamteacher/seed1": 91.0}),
            "short": _run("short", {"dreamteacher/seed2": 89.0}),
            "ssl_defaults": _run("ssl_defaults", {"simclr/seed2": 84.0})}
    runs["short"]["calibration"]["dreamteacher"]["steps"] = 9
    for name, run in runs.items():
        (out / f"{name}.json").write_text(json.dumps(run))
    report = bench.main(["--combine", "dt,ssl", "--tag", "both", "--out-dir", str(out)])
    assert list(report["methods"]) == ["dreamteacher/seed0", "dreamteacher/seed1", "simclr/seed0", "simclr/seed1"]
    table = (out / "both.md").read_text()
    assert "| DreamTeacher, mean | 0,1 | | | | | **91.00** (90.00, 92.00)" in table
    assert "**85.50** (85.00, 86.00)" in table and "SSL settings {'simclr': {'lr_scale': 0.5}}" in table
    assert "1/2 threads" in table
    with pytest.raises(SystemExit, match="other_budget differs from dt .budget_minutes: 30.0 then, 5.0 now"):
        bench.main(["--combine", "dt,other_budget", "--tag", "x", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="dreamteacher/seed1 is in more than one"):
        bench.main(["--combine", "dt,again", "--tag", "x", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="short gave dreamteacher 9 steps, another run 10"):
        bench.main(["--combine", "dt,short", "--tag", "x", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="no .*missing.json; the tags there: again, both, dt, other_budget, short"):
        bench.main(["--combine", "dt,missing", "--tag", "x", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match=r"simclr ran with settings the defaults in ssl_defaults, \{'lr_scale': 0.5\}"):
        bench.main(["--combine", "ssl,ssl_defaults", "--tag", "x", "--out-dir", str(out)])
    for argv in (["--combine", "dt,ssl"], ["--combine", "dt,ssl", "--tag", "dt"], ["--combine", " , ", "--tag", "x"],
                 ["--methods", "random,pixels", "--calibrate-only"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)  # no --tag, a --tag that would overwrite an input, no tags, nothing to time


def test_a_dreamteacher_entry_killed_midway_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """Under --resume, pretrain_dreamteacher keeps a run folder that holds a checkpoint and asks the trainer to resume
    it (the steps before the checkpoint keep their times); a folder without one, or any folder without --resume,
    starts afresh."""
    from benchmarks.experiments import indomain_fmnist as bench
    from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe
    from training import pretrain
    from training.run import backbones

    recipe = get_recipe(DEFAULT_RECIPE)
    args = bench.parse_args(["--threads", "1", "--resume"])
    calls = []

    def fake_main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--output-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        with (out / "metrics.jsonl").open("a") as f:  # the trainer, resumed at step 2, logs steps 3-6
            for step in (3, 4, 5, 6):
                f.write(json.dumps({"step": step, "images_per_s": 8.0, "loss/loss": 1.0 / step}) + "\n")

    monkeypatch.setattr(pretrain, "main", fake_main)
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: torch.nn.Identity())
    run = tmp_path / "dreamteacher_seed0"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "images_per_s": 4.0, "loss/loss": 1.0}) + "\n"
                                               for s in (1, 2)))
    _, info = bench.pretrain_dreamteacher(0, 6, args, recipe, 16, "teacher", 1, run, 64)
    argv = calls[-1]
    assert argv[argv.index("--resume") + 1] == "latest"
    assert argv[argv.index("--checkpoint-every") + 1] == str(bench.DT_CHECKPOINT_EVERY)
    assert info["steps"] == 6 and info["train_s"] == 2 * 4.0 + 4 * 2.0  # steps 1-2 at 4 s, 3-6 at 2 s (resumed)
    assert info["final_loss"] == 1.0 / 6

    fresh = tmp_path / "killed_before_its_first_checkpoint"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text(json.dumps({"step": 1, "images_per_s": 1.0, "loss/loss": 9.0}) + "\n")
    _, info = bench.pretrain_dreamteacher(0, 6, args, recipe, 16, "teacher", 1, fresh, 64)
    assert info["steps"] == 4  # only the new run's rows: the old folder was cleared
    _, info = bench.pretrain_dreamteacher(0, 6, bench.parse_args(["--threads", "1"]), recipe, 16, "teacher", 1, run, 64)
    assert info["steps"] == 4 and not (run / "checkpoints").exists()  # no --resume: a fresh run, checkpoint or not
