"""Dense prediction on Fashion-MNIST scenes: DreamTeacher vs SimCLR vs BYOL vs random init, same pretraining budget.

    python benchmarks/experiments/dense_fmnist_scenes.py                          # 5 min per method, seeds 0,1
    python benchmarks/experiments/dense_fmnist_scenes.py --budget-minutes 0.3 --labels 20 --seeds 0 \
        --steps 20 --max-test 100 --tag quick                                      # a smoke run
    python benchmarks/experiments/dense_fmnist_scenes.py --resume                  # continue an interrupted run

Data: the scenes of training/make_scenes.py (written first when `--data-dir` does not exist): 64x64 canvases of 2-4
real garments, 11 classes (background + 10). Every method pretrains on the same 20,000 unlabelled scenes
(unlabelled/, train-split garments) at 64 px: the images the dense task is about, and where a 64-px student's
C4/C5 still have 4x4/2x2 grids to learn layout on (at 32 px they are 2x2/1x1). Every backbone is the recipe's
resnet18 (resnet18.dreamteacher_fmnist with data.input_size 64) from the same seeded init, normalised alike:

* random          no pretraining: the floor.
* simclr, byol    lightly's (benchmarks/experiments/ssl_baselines.py), 64-px views drawn by `--ssl-augment`
                  (default batched tensor ops; the committed budget5min / budget30min runs used lightly's PIL
                  transforms, `--ssl-augment lightly`, the only views then).
* dreamteacher    training/pretrain.py with the recipe's teacher (the 32-px Fashion-MNIST DDPM, run at 64 px: a
                  convolutional UNet, its garments at the scale it was trained on).
* dreamteacher-direct  the same with `regressor_top_down=False`: each student level regresses its own target
                  through a 3x3 conv, with no PPM or top-down path that lets a fine target be read off the coarse
                  levels (the candidate fix for the student's fine levels; chosen or not on validation).
* dreamteacher-mix  dreamteacher plus label distillation: a dense interpreter (train_interpreter.py --task masks)
                  trained on the seed-0 20-label subset (validated on the validation carve), its soft masks distilled
                  into a task head (the paper's mix-distillation). Its pretraining has seen those 20 labelled scenes.
* teacher         reference: the frozen teacher's stride-4 and stride-8 taps as the "backbone" of the frozen
                  protocol (the DDPM-seg way, with a linear pixel classifier).

Fair budget: each budgeted method (simclr, byol, dreamteacher, dreamteacher-mix) first runs a few calibration steps
of its own loop; its median seconds per step sets steps = floor(budget / seconds per step), then a full LR schedule
of that length runs from the fresh init (benchmarks/experiments/indomain_fmnist.py's method). The interpreter's
training time is reported beside dreamteacher-mix, not charged to it; the teacher's own training is not charged
to any DreamTeacher row (its cost: teachers/ddpm-fashion-mnist-32/README.md).

Evaluation: training/protocols/dense_evaluation.py for each method and seed: frozen (per-pixel linear on C2..C5)
and finetune (Semantic-FPN head, end to end) at each `--labels` count, the state chosen on the validation carve
(the last 500 train scenes), the 1,000 test scenes scored once per row. The seed draws the labelled subset and the
head's init; pretraining runs once per method (seed 0).

Output: `<out-dir>/<tag>.json` (every report, the pretraining facts, settings, machine) and `<tag>.md` (the table:
test mIoU per method, protocol and label count, mean of seeds and each value), rewritten after every entry;
`--resume` keeps finished entries. Mask pictures of the fewest-labels frozen and fine-tuned runs (seed 0) go to
`<out-dir>/<tag>_pictures/`. Pretrained weights and run folders go to `<work-dir>/<tag>/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository root on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.experiments.indomain_fmnist import (  # noqa: E402
    calibrate_dreamteacher,
    calibrate_ssl,
    fresh_backbone,
    pretrain_dreamteacher,
    pretrain_ssl,
    saved_backbone,
    steps_for_budget,
)
from benchmarks.experiments.ssl_baselines import AUGMENTS  # noqa: E402
from dreamteacher_models.recipes import DEFAULT_RECIPE, Recipe, apply_overrides, get_recipe  # noqa: E402
from training.labels.dense_masks import num_classes_of, split_folder  # noqa: E402
from training.protocols.dense_evaluation import (  # noqa: E402
    DenseEvalConfig,
    carve_validation,
    evaluate_segmentation,
    label_counts,
    labelled_subset,
)
from training.protocols.segmentation import PYRAMID_STRIDES, Pyramid  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

METHODS = ("random", "teacher", "dreamteacher", "dreamteacher-direct", "dreamteacher-mix", "simclr", "byol")
BUDGETED = ("dreamteacher", "dreamteacher-direct", "dreamteacher-mix", "simclr", "byol")
LABELS = {"random": "random init", "teacher": "teacher features (reference, frozen only)",
          "dreamteacher": "DreamTeacher",
          "dreamteacher-direct": "DreamTeacher, per-level regressor (regressor_top_down=False)",
          "dreamteacher-mix": "DreamTeacher mix-distilled (20-label interpreter)",
          "simclr": "SimCLR (lightly)", "byol": "BYOL (lightly)"}
DEFAULT_DATA = "datasets/fmnist_scenes_11"
DEFAULT_OUT_DIR = "benchmarks/results/dense_fmnist_scenes"
DEFAULT_WORK_DIR = "runs/bench_dense_fmnist_scenes"
SCENE_SIZE = 64
INTERPRETER_LABELS = 20
TEACHER_STRIDES = (4, 8)  # the teacher taps the DDPM-seg reference reads

logger = logging.getLogger("dreamteacher.bench.dense")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA, help=f"scenes folder (default {DEFAULT_DATA}; made if absent)")
    p.add_argument("--budget-minutes", type=float, default=5.0, help="pretraining wall clock per method (default 5)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1", help="evaluation seeds (default 0,1)")
    p.add_argument("--labels", type=label_counts, default=[20, 200, None], help="label counts (default 20,200,all)")
    p.add_argument("--steps", type=int, default=150, help="steps per segmentation run (default 150)")
    p.add_argument("--eval-every", type=int, default=50, help="validation every N steps (default 50)")
    p.add_argument("--val-images", type=int, default=300, help="validation carve (default 300 train scenes)")
    p.add_argument("--max-test", type=int, help="score the first N test scenes (default all)")
    p.add_argument("--interpreter-epochs", type=int, default=100, help="dense interpreter epochs (default 100)")
    p.add_argument("--calibration-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128, help="pretraining batch for every method (default 128)")
    p.add_argument("--ssl-augment", choices=AUGMENTS, default="tensor",
                   help="SimCLR/BYOL views: batched tensor ops (default) or lightly's per-image PIL transforms")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--tag", default="budget5min", help="name of the outputs (default budget5min)")
    p.add_argument("--resume", action="store_true", help="keep the finished entries of this tag")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; allowed: {', '.join(METHODS)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def scene_recipe() -> Recipe:
    return apply_overrides(get_recipe(DEFAULT_RECIPE), [f"data.input_size=(3,{SCENE_SIZE},{SCENE_SIZE})"])


def indomain_args(args, data_dir: str) -> argparse.Namespace:
    """The namespace indomain_fmnist's pretraining helpers read, pointed at the unlabelled scenes."""
    return argparse.Namespace(seed=0, calibration_steps=args.calibration_steps, num_workers=0,
                              ssl_augment=args.ssl_augment, ssl_settings={},
                              no_progress=args.no_progress, resume=args.resume, recipe=DEFAULT_RECIPE,
                              data_dir=data_dir,
                              pretrain_images=None, overrides=[f"data.input_size=(3,{SCENE_SIZE},{SCENE_SIZE})"])


