"""Recipe ablations at the main job's budget: which pairing, regressor, lr and loss weights the Fashion-MNIST recipe
should use. Each variant trains `training/pretrain.py` for the same number of steps (the main job's, by default)
and is scored by `training/evaluate.py` (linear probe, kNN, fine-tune with 1% and 10% of the labels) on the
validation carve of train by default (`--split validation`: a choice never reads the test split).

    python benchmarks/experiments/fmnist_ablation.py --variants pairs_c2c3,pairs_all4 --tag r1
    python benchmarks/experiments/fmnist_ablation.py --variant mine="--set loss.at_weight=3 --lr 1e-3"  # ad-hoc

Scores depend on the seed and the step count, not on the machine's speed, so variants run at different times
compare fairly; the wall time of each run is recorded too. Results go to `benchmarks/results/fmnist_ablation/
<tag>.json` and `.md`, rewritten after every variant; a variant already in the JSON is not run again (rerun with a
new tag), so an interrupted sweep continues where it stopped. Processes given different variants may share a tag
(one per core): each merges its results into the file when it writes (not locked: two finishing in the same
instant can race).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

from training.protocols.splits import SPLITS  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

# name -> extra arguments for training/pretrain.py (on top of the recipe)
VARIANTS = {
    "recipe": [],
    "pairs_auto_w256": ["--set", "pairs=()", "--set", "regressor_width=256", "--set", "ppm_bins=(1,2,3,6)"],
    "pairs_c2c3": ["--set", "pairs=((4,4),(8,8))"],
    "pairs_all4": ["--set", "pairs=((4,4),(8,8),(16,8),(32,8))"],
    "pairs_stem": ["--set", "pairs=((2,2),(4,4),(8,8))"],
    "lr_1e-3": ["--lr", "1e-3"],
    "lr_4e-3": ["--lr", "4e-3"],
    "at_1": ["--set", "loss.at_weight=1.0"],
    "at_3": ["--set", "loss.at_weight=3.0"],
    "lamb": ["--set", "optim.optimizer='lamb'"],
    "no_zero_init": ["--set", "zero_init_last=False"],
    "t_10": ["--set", "teacher.timestep=10"],
    "t_150": ["--set", "teacher.timestep=150"],
}
PROTOCOL_KEYS = ("linear probe", "kNN k=20", "fine-tune 1%", "fine-tune 10%")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="recipe", help=f"comma-separated names from: {', '.join(VARIANTS)}")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"',
                   help="an ad-hoc variant: a name and training/pretrain.py arguments, repeatable")
    p.add_argument("--tag", required=True, help="results file name")
    p.add_argument("--max-steps", type=int, help="steps per variant (default: the recipe's, i.e. the main job's)")
    p.add_argument("--max-train", type=int, default=20000, help="evaluation train subset (seeded)")
    p.add_argument("--max-test", type=int, default=5000, help="scored images: a seeded subset of --split")
    p.add_argument("--split", choices=SPLITS, default="validation",
                   help="score on the validation carve of train (default: an ablation chooses) or on test")
    p.add_argument("--teacher", help="teacher folder for every variant (default: the recipe's)")
    p.add_argument("--work-dir", default="runs/fmnist_ablation")
    p.add_argument("--out-dir", default="benchmarks/results/fmnist_ablation")
    args = p.parse_args(argv)
    chosen = {}
    for name in filter(None, args.variants.split(",")):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        chosen[name] = VARIANTS[name]
    for item in args.variant:
        name, sep, extra = item.partition("=")
        if not sep:
            p.error(f"--variant takes NAME=\"ARGS\", got {item!r}")
        chosen[name] = shlex.split(extra)
    args.chosen = chosen
    return args


def mean_score(result: dict) -> float:
    """The choosing score: the mean of the four protocols' top-1 (as benchmarks/experiments/ssl_tuning.py)."""
    return sum(result["scores"].get(k, float("nan")) for k in PROTOCOL_KEYS) / len(PROTOCOL_KEYS)


def table(results: dict) -> str:
    best = max(results, key=lambda name: mean_score(results[name]), default=None)
    lines = ["| variant | " + " | ".join(PROTOCOL_KEYS) + " | mean | train s | args |", "|---" * 8 + "|"]
    for name, r in results.items():
        scores = " | ".join(f"{r['scores'].get(k, float('nan')):.2f}" for k in PROTOCOL_KEYS)
        label = f"**{name}**" if name == best else name
        lines.append(f"| {label} | {scores} | {mean_score(r):.2f} | {r['train_seconds']:.0f} | "
                     f"`{' '.join(r['args'])}` |")
    return "\n".join(lines)


def load_report(path: Path) -> dict:
    """A results file, each variant carrying the machine it ran on (older files kept one machine for the whole
    file: the last writer's, which their variants get)."""
    report = json.loads(path.read_text())
    legacy = report.pop("machine", "not recorded")
    for result in report["results"].values():
        result.setdefault("machine", legacy)
    return report


def machines_line(results: dict) -> str:
    """Each machine the variants ran on, with its variants: scores compare across machines, wall times do not."""
    by_machine: dict[str, list[str]] = {}
    for name, result in results.items():
        by_machine.setdefault(result["machine"], []).append(name)
    return "; ".join(f"{machine} ({', '.join(names)})" for machine, names in by_machine.items())


def write_tables(report: dict, out_json: Path, split: str, max_test: int) -> None:
    """Writes the JSON and the table, first merging in the variants another process of this tag has written."""
    if out_json.is_file():
        report["results"] = {**load_report(out_json)["results"], **report["results"]}
    write_text_atomic(out_json, json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_json.with_suffix(".md"), f"Top-1 on the {split} split ({max_test} images); **bold**: the "
                      f"highest mean of the four.\n\n{table(report['results'])}\n\n"
                      f"machines: {machines_line(report['results'])}\n")


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import training.evaluate as evaluate
    import training.pretrain as pretrain

    args = parse_args(argv)
    out_json = Path(args.out_dir) / f"{args.tag}.json"
    report = load_report(out_json) if out_json.is_file() else {"results": {}, "split": args.split}
    report.setdefault("split", "test")  # files from before --split were scored on test
    if report["split"] != args.split:
        raise SystemExit(f"{out_json} was scored on the {report['split']} split, not {args.split}: "
                         "use another --tag")
    for name, extra in args.chosen.items():
        if name in report["results"]:
            continue
        run = Path(args.work_dir) / args.tag / name
        shutil.rmtree(run, ignore_errors=True)
        argv_run = ["--output-dir", str(run), "--feature-images", "0", "--checkpoint-every", "0", *extra]
        argv_run += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        argv_run += ["--teacher", args.teacher] if args.teacher else []
        started = time.perf_counter()
        pretrain.main(argv_run)
        train_s = time.perf_counter() - started
        ev = evaluate.main(["--model", f"local-dir:{run / 'export'}", "--max-train", str(args.max_train),
                            "--max-test", str(args.max_test), "--split", args.split, "--out", str(run / "eval.json")])
        scores = {k: v["top1"] for k, v in ev["results"].items()}
        report["results"][name] = {"args": argv_run, "scores": scores, "train_seconds": train_s,
                                   "machine": describe_machine()}
        write_tables(report, out_json, args.split, args.max_test)
        print(table(report["results"]), flush=True)
    if report["results"]:
        write_tables(report, out_json, args.split, args.max_test)  # also re-renders a finished sweep's table
    return report


if __name__ == "__main__":
    main()
