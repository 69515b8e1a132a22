"""Tune the SimCLR and BYOL baselines with the trial budget our own recipe got, and choose on validation only.

    python benchmarks/experiments/ssl_tuning.py --tag main_job_length            # the whole grid, resumable
    python benchmarks/experiments/ssl_tuning.py --tag t --methods simclr --trials 2 --budget-minutes 0.2 \
        --max-train 2000 --max-test 500                                          # a quick look

The DreamTeacher recipe was chosen by benchmarks/experiments/fmnist_ablation.py: ten trials at the main job's
length, each scored by training/evaluate.py's four protocols on the validation carve of train (20,000 fitting /
5,000 scored images). Each baseline gets the same here: a stated grid of at most ten settings (GRIDS), each trial
one benchmarks/experiments/indomain_fmnist.py run of that setting, scored the same way, with the wall time of one
ablation trial: the recipe's own length (187 steps) times DreamTeacher's seconds per step, timed at the start on
this machine right before the baselines' own timing (or `--budget-minutes`). The first trial of the grid runs both
methods at their defaults and times their seconds per step; every other trial takes its step count from it
(`--steps-from`), so all trials of a method train the same number of steps and a busy host changes wall times, not
results. Pin the process to the cores it should use (e.g. `taskset -c 1`): every timing sees the same ones.

The chosen setting of each method is the one with the highest mean of the four top-1s (linear probe, kNN, fine-tune
1% and 10%) on validation; the test split is never read. Per-trial reports go to `<out-dir>/trials/`, the summary
to `<out-dir>/<tag>.md` and `.json`, rewritten after every trial; a rerun skips the trials already there.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.experiments.ssl_baselines import SETTINGS, ssl_settings  # noqa: E402
from dreamteacher_models.recipes import get_recipe  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

# Per method, every setting tried (the defaults among them): SimCLR's loss temperature x lr, BYOL's target momentum x
# lr; lr_scale multiplies lightly's CIFAR lr (0.06 x batch / 128).
GRIDS = {
    "simclr": [{"temperature": t, "lr_scale": s} for t in (0.5, 0.2, 0.1) for s in (1.0, 2.0, 0.5)],
    "byol": [{"momentum_base": m, "lr_scale": s} for m in (0.99, 0.996, 0.9) for s in (1.0, 2.0, 0.5)],
}
PROTOCOL_KEYS = ("linear probe", "kNN k=20", "fine-tune 1%", "fine-tune 10%")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="name of the summary (and prefix of the trials' reports)")
    p.add_argument("--methods", default="simclr,byol", help="comma-separated, from: simclr,byol")
    p.add_argument("--trials", type=int, help="the first N settings of each method's grid (default: all)")
    p.add_argument("--budget-minutes", type=float,
                   help="pretraining wall time per trial (default: the recipe's length of DreamTeacher steps, timed)")
    p.add_argument("--calibration-steps", type=int, default=12,
                   help="steps timed per method, DreamTeacher's included (default 12: the median of 11 shrugs off a "
                        "passing load)")
    p.add_argument("--max-train", type=int, default=20000, help="evaluation fitting images (as fmnist_ablation.py)")
    p.add_argument("--max-test", type=int, default=5000, help="scored validation images (as fmnist_ablation.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the recipe's)")
    p.add_argument("--out-dir", default="benchmarks/results/ssl_tuning")
    p.add_argument("--work-dir", default="runs/ssl_tuning")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in GRIDS]
    if bad or not args.method_list:
        p.error(f"--methods: unknown {bad or args.methods!r}; allowed: {', '.join(GRIDS)}")
    if args.trials is not None and args.trials < 1:
        p.error("--trials must be >= 1")
    return args


def trial_name(method: str, settings: dict[str, float]) -> str:
    """'simclr_temperature0.2_lr_scale2': the method and its settings, in SETTINGS order."""
    full = ssl_settings(method, settings)
    return "_".join([method, *(f"{k}{full[k]:g}" for k in SETTINGS[method])])


def trial_argv(args, tag: str, methods: list[str], settings: dict[str, float] | None, steps_from: str | None
               ) -> list[str]:
    argv = ["--methods", ",".join(f"{m}:{args.seed}" for m in methods), "--tag", tag, "--resume",
            "--budget-minutes", str(args.budget_minutes), "--split", "validation", "--seed", str(args.seed),
            "--max-train", str(args.max_train), "--max-test", str(args.max_test),
            "--calibration-steps", str(args.calibration_steps),
            "--out-dir", str(Path(args.out_dir) / "trials"), "--work-dir", args.work_dir]
    argv += ["--steps-from", steps_from] if steps_from else []
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    argv += ["--no-progress"] if args.no_progress else []
    for key, value in (settings or {}).items():
        argv += ["--ssl-set", f"{methods[0]}.{key}={value:g}"]
    return argv


def run_trial(args, tag: str, methods: list[str], settings: dict[str, float] | None, steps_from: str | None
              ) -> dict[str, Any]:
    """indomain_fmnist.py's report of one trial; a finished trial is read back, not reopened, so a rerun of the grid
    leaves its files as they were written."""
    from benchmarks.experiments import indomain_fmnist

    path = Path(args.out_dir) / "trials" / f"{tag}.json"
    if path.is_file():
        report = json.loads(path.read_text())
        wanted = {"budget_minutes": args.budget_minutes, "max_train": args.max_train, "max_test": args.max_test,
                  "calibration_steps": args.calibration_steps, "seed": args.seed, "split": "validation"}
        if (all(report["settings"].get(k) == v for k, v in wanted.items())
                and all(f"{m}/seed{args.seed}" in report["methods"] for m in methods)):
            return report
    # unfinished, or run with other settings: indomain_fmnist's --resume continues it or refuses, naming them
    return indomain_fmnist.main(trial_argv(args, tag, methods, settings, steps_from))


def trial_row(report: dict[str, Any], method: str, seed: int, name: str, settings: dict[str, float]
              ) -> dict[str, Any]:
    entry = report["methods"][f"{method}/seed{seed}"]
    scores = {k: v["top1"] for k, v in entry["evaluation"]["results"].items()}
    return {"trial": name, "method": method, "settings": ssl_settings(method, settings),
            "steps": entry["pretrain"]["steps"], "train_s": entry["pretrain"]["train_s"], "scores": scores,
            "mean": round(statistics.mean(scores[k] for k in PROTOCOL_KEYS), 2), "report": report["tag"]}


def chosen(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per method, the trial with the highest mean of the four validation top-1s."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["method"] not in best or row["mean"] > best[row["method"]]["mean"]:
            best[row["method"]] = row
    return {m: r["trial"] for m, r in best.items()}


def render(summary: dict[str, Any]) -> str:
    picks = set(summary["chosen"].values())
    lines = [f"# Baseline tuning, {summary['tag']}", "",
             f"Top-1 on the validation carve of train ({summary['max_test']} scored, {summary['max_train']} fitting "
             f"images); {summary['budget_minutes']:g} min of pretraining per trial; chosen (**bold**): the highest "
             "mean of the four.", "",
             "| trial | steps | train s | " + " | ".join(PROTOCOL_KEYS) + " | mean |", "|---" * 8 + "|"]
    for row in summary["trials"]:
        name = f"**{row['trial']}**" if row["trial"] in picks else row["trial"]
        lines.append(f"| {name} | {row['steps']} | {row['train_s']:.0f} | "
                     + " | ".join(f"{row['scores'][k]:.2f}" for k in PROTOCOL_KEYS) + f" | {row['mean']:.2f} |")
    lines += ["", f"machine: {summary['machine']}", ""]
    return "\n".join(lines)


def dreamteacher_budget(args) -> dict[str, Any]:
    """The wall time of one recipe-length DreamTeacher run on this machine now: the recipe's steps (training/
    pretrain.py's training_length) times the median seconds per step of indomain_fmnist.py's calibration."""
    from benchmarks.experiments import indomain_fmnist
    from training.pretrain import training_length
    from training.run.hardware import cpu_threads_per_process

    data = ["--data-dir", args.data_dir] if args.data_dir else []
    ns = indomain_fmnist.parse_args(["--calibration-steps", str(args.calibration_steps), *data])
    recipe = get_recipe(ns.recipe)
    steps, _ = training_length(argparse.Namespace(max_steps=None), recipe, recipe.data.num_images)
    seconds_per_step, _ = indomain_fmnist.calibrate_dreamteacher(
        ns, recipe.optim.batch_size, indomain_fmnist.resolve_teacher_source(ns, recipe), cpu_threads_per_process(),
        Path(args.work_dir))
    return {"dreamteacher_steps": steps, "seconds_per_step": round(seconds_per_step, 4),
            "budget_minutes": round(steps * seconds_per_step / 60, 3)}


def write_summary(summary: dict[str, Any], out_dir: Path) -> None:
    summary["chosen"] = chosen(summary["trials"])
    write_text_atomic(out_dir / f"{summary['tag']}.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out_dir / f"{summary['tag']}.md", render(summary))


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    earlier = out_dir / f"{args.tag}.json"
    if args.budget_minutes is None:  # timed once per tag: a rerun keeps the budget its first trials had
        budget = json.loads(earlier.read_text())["budget"] if earlier.is_file() else dreamteacher_budget(args)
        args.budget_minutes = budget["budget_minutes"]
    else:
        budget = {"budget_minutes": args.budget_minutes, "given": True}
    grids = {m: GRIDS[m][:args.trials] for m in args.method_list}  # each grid starts with the method's defaults
    defaults_tag = f"{args.tag}_defaults"
    summary: dict[str, Any] = {"tag": args.tag, "budget": budget, "budget_minutes": args.budget_minutes,
                               "max_train": args.max_train, "max_test": args.max_test, "split": "validation",
                               "grids": grids, "trials": [], "machine": describe_machine()}
    write_summary(summary, out_dir)  # the budget first: a rerun must give its trials the same one
    report = run_trial(args, defaults_tag, args.method_list, None, None)
    for method in args.method_list:
        summary["trials"].append(trial_row(report, method, args.seed, trial_name(method, {}), {}))
    write_summary(summary, out_dir)
    # the other settings, the methods taking turns, so an interrupted grid has tried both alike
    queue = [(m, grid[i]) for i in range(1, max(map(len, grids.values()))) for m, grid in grids.items()
             if i < len(grid)]
    for method, settings in queue:
        name = trial_name(method, settings)
        report = run_trial(args, f"{args.tag}_{name}", [method], settings, defaults_tag)
        summary["trials"].append(trial_row(report, method, args.seed, name, settings))
        write_summary(summary, out_dir)
    print(render(summary))
    return summary


if __name__ == "__main__":
    main()