class TeacherPyramid(nn.Module):
    """The frozen teacher's taps at `strides` (default its stride-4 and stride-8 ones) as a pyramid (finest first), one
    seeded noise stream."""

    def __init__(self, recipe: Recipe, seed: int = 0, strides: tuple[int, ...] = TEACHER_STRIDES):
        super().__init__()
        from training.teacher.build import build_teacher
        from training.teacher.sources import teacher_source

        self.teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std,
                                     source=teacher_source(recipe)).keep_strides(list(strides))
        self.channels = tuple(self.teacher.channels)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.teacher(images, generator=self.generator)
        return [maps[s] for s in self.teacher.strides]


def interpreter_folder(args, data_dir: Path, work: Path) -> Path:
    """A DDPM-seg folder whose real/train is seed 0's 20 labelled scenes and real/test the validation carve
    (links to the scenes), so the interpreter learns from the labels the 20-label rows use and never sees test."""
    folder = work / "interpreter_labels"
    train = split_folder(data_dir, "train")
    names = sorted(p.name for p in train.glob("*.png"))
    pool, val = carve_validation(len(names), args.val_images)
    chosen = labelled_subset(pool, INTERPRETER_LABELS, 0)
    for split, indices in (("train", sorted(chosen)), ("test", val)):
        target = folder / "real" / split
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for k, i in enumerate(indices):  # renamed in order so "the first N" is all of them
            for suffix in (".png", ".npy"):
                (target / f"{k:05d}{suffix}").symlink_to((train / names[i]).with_suffix(suffix).resolve())
    shutil.copy(data_dir / "card.json", folder / "card.json")
    return folder


def train_mix_interpreter(args, data_dir: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    from training import train_interpreter

    out = work / "interpreter"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train_interpreter.main(["--task", "masks", "--data-dir", str(interpreter_folder(args, data_dir, work)),
                            "--labels", str(INTERPRETER_LABELS), "--epochs", str(args.interpreter_epochs),
                            "--batch-size", "20", "--max-val", "100", "--threads", str(args.threads),
                            "--set", f"data.input_size=(3,{SCENE_SIZE},{SCENE_SIZE})", "--output-dir", str(out)])
    info = json.loads((out / "interpreter.json").read_text())
    return out, {"train_s": round(time.perf_counter() - t0, 1), "val_miou": info["validation"]["score"],
                 "labeled_images": info["labeled_images"], "epochs": info["epochs"]}


def pretrain_all(args, report: dict[str, Any], data_dir: Path, work: Path, save) -> dict[str, Path | None]:
    """Calibrate, then pretrain each budgeted method once; returns {method: weights or run folder}."""
    recipe = scene_recipe()
    unlabelled = str(data_dir / "unlabelled")
    ns = indomain_args(args, unlabelled)
    teacher = recipe.teacher.source
    wanted = [m for m in args.method_list if m in BUDGETED]
    pre = report.setdefault("pretraining", {})
    if "dreamteacher-mix" in wanted and "interpreter" not in report:
        path, info = train_mix_interpreter(args, data_dir, work)
        report["interpreter"] = {**info, "path": str(path)}
        save()
    extra_argv = {"dreamteacher": (), "dreamteacher-mix": ("--interpreter", str(work / "interpreter")),
                  "dreamteacher-direct": ("--set", "regressor_top_down=False")}
    calib = report.setdefault("calibration", {})
    unlabelled_count = json.loads((data_dir / "card.json").read_text())["scenes"]["unlabelled"]
    hf = None
    for method in wanted:
        if method in calib or method in pre:
            continue
        if method in ("simclr", "byol"):
            from training.run.data import load_image_dataset

            hf = hf or load_image_dataset(unlabelled, "train")
            calib[method] = calibrate_ssl(method, ns, recipe, hf, args.batch_size, "cpu")
        else:
            calib[method], _ = calibrate_dreamteacher(ns, args.batch_size, teacher, args.threads, work,
                                                      extra_argv[method])
        save()
    budget_s = 60 * args.budget_minutes
    for method in wanted:
        if method in pre:
            continue
        steps = steps_for_budget(calib[method], budget_s)
        if method in ("simclr", "byol"):
            from training.run.data import load_image_dataset

            hf = hf or load_image_dataset(unlabelled, "train")
            _, info = pretrain_ssl(method, 0, steps, ns, recipe, hf, args.batch_size, "cpu", work / method)
        else:
            _, info = pretrain_dreamteacher(0, steps, ns, recipe, args.batch_size, teacher, args.threads,
                                            work / method, unlabelled_count, extra_argv[method])
        pre[method] = {**info, "seconds_per_step_calibrated": round(calib[method], 4)}
        save()
    return pre


UNTRAINED = ("random", "teacher")  # methods with no pretraining run of their own


def load_dense_report(out_dir: Path, tag: str, methods: list[str]) -> dict[str, Any]:
    """The report of an earlier run `tag` (for the scripts that rescore its backbones); refuses one that lacks a
    pretrained backbone for any of `methods`."""
    path = Path(out_dir) / f"{tag}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run dense_fmnist_scenes.py --tag {tag} first")
    report = json.loads(path.read_text())
    missing = [m for m in methods if m not in UNTRAINED and m not in report.get("pretraining", {})]
    if missing:
        raise ValueError(f"{path} has no pretrained backbone for {missing}; it has "
                         f"{sorted(report.get('pretraining', {}))} (plus {', '.join(UNTRAINED)})")
    return report


def pretrained_backbone(method: str, report: dict[str, Any], recipe: Recipe) -> nn.Module:
    """The seeded resnet18 init, with `method`'s pretrained weights from `report` unless method is "random"."""
    if method == "random":
        return fresh_backbone(recipe, 0)
    info = report["pretraining"][method]
    return saved_backbone(Path(info["weights"]) if "weights" in info else Path(info["run_dir"]) / "export", recipe)


def pyramid_maker(method: str, report: dict[str, Any], recipe: Recipe,
                  strides: tuple[int, ...] = PYRAMID_STRIDES):
    """A factory of fresh pyramids of `method` (each evaluation run fine-tunes its own copy) at `strides`."""
    def make() -> nn.Module:
        if method == "teacher":
            return TeacherPyramid(recipe, strides=strides)
        return Pyramid(pretrained_backbone(method, report, recipe), recipe.arch, strides=strides)

    return make


def format_table(report: dict[str, Any]) -> str:
    """Test mIoU per method (rows) and protocol x label count (columns): mean of seeds (each value)."""
    entries = report["entries"]
    columns = []
    for entry in entries.values():
        for mode, rows in entry["results"].items():
            for key in rows:
                if (mode, key) not in columns:
                    columns.append((mode, key))
    header = "| method | " + " | ".join(f"{m} {k} labels" for m, k in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for method in METHODS:
        seeds = sorted((k for k in entries if k.split(":")[0] == method), key=lambda k: int(k.split(":")[1]))
        if not seeds:
            continue
        cells = []
        for mode, key in columns:
            values = [entries[s]["results"].get(mode, {}).get(key, {}).get("miou") for s in seeds]
            values = [v for v in values if v is not None]
            cells.append("-" if not values else f"{statistics.mean(values):.1f} ("
                         + ", ".join(f"{v:.1f}" for v in values) + ")")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    pre = report.get("pretraining", {})
    cost = ["| method | calibrated s/step | steps | images | median s/step in the run | images/s (median step) |",
            "|---|---|---|---|---|---|"]
    for method, info in pre.items():  # medians: a busy or paused host stretches the loop's wall time, not a step's
        cost.append(f"| {LABELS[method]} | {info['seconds_per_step_calibrated']} | {info['steps']} | "
                    f"{info['images']} | {info['median_step_s']} | "
                    f"{info['batch_size'] / info['median_step_s']:.1f} |")
    interp = report.get("interpreter")
    lines = [f"# Dense prediction on Fashion-MNIST scenes ({report['settings']['budget_minutes']} min per method)",
             "", f"Machine: {report['machine']}", "",
             f"Test mIoU (%), mean of evaluation seeds (each seed's value); {report.get('num_classes', 11)} classes, "
             f"{report.get('test_images', '?')} test scenes.", "",
             format_table(report), "", "Pretraining (seed 0; steps = budget / calibrated seconds per step):", "",
             "\n".join(cost)]
    if interp:
        lines += ["", f"Mix-distillation's interpreter: {interp['labeled_images']} labelled scenes, "
                      f"{interp['epochs']} epochs, {interp['train_s']} s, validation mIoU {interp['val_miou']:.2f} "
                      "(not charged to the budget)."]
    lines += ["", f"Settings: `{json.dumps(report['settings'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    if not (data_dir / "card.json").is_file():
        from training import make_scenes

        make_scenes.main(["--out", str(data_dir)])
    out_dir, work = Path(args.out_dir), Path(args.work_dir) / args.tag
    work.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.tag}.json"
    settings = {"budget_minutes": args.budget_minutes, "labels": [c or "all" for c in args.labels],
                "steps": args.steps, "eval_every": args.eval_every, "val_images": args.val_images,
                "max_test": args.max_test, "batch_size": args.batch_size, "threads": args.threads,
                "image_size": SCENE_SIZE, "data": str(data_dir), "ssl_augment": args.ssl_augment}
    report: dict[str, Any] = {"settings": settings, "entries": {}}
    if args.resume and json_path.is_file():
        report = json.loads(json_path.read_text())
        report["settings"].setdefault("ssl_augment", "lightly")  # the only views before the option existed
        if report["settings"] != settings:
            raise SystemExit(f"--resume: {json_path} was made with other settings: {report['settings']}")
    report["machine"] = describe_machine()

    def save() -> None:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
        write_text_atomic(out_dir / f"{args.tag}.md", render(report))

    pretrain_all(args, report, data_dir, work, save)
    recipe = scene_recipe()
    base = DenseEvalConfig(data_dir=str(data_dir), num_classes=num_classes_of(data_dir, None), labels=args.labels,
                           val_images=args.val_images, max_test=args.max_test, progress=not args.no_progress)
    common = {"steps": args.steps, "eval_every": args.eval_every}
    for seed in args.seed_list:
        for method in args.method_list:
            key = f"{method}:{seed}"
            if key in report["entries"]:
                continue
            pictures = str(out_dir / f"{args.tag}_pictures" / method) if seed == args.seed_list[0] else None
            config = replace(base, seed=seed, pictures=pictures,
                             protocols=("frozen",) if method == "teacher" else ("frozen", "finetune"),
                             frozen=replace(base.frozen, **common), finetune=replace(base.finetune, **common))
            logger.info("evaluating %s", key)
            entry = evaluate_segmentation(pyramid_maker(method, report, recipe), recipe, config,
                                          model_name=LABELS[method])
            report["entries"][key] = entry
            report["num_classes"] = entry["settings"]["num_classes"]
            report["test_images"] = entry["settings"]["test_images"]
            save()
            print(format_table(report), flush=True)
    return report


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
