"""In-domain Fashion-MNIST: DreamTeacher vs SimCLR vs BYOL vs random init, at the same wall-clock pretraining budget.

    python benchmarks/experiments/indomain_fmnist.py                       # 6 min per method, full evaluation
    python benchmarks/experiments/indomain_fmnist.py --budget-minutes 0.5 --max-train 2000 --max-test 1000 --tag quick
    python benchmarks/experiments/indomain_fmnist.py --methods dreamteacher --set teacher.timestep=250 --tag t250
    python benchmarks/experiments/indomain_fmnist.py --budget-minutes 30 --tag b30_full --resume \
        --methods dreamteacher:0,simclr:0,byol:0,random,pixels,dreamteacher-recipe,dreamteacher:1,simclr:1
    # one budget timed on a quiet machine, then each method's seeds pinned to a core, then one table
    python benchmarks/experiments/indomain_fmnist.py --budget-minutes 30 --calibration-rounds 5 --calibrate-only \
        --methods dreamteacher,simclr,byol --tag b30_budget
    taskset -c 0 python benchmarks/experiments/indomain_fmnist.py --budget-minutes 30 --threads 1 \
        --steps-from b30_budget --methods dreamteacher:0,dreamteacher:1,dreamteacher:2 --tag b30_dt --resume
    python benchmarks/experiments/indomain_fmnist.py --combine b30_dt,b30_ssl --tag b30_three_seeds

Every backbone is timm `resnet18` (num_classes=0), trained and evaluated on the same 32x32 RGB Fashion-MNIST train
split with the recipe's normalisation (resnet18.dreamteacher_fmnist; `--set` overrides apply to the whole comparison:
the DreamTeacher run, the teacher reference and the data). Every backbone starts from the recipe's init (its
`zero_init_last`, False for the Fashion-MNIST recipe, so random init is a random-feature floor, not a near-identity):

* random      no pretraining (seeded init): the floor.
* pixels      no network: the normalised 3x32x32 pixels, flattened (linear probe and kNN only): a reference.
* simclr      lightly's SimCLR (benchmarks/experiments/ssl_baselines.py: heads, NTXentLoss, SimCLRTransform at
              32 px, SGD).
* byol        lightly's BYOL (same file: heads, momentum encoder with a cosine momentum schedule, BYOLTransform).
* dreamteacher  training/pretrain.py with the recipe and its teacher (`--teacher`, default the recipe's source).
* dreamteacher-cached  the same reading its targets from the opt-in teacher-feature cache (`--feature-cache`, K=2
              encodings per image and orientation, built once per seed under the work dir); the cache's build time
              is charged to its budget, so it is the cache against online encoding at equal wall time.
* dreamteacher-recipe  the same at the recipe's own length (the main job's budget), not the benchmark's budget.
* teacher     reference, not a backbone: the frozen teacher's features at the recipe's timestep, each tap globally
              average-pooled and concatenated, then the same linear probe and kNN (no fine-tune: it is frozen).

`--methods` lists entries `method[:seed]` (seed defaults to `--seed`), run in the order given, so the most wanted
come first; a method given with several seeds also gets a mean row. The seed sets the init, the data order and
the fine-tuning heads.

Fair budget, by wall clock: before any training, each budgeted method (simclr, byol, dreamteacher) runs
`--calibration-steps` steps (its own loop, its data loading included) to measure its median seconds per step (the
first step, with start-up, is left out); each of its entries then gets steps = floor(budget / seconds-per-step)
(dreamteacher-cached: floor((budget - cache build time) / seconds-per-step), the build time being the wall-time
difference between a calibration run that builds the cache and one that reuses it)
and runs a complete LR schedule of that length from a fresh init. Calibrating all methods up front, one after the
other (`--calibration-rounds R`: R times, taking turns, each method sized by its median round), keeps them measured
under the same load; the training itself then does a fixed number of steps, so a busy host changes its wall time,
not its result. `--calibrate-only` stops after timing: a budget measured once on a quiet machine then sizes later
runs (`--steps-from`), which may use other threads, e.g. one process pinned to each core, or another budget (the
timed seconds per step scaled to it, e.g. a baseline given four times the 30 minutes). The table reports the
steps, the loop time and source images/s (SimCLR/BYOL draw 2 augmented views per image; DreamTeacher's step
includes the teacher's forward) and, for DreamTeacher, the teacher's own training cost (from the teacher folder's
README). All methods use the same batch (`--batch-size`, default the recipe's) and the same DataLoader workers, and
every core (`--threads`, default all).

Evaluation: training/evaluate.py's `evaluate` with all protocols (linear probe, kNN k=20, fine-tune with 1% and 10%
of the labels) on Fashion-MNIST train -> t10k; `--max-train/--max-test` subsample both (seeded) for quick runs.

Output: one markdown table and a machine line on stdout, and `<out-dir>/<tag>.md` + `<out-dir>/<tag>.json` (raw
numbers, settings, calibration and the full evaluation reports), rewritten after every entry so an interrupted run
keeps what it finished; `--resume` continues such a run: finished entries and the calibration are kept, the rest
runs (the settings must match). Trained backbones and DreamTeacher run folders go to `<work-dir>/<tag>/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository root, not benchmarks/experiments/, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import matmul_gflops  # noqa: E402
from benchmarks.experiments.ssl_baselines import AUGMENTS, SETTINGS, SSL_METHODS, ssl_settings  # noqa: E402
from dreamteacher_models.recipes import DEFAULT_RECIPE, Recipe, apply_overrides, get_recipe  # noqa: E402
from training.protocols.splits import SPLITS  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402
from training.teacher.ddpm import training_cost  # noqa: E402

REPO = Path(__file__).resolve().parents[2]  # benchmarks/<kind>/ -> the repository root
METHODS = ("random", "pixels", "simclr", "byol", "dreamteacher", "dreamteacher-cached", "dreamteacher-recipe",
           "teacher")
BUDGETED = ("simclr", "byol", "dreamteacher", "dreamteacher-cached")  # sized by the calibrated budget
PRETRAINED = (*BUDGETED, "dreamteacher-recipe")
FROZEN_REFERENCES = ("pixels", "teacher")  # linear probe and kNN only
LABELS = {"random": "random init", "pixels": "raw pixels (reference)", "simclr": "SimCLR (lightly)",
          "byol": "BYOL (lightly)", "dreamteacher": "DreamTeacher",
          "dreamteacher-cached": "DreamTeacher, teacher-feature cache (its build inside the budget)",
          "dreamteacher-recipe": "DreamTeacher at the recipe's length (main job)",
          "teacher": "teacher features (reference)"}
DT_CHECKPOINT_EVERY = 100  # steps between a DreamTeacher entry's checkpoints (about 2-4 minutes on a CPU)
# settings a --resume must share with the run it continues
RESUME_SETTINGS = ("budget_minutes", "batch_size", "num_workers", "calibration_steps", "recipe", "overrides",
                   "teacher", "timestep", "data", "pretrain_images", "max_train", "max_test", "split", "ft_epochs",
                   "threads", "steps_from", "ssl_augment", "ssl_overrides")
DEFAULT_OUT_DIR = "benchmarks/results/indomain_fmnist"
DEFAULT_WORK_DIR = "runs/bench_indomain_fmnist"

logger = logging.getLogger("dreamteacher.bench.indomain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=6.0,
                   help="wall-clock pretraining budget per method, in minutes (default 6)")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "dreamteacher-recipe"),
                   help=f"comma-separated entries method[:seed], run in this order; methods: {','.join(METHODS)} "
                        "(default: all but dreamteacher-recipe, seed --seed)")
    p.add_argument("--teacher", help="DreamTeacher teacher folder (default: the recipe's teacher.source)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="recipe override, repeatable (e.g. --set teacher.timestep=250); passed to the DreamTeacher "
                        "run and used for the teacher reference and the data")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe (default {DEFAULT_RECIPE})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of entries given without one, and of calibration and evaluation subsets (default 0)")
    p.add_argument("--threads", type=int, help="torch threads for every method (default: every core)")
    p.add_argument("--tag", help="name of this run's outputs (default: budget<M>min_seed<S>[_<overrides>])")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of this tag: keep its finished entries and calibration, and continue "
                        "an entry killed midway from its last checkpoint")
    p.add_argument("--steps-from", metavar="TAG",
                   help="take the budgeted methods' step counts from the earlier run TAG (in --out-dir) instead of "
                        "timing them, to compare a changed teacher or recipe at the same steps, or to run at other "
                        "threads (pinned to a core) the budget TAG measured; with another --budget-minutes, its "
                        "timed seconds per step scaled to this budget")
    p.add_argument("--combine", metavar="TAG,TAG,...",
                   help="train nothing: write --tag as the entries of these earlier runs (same budget, data and "
                        "evaluation), with mean rows across them")
    p.add_argument("--calibrate-only", action="store_true",
                   help="time the budgeted methods of --methods, write the step counts to <tag>.json and stop: a "
                        "budget measured once on a quiet machine, for later runs' --steps-from")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"table + JSON folder (default {DEFAULT_OUT_DIR})")
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                   help=f"trained backbones and the DreamTeacher runs (default {DEFAULT_WORK_DIR})")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the recipe's, i.e. the Debian folder)")
    d.add_argument("--pretrain-images", type=int, help="pretrain on the first N train images only (default: all)")
    d.add_argument("--max-train", type=int, help="evaluate with a seeded random N of the train images")
    d.add_argument("--max-test", type=int, help="evaluate on a seeded random N of the test images")
    t = p.add_argument_group("pretraining")
    t.add_argument("--batch-size", type=int, help="batch for every method (default: the recipe's optim.batch_size)")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for every method (default 0)")
    t.add_argument("--ssl-augment", choices=AUGMENTS, default="tensor",
                   help="SimCLR/BYOL views: batched tensor ops (default) or lightly's per-image PIL transforms")
    t.add_argument("--ssl-set", dest="ssl_overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a SimCLR/BYOL setting, repeatable (e.g. --ssl-set simclr.temperature=0.2 --ssl-set "
                        f"byol.lr_scale=2); settings: {SETTINGS}")
    t.add_argument("--calibration-steps", type=int, default=6,
                   help="steps timed per method to size its schedule (default 6; the first is not counted)")
    t.add_argument("--calibration-rounds", type=int, default=1,
                   help="time the methods this many times, taking turns, and size each by its median round "
                        "(default 1; use 3-5 on a noisy shared host)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--split", choices=SPLITS, default="test",
                   help="score on test (default: this table reports) or on the validation carve of train: use "
                        "validation whenever the numbers choose something (a teacher, a baseline's settings)")
    e.add_argument("--ft-epochs", help="fine-tune epochs, one value or one per fraction (default: evaluate.py's)")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.entries = parse_entries(args.methods, args.seed)
    except ValueError as err:
        p.error(str(err))
    if args.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    if args.calibration_steps < 2:
        p.error("--calibration-steps must be >= 2 (the first step is not counted)")
    if args.combine is not None:
        args.combine = [t.strip() for t in args.combine.split(",") if t.strip()]
        if not args.combine or not args.tag or args.tag in args.combine:
            p.error("--combine needs one or more earlier tags and a new --tag for the combined table")
    if args.calibrate_only and not {m for m, _ in args.entries} & set(BUDGETED):
        p.error(f"--calibrate-only: --methods names no budgeted method ({', '.join(BUDGETED)})")
    if args.calibration_rounds < 1:
        p.error(f"--calibration-rounds must be >= 1, got {args.calibration_rounds}")
    try:
        args.ssl_settings = parse_ssl_overrides(args.ssl_overrides)
    except ValueError as err:
        p.error(str(err))
    if args.ft_epochs:
        try:
            args.ft_epochs = [int(v) for v in args.ft_epochs.split(",") if v.strip()]
        except ValueError:
            p.error(f"--ft-epochs: expected comma-separated integers, got {args.ft_epochs!r}")
    return args


def parse_entries(text: str, default_seed: int) -> list[tuple[str, int]]:
    """'dreamteacher:0,simclr,random' -> [(method, seed), ...] in the given order, duplicates dropped."""
    entries: list[tuple[str, int]] = []
    for item in (i.strip().lower() for i in text.split(",") if i.strip()):
        method, _, seed = item.partition(":")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in --methods; choose from {','.join(METHODS)}")
        try:
            entry = (method, int(seed) if seed else default_seed)
        except ValueError:
            raise ValueError(f"bad seed {seed!r} in --methods entry {item!r}; expected method:INTEGER") from None
        if entry not in entries:
            entries.append(entry)
    if not entries:
        raise ValueError(f"--methods is empty; choose from {','.join(METHODS)}")
    return entries


def parse_ssl_overrides(items: list[str]) -> dict[str, dict[str, float]]:
    """['simclr.temperature=0.2', ...] -> {"simclr": {"temperature": 0.2}}, each checked against the method's
    settings (benchmarks/experiments/ssl_baselines.py SETTINGS)."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        method, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--ssl-set takes METHOD.KEY=VALUE (e.g. simclr.temperature=0.2), got {item!r}")
        try:
            out.setdefault(method, {})[key] = float(value)
        except ValueError:
            raise ValueError(f"--ssl-set {item!r}: {value!r} is not a number") from None
        ssl_settings(method, out[method])
    return out


def entry_key(method: str, seed: int) -> str:
    return f"{method}/seed{seed}"


def default_tag(args: argparse.Namespace) -> str:
    tag = f"budget{args.budget_minutes:g}min_seed{args.seed}"
    if args.overrides:
        tag += "_" + "_".join(args.overrides)
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", tag)


def resolve_teacher_source(args: argparse.Namespace, recipe: Recipe) -> str:
    source = args.teacher or recipe.teacher.source
    if not Path(source).expanduser().exists() and (REPO / source).exists():
        source = str(REPO / source)  # the recipe's relative path, run from outside the repo
    return source


# ---------------------------------------------------------------------------------------------------------------
# Pretraining


def fresh_backbone(recipe: Recipe, seed: int) -> nn.Module:
    """The recipe's student at its init, drawn with `seed`: every method of the comparison starts from it."""
    from training.run.backbones import build_backbone

    torch.manual_seed(seed)
    return build_backbone(recipe)


def saved_backbone(weights: Path, recipe: Recipe) -> nn.Module:
    """A backbone these benchmarks saved: a training/pretrain.py export folder, or a .safetensors state dict of the
    recipe's backbone (SimCLR/BYOL's backbone.safetensors) put into the seeded init."""
    if weights.is_dir():
        from training.run.backbones import load_backbone

        return load_backbone(None, checkpoint=weights, recipe=recipe)
    import safetensors.torch

    backbone = fresh_backbone(recipe, 0)
    backbone.load_state_dict(safetensors.torch.load_file(str(weights)))
    return backbone


class RawPixels(nn.Module):
    """The normalised image itself, flattened: the no-learning reference for the frozen-feature protocols."""

    def __init__(self, input_size: tuple[int, int, int]):
        super().__init__()
        self.num_features = math.prod(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def load_pretrain_images(args: argparse.Namespace, recipe: Recipe):
    from training.run.data import load_image_dataset

    hf = load_image_dataset(args.data_dir, split="train", recipe_data=recipe.data)
    if args.pretrain_images:
        hf = hf.select(range(min(args.pretrain_images, len(hf))))
    return hf


def steps_for_budget(seconds_per_step: float, budget_s: float) -> int:
    return max(1, math.floor(budget_s / seconds_per_step))


def _ssl_kwargs(method: str, args, recipe: Recipe, batch_size: int, device: str, seed: int) -> dict[str, Any]:
    return dict(batch_size=batch_size, input_size=recipe.data.input_size[-1], mean=recipe.data.mean,
                std=recipe.data.std, seed=seed, num_workers=args.num_workers, augment=args.ssl_augment,
                overrides=args.ssl_settings.get(method), device=device, progress=not args.no_progress)


def calibrate_ssl(method: str, args, recipe: Recipe, hf_train, batch_size: int, device: str) -> float:
    """Median seconds per step of `method`'s own loop, the first (start-up) step left out."""
    from benchmarks.experiments.ssl_baselines import train_ssl

    calib = train_ssl(method, fresh_backbone(recipe, args.seed), hf_train, steps=args.calibration_steps,
                      desc=f"{method} calibration", **_ssl_kwargs(method, args, recipe, batch_size, device, args.seed))
    return statistics.median(calib["step_s"][1:])


def ssl_state_file(folder: Path) -> Path:
    """A SimCLR/BYOL entry's training state: kept until the entry is recorded, so a resume never retrains it."""
    return folder / "training_state.pt"


def pretrain_ssl(method: str, seed: int, steps: int, args, recipe: Recipe, hf_train, batch_size: int, device: str,
                 folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    import safetensors.torch

    from benchmarks.experiments.ssl_baselines import train_ssl

    backbone = fresh_backbone(recipe, seed)
    folder.mkdir(parents=True, exist_ok=True)
    # checkpointed (tensor views resume exactly): under --resume an entry killed in training or evaluation continues
    checkpoint = ssl_state_file(folder) if args.ssl_augment == "tensor" else None
    if checkpoint is not None and not args.resume:
        checkpoint.unlink(missing_ok=True)  # a fresh run
    t0 = time.perf_counter()
    out = train_ssl(method, backbone, hf_train, steps=steps, desc=f"{method} seed {seed}", checkpoint=checkpoint,
                    **_ssl_kwargs(method, args, recipe, batch_size, device, seed))
    wall_s = time.perf_counter() - t0
    safetensors.torch.save_file({k: v.contiguous() for k, v in backbone.state_dict().items()},
                                str(folder / "backbone.safetensors"))
    info = {"steps": steps, "batch_size": batch_size, "images": out["images"], "views": out["views"],
            "epochs": round(out["epochs"], 3), "train_s": round(out["train_s"], 2), "wall_s": round(wall_s, 2),
            "images_per_s": round(out["images"] / out["train_s"], 2), "final_loss": out["final_loss"],
            "optimizer": f"SGD lr {out['lr']:g} (0.06 x batch/128 x lr_scale) momentum 0.9 wd 5e-4, "
                         "10% warm-up + cosine", "settings": out["settings"],
            "median_step_s": round(statistics.median(out["step_s"]), 4), "augment": out["augment"],
            "weights": str(folder / "backbone.safetensors")}
    return backbone, info


def _dreamteacher_argv(args, seed: int, batch_size: int, output_dir: Path, steps: int | None, teacher: str,
                       threads: int, checkpoint_every: int = 0) -> list[str]:
    argv = ["--recipe", args.recipe, "--output-dir", str(output_dir), "--batch-size", str(batch_size),
            "--num-workers", str(args.num_workers), "--seed", str(seed), "--threads", str(threads),
            "--checkpoint-every", str(checkpoint_every), "--log-every", "1", "--teacher", teacher]
    if steps is not None:
        argv += ["--max-steps", str(steps)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.pretrain_images:
        argv += ["--limit-images", str(args.pretrain_images)]
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, one per step (on resume the trainer cuts the file back to its checkpoint's step)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _step_seconds(run_dir: Path, batch_size: int) -> list[float]:
    """Each optimizer step's wall time, from the run's metrics.jsonl written with --log-every 1."""
    return [batch_size / row["images_per_s"] for row in _metrics(run_dir)]


def calibrate_dreamteacher(args, batch_size: int, teacher: str, threads: int, work: Path,
                           extra_argv: tuple[str, ...] = ()) -> tuple[float, float]:
    """(median seconds per step, wall seconds of the whole calibration run)."""
    from training import pretrain

    calib_dir = work / "dreamteacher_calibration"
    shutil.rmtree(calib_dir, ignore_errors=True)
    t0 = time.perf_counter()
    pretrain.main(_dreamteacher_argv(args, args.seed, batch_size, calib_dir, args.calibration_steps, teacher,
                                     threads) + ["--no-export", "--feature-images", "0", *extra_argv])
    wall_s = time.perf_counter() - t0
    sec_per_step = statistics.median(_step_seconds(calib_dir, batch_size)[1:])
    shutil.rmtree(calib_dir, ignore_errors=True)
    return sec_per_step, wall_s


def calibrate_method(method: str, args, recipe: Recipe, hf_train, batch_size: int, device: str, teacher: str,
                     threads: int, work: Path) -> tuple[float, float]:
    """(median seconds per step, seconds of cache build charged to the budget) of one calibration of `method`."""
    if method == "dreamteacher":
        return calibrate_dreamteacher(args, batch_size, teacher, threads, work)[0], 0.0
    if method == "dreamteacher-cached":
        return calibrate_dreamteacher_cached(args, batch_size, teacher, threads, work)
    return calibrate_ssl(method, args, recipe, hf_train, batch_size, device), 0.0


def feature_cache_dir(work: Path, seed: int) -> Path:
    """dreamteacher-cached's cache: one per seed (the seed keys the cached encodings' noise)."""
    return work / f"feature_cache_seed{seed}"


def calibrate_dreamteacher_cached(args, batch_size: int, teacher: str, threads: int, work: Path
                                  ) -> tuple[float, float]:
    """(seconds per step reading the cache, seconds to build the cache). The build time is the wall-time difference
    between a calibration run that builds the cache and the same run reusing it; the cache is kept for the entries."""
    cache = feature_cache_dir(work, args.seed)
    shutil.rmtree(cache, ignore_errors=True)
    cached = ("--feature-cache", str(cache))
    _, build_and_steps_s = calibrate_dreamteacher(args, batch_size, teacher, threads, work, cached)
    sec_per_step, steps_s = calibrate_dreamteacher(args, batch_size, teacher, threads, work, cached)
    return sec_per_step, max(0.0, build_and_steps_s - steps_s)


def pretrain_dreamteacher(seed: int, steps: int | None, args, recipe: Recipe, batch_size: int, teacher: str,
                          threads: int, run_dir: Path, num_images: int, extra_argv: tuple[str, ...] = ()
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """training/pretrain.py for `steps` steps (None: the recipe's own length), checkpointed: under --resume a run
    killed midway continues from its last checkpoint; otherwise (or without one) the folder starts afresh."""
    from training import pretrain
    from training.run.backbones import load_backbone
    from training.run.layout import checkpoint_dirs

    if not (args.resume and checkpoint_dirs(run_dir)):
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (metrics.jsonl is appended to)
    t0 = time.perf_counter()
    pretrain.main(_dreamteacher_argv(args, seed, batch_size, run_dir, steps, teacher, threads, DT_CHECKPOINT_EVERY)
                  + ["--feature-images", "4", "--resume", "latest", *extra_argv])
    wall_s = time.perf_counter() - t0
    step_s = _step_seconds(run_dir, batch_size)
    train_s = sum(step_s)
    backbone = load_backbone(None, checkpoint=run_dir / "export", recipe=recipe)
    info = {"steps": len(step_s), "batch_size": batch_size, "images": len(step_s) * batch_size,
            "epochs": round(len(step_s) * batch_size / num_images, 3),
            "train_s": round(train_s, 2), "wall_s": round(wall_s, 2),
            "images_per_s": round(len(step_s) * batch_size / train_s, 2),
            "final_loss": _metrics(run_dir)[-1]["loss/loss"],
            "optimizer": f"{recipe.optim.optimizer} lr {recipe.optim.lr:g} wd {recipe.optim.weight_decay:g} "
                         f"betas {tuple(recipe.optim.betas)}, warm-up + cosine (the recipe)",
            "median_step_s": round(statistics.median(step_s), 4),
            "teacher": teacher, "teacher_training": training_cost(teacher),
            "timestep": recipe.teacher.timestep, "run_dir": str(run_dir)}
    return backbone, info


# ---------------------------------------------------------------------------------------------------------------
# The teacher's own features (reference)


class PooledTeacherFeatures(nn.Module):
    """Images -> the frozen teacher's taps, each globally average-pooled, concatenated (B, sum of tap channels).

    The stochastic encoding draws its noise from one generator seeded once, so the features are reproducible."""

    def __init__(self, teacher, seed: int = 0):
        super().__init__()
        self.teacher, self.seed, self._generator = teacher, seed, None
        self.num_features = int(sum(teacher.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher.device != x.device:
            self.teacher.to(x.device)
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        feats = self.teacher(x, generator=self._generator)
        return torch.cat([feats[s].float().mean(dim=(2, 3)) for s in self.teacher.strides], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def protocol_keys(k: int = 20) -> tuple[str, ...]:
    from training.protocols.evaluation import DEFAULT_FRACTIONS, fraction_key

    return ("linear probe", f"kNN k={k}", *(fraction_key(f) for f in DEFAULT_FRACTIONS))


def _scores(entry: dict[str, Any]) -> dict[str, float]:
    return {k: v["top1"] for k, v in (entry.get("evaluation") or {}).get("results", {}).items()}


def _cost_cells(method: str, pre: dict[str, Any]) -> list[str]:
    """pretraining loop time, teacher training, steps, images/s."""
    if method in PRETRAINED:
        loop = f"{pre['train_s']:.0f} s" if "train_s" in pre else "—"
        if "cache_build_s" in pre:
            loop += f" + {pre['cache_build_s']:.0f} s cache build"
        return [loop, pre.get("teacher_training") or "—",
                str(pre.get("steps", "—")), _fmt(pre.get("images_per_s"), ".0f")]
    if method == "teacher":
        return ["—", pre.get("teacher_training") or "—", "—", "—"]
    if method == "pixels":
        return ["—", "—", "—", "—"]
    return ["0 s", "—", "0", "—"]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per entry, in the order run, then a mean row (both values in brackets) per method with 2+ seeds."""
    keys = protocol_keys()
    lines = ["| method | seed | pretraining loop | teacher training | steps | images/s | linear top-1 | kNN top-1 | "
             "fine-tune 1% | fine-tune 10% |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_method: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for entry in results.values():
        method, seed = entry["method"], entry["seed"]
        by_method.setdefault(method, []).append((seed, entry))
        scores = _scores(entry)
        lines.append(f"| {LABELS[method]} | {seed} | " + " | ".join(_cost_cells(method, entry.get("pretrain") or {}))
                     + " | " + " | ".join(_fmt(scores.get(k)) for k in keys) + " |")
    for method, runs in by_method.items():
        if len(runs) < 2:
            continue
        cells = []
        for k in keys:
            values = [_scores(e)[k] for _, e in runs if k in _scores(e)]
            cells.append(f"**{statistics.mean(values):.2f}** ({', '.join(f'{v:.2f}' for v in values)})"
                         if values else "—")
        seeds = ",".join(str(s) for s, _ in runs)
        lines.append(f"| {LABELS[method]}, mean | {seeds} | | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_table(results: dict[str, dict[str, Any]]) -> str:
    """DreamTeacher's mean against the best baseline's mean (SimCLR or BYOL) per protocol, where DreamTeacher has 2+
    seeds: ahead or behind only by more than the spread (the larger of the two methods' seed ranges), else a tie; no
    verdict where the best baseline has a single seed (its spread is unknown)."""
    seeds: dict[str, dict[str, list[float]]] = {}
    for entry in results.values():
        for k, v in _scores(entry).items():
            seeds.setdefault(entry["method"], {}).setdefault(k, []).append(v)
    ours = seeds.get("dreamteacher", {})
    lines = []
    for k in protocol_keys():
        rivals = [(statistics.mean(seeds[m][k]), m) for m in SSL_METHODS if seeds.get(m, {}).get(k)]
        if len(ours.get(k, [])) < 2 or not rivals:
            continue
        best, rival = max(rivals)
        lead = round(statistics.mean(ours[k]) - best, 2)
        spread = round(max(max(v) - min(v) for v in (ours[k], seeds[rival][k])), 2)
        n = len(seeds[rival][k])
        if n < 2:
            verdict = "no verdict: one seed"
        else:
            verdict = "**tie**" if abs(lead) <= spread else ("**ahead**" if lead > 0 else "**behind**")
        lines.append(f"| {k} | {statistics.mean(ours[k]):.2f} | {LABELS[rival]} {best:.2f} ({n} seed{'s' * (n > 1)}) "
                     f"| {lead:+.2f} | {spread:.2f} | {verdict} |")
    if not lines:
        return ""
    return "\n".join(["| protocol | DreamTeacher, mean | best baseline, mean | lead | spread (larger seed range) | "
                      "DreamTeacher is |", "|---|---|---|---|---|---|", *lines])


def settings_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    ev = s.get("evaluation", {})
    calib = ", ".join(f"{m} {c['steps']} steps taken from {c['steps_from']} (its {c['seconds_per_step']:.3f} s/step"
                      + (f" at {c['threads']} threads" if "threads" in c else "")
                      + (f", timed for a {c['timed_for_budget_minutes']:g}-min budget)"
                         if "timed_for_budget_minutes" in c else ")")
                      if c.get("steps_from") else f"{m} {c['seconds_per_step']:.3f} s/step -> {c['steps']} steps"
                      for m, c in report.get("calibration", {}).items())
    return (f"budget {s['budget_minutes']:g} min per method ({calib or 'no budgeted method'}), batch "
            f"{s['batch_size']}, {s['num_workers']} workers, {s.get('ssl_augment', 'lightly')} SSL views, "
            f"{s['threads']} threads, recipe {s['recipe']} "
            f"(teacher {s['teacher']}, t={s['timestep']}"
            + (f", overrides {' '.join(s['overrides'])}" if s["overrides"] else "") + ")"
            + (f", SSL settings {s['ssl_overrides']}" if s.get("ssl_overrides") else "") + "; evaluation on "
            f"{ev.get('train_images', '?')} train / {ev.get('test_images', '?')} {s.get('split', 'test')} images")


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    probes = ", ".join(f"{g:.0f}" for g in m["matmul_gflops"])
    return f"machine: {m['facts']}; fp32 matmul probe {probes} GFLOP/s (start of each session, end)"


def render(report: dict[str, Any]) -> str:
    parts = [format_table(report["methods"]), verdict_table(report["methods"]), settings_line(report),
             machine_line(report)]
    return "\n\n".join(filter(None, parts)) + "\n"


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> tuple[Path, Path]:
    md, js = out_dir / f"{tag}.md", out_dir / f"{tag}.json"
    report["table"] = format_table(report["methods"])
    for path, text in ((md, f"# In-domain Fashion-MNIST, {tag}\n\n" + render(report)),
                       (js, json.dumps(report, indent=2, default=str) + "\n")):
        write_text_atomic(path, text)
    return md, js


def setting_differences(then: dict[str, Any], now: dict[str, Any], keys) -> list[str]:
    """'key: <then> then, <now> now' for each of `keys` whose value differs between two runs' settings."""
    return [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in keys if then.get(k) != now.get(k)]


def calibration_from(path: Path, settings: dict[str, Any], methods: set[str]) -> dict[str, Any]:
    """The step counts the earlier run at `path` calibrated for `methods`, each marked with where it came from;
    refused when that run had another batch, pretraining set or device (its timing would not be this run's). Its
    threads may differ: they set the budget's wall time, this run's only how long it takes. Its budget may differ
    too: the steps are then the timed seconds per step scaled to this run's budget (e.g. a baseline given four
    times DreamTeacher's 30 minutes, timed under the same load as the 30-minute budget)."""
    if not path.is_file():
        tags = sorted(p.stem for p in path.parent.glob("*.json"))
        raise SystemExit(f"--steps-from: no {path}; the tags there: {', '.join(tags) or 'none'}")
    old = json.loads(path.read_text())
    same = ("batch_size", "pretrain_images", "device")
    same += ("ssl_augment",) if methods & set(SSL_METHODS) else ()  # the views set SimCLR's and BYOL's speed
    diffs = setting_differences(old["settings"], settings, same)
    if diffs:
        raise SystemExit(f"--steps-from: {path} was timed under other settings ({'; '.join(diffs)})")
    budget = settings["budget_minutes"]
    taken = {}
    for method, calib in old.get("calibration", {}).items():
        if method not in methods:
            continue
        timed_for = calib.get("timed_for_budget_minutes", old["settings"]["budget_minutes"])  # a chain's origin
        entry = {k: v for k, v in calib.items() if k != "timed_for_budget_minutes"}
        entry.update(steps_from=calib.get("steps_from", str(path)),
                     threads=calib.get("threads", old["settings"]["threads"]))
        if budget != old["settings"]["budget_minutes"]:
            entry["steps"] = steps_for_budget(calib["seconds_per_step"], budget * 60 - calib.get("cache_build_s", 0.0))
        if budget != timed_for:
            entry["timed_for_budget_minutes"] = timed_for
        taken[method] = entry
    return taken


COMBINE_SETTINGS = ("budget_minutes", "batch_size", "pretrain_images", "ssl_augment", "recipe", "overrides", "teacher",
                    "timestep", "data", "max_train", "max_test", "split", "ft_epochs", "input_size", "zero_init_last",
                    "device")


def combine_runs(tags: list[str], out_dir: Path, tag: str) -> dict[str, Any]:
    """One report of the entries of the runs `tags` (e.g. each method's seeds run pinned to its own core), with the
    mean rows across them; refuses runs that differ in budget, data, recipe or evaluation, that gave a method other
    step counts, or that repeat an entry."""
    runs = []
    for name in tags:
        path = out_dir / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--combine: no {path}; the tags there: "
                             f"{', '.join(sorted(p.stem for p in out_dir.glob('*.json'))) or 'none'}")
        runs.append(json.loads(path.read_text()))
    first = runs[0]
    report = {"tag": tag, "combined": tags, "settings": {**first["settings"], "entries": [], "ssl_overrides": {}},
              "calibration": {}, "methods": {},
              "machine": {"facts": "; ".join(dict.fromkeys(r["machine"]["facts"] for r in runs)),
                          "matmul_gflops": [g for r in runs for g in r["machine"]["matmul_gflops"]]}}
    settings_by_method: dict[str, tuple[str, dict[str, float]]] = {}
    for name, run in zip(tags, runs, strict=True):
        diffs = setting_differences(first["settings"], run["settings"], COMBINE_SETTINGS)
        if diffs:
            raise SystemExit(f"--combine: {name} differs from {tags[0]} ({'; '.join(diffs)})")
        for method, calib in run.get("calibration", {}).items():
            kept = report["calibration"].setdefault(method, calib)
            if kept["steps"] != calib["steps"]:
                raise SystemExit(f"--combine: {name} gave {method} {calib['steps']} steps, another run {kept['steps']}")
        for key, entry in run["methods"].items():
            if key in report["methods"]:
                raise SystemExit(f"--combine: {key} is in more than one of {', '.join(tags)}")
            report["methods"][key] = entry
            report["settings"]["entries"].append(key)
            method = entry["method"]
            overrides = run["settings"].get("ssl_overrides", {}).get(method, {})
            if settings_by_method.setdefault(method, (name, overrides))[1] != overrides:
                other, theirs = settings_by_method[method]
                raise SystemExit(f"--combine: {method} ran with settings {overrides or 'the defaults'} in {name}, "
                                 f"{theirs or 'the defaults'} in {other}")
            if overrides:
                report["settings"]["ssl_overrides"][method] = overrides
    threads = sorted({r["settings"]["threads"] for r in runs})
    report["settings"]["threads"] = "/".join(map(str, threads))
    write_report(report, out_dir, tag)
    print("\n" + render(report))
    return report


def resumed_report(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """`report` with the finished entries and calibration of the earlier run at `path`; refuses other settings."""
    old = json.loads(path.read_text())
    old["settings"].setdefault("ssl_overrides", {})  # runs from before --ssl-set used the defaults
    new_settings = json.loads(json.dumps(report["settings"], default=str))
    diffs = setting_differences(old["settings"], new_settings, RESUME_SETTINGS)
    if diffs:
        raise SystemExit(f"--resume: {path} was run with other settings ({'; '.join(diffs)}); "
                         "use another --tag or the same settings")
    report["methods"] = old["methods"]
    report["calibration"] = old.get("calibration", {})
    report["machine"]["matmul_gflops"] = old["machine"]["matmul_gflops"] + report["machine"]["matmul_gflops"]
    if old["machine"]["facts"] != report["machine"]["facts"]:
        report["machine"]["facts"] += f" (earlier entries: {old['machine']['facts']})"
    return report


# ---------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.combine:
        return combine_runs(args.combine, Path(args.out_dir), args.tag)
    from training.protocols.evaluation import EvalConfig, evaluate
    from training.run.hardware import cpu_threads_per_process

    threads = args.threads or cpu_threads_per_process()
    torch.set_num_threads(threads)
    base = get_recipe(args.recipe)
    recipe = apply_overrides(base, args.overrides)
    teacher_source = resolve_teacher_source(args, recipe)
    recipe = apply_overrides(recipe, [f"teacher.source={teacher_source!r}"])
    batch_size = args.batch_size or recipe.optim.batch_size
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag = args.tag or default_tag(args)
    work = Path(args.work_dir) / tag
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    budget_s = 60.0 * args.budget_minutes
    methods = {m for m, _ in args.entries}
    eval_config = EvalConfig(data_dir=args.data_dir, max_train=args.max_train, max_test=args.max_test,
                             device=device, split=args.split, progress=not args.no_progress,
                             **({"ft_epochs": args.ft_epochs} if args.ft_epochs else {}))

    report: dict[str, Any] = {
        "tag": tag,
        "settings": {"budget_minutes": args.budget_minutes, "entries": [entry_key(*e) for e in args.entries],
                     "batch_size": batch_size, "num_workers": args.num_workers, "ssl_augment": args.ssl_augment,
                     "ssl_overrides": args.ssl_settings,
                     "threads": threads,
                     "calibration_steps": args.calibration_steps, "calibration_rounds": args.calibration_rounds,
                     "seed": args.seed, "recipe": recipe.name,
                     "overrides": args.overrides, "teacher": teacher_source, "timestep": recipe.teacher.timestep,
                     "data": args.data_dir or recipe.data.name, "pretrain_images": args.pretrain_images,
                     "max_train": args.max_train, "max_test": args.max_test, "split": args.split,
                     "ft_epochs": args.ft_epochs,
                     "input_size": list(recipe.data.input_size), "arch": recipe.arch, "device": device,
                     "zero_init_last": recipe.zero_init_last,
                     "steps_from": args.steps_from,
                     "budget_rule": "steps = floor(budget / median calibrated seconds per step), full LR schedule"},
        "machine": {"facts": describe_machine(), "torch": torch.__version__,
                    "matmul_gflops": [round(matmul_gflops(), 1)]},
        "calibration": {},
        "methods": {},
    }
    if args.resume and (out_dir / f"{tag}.json").is_file():
        report = resumed_report(report, out_dir / f"{tag}.json")
        logger.info("resuming %s: %d entries finished", tag, len(report["methods"]))
    if args.steps_from:
        taken = calibration_from(out_dir / f"{args.steps_from}.json", report["settings"], methods & set(BUDGETED))
        report["calibration"] = {**taken, **report["calibration"]}
        logger.info("steps taken from %s: %s", args.steps_from,
                    ", ".join(f"{m} {c['steps']}" for m, c in taken.items()))
    logger.info("in-domain benchmark %s: %s, %.1f min per budgeted method, %d threads, %s", tag,
                ",".join(report["settings"]["entries"]), args.budget_minutes, threads, report["machine"]["facts"])
    hf_train = load_pretrain_images(args, recipe) if methods & set(PRETRAINED) else None
    teacher = None
    if methods & {"dreamteacher", "dreamteacher-cached", "dreamteacher-recipe", "teacher"}:  # fail now if missing
        from training.teacher.build import build_teacher

        teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, device=device)
        logger.info("teacher: %s", teacher)

    t_start = time.perf_counter()
    pending = [m for m in BUDGETED if m in methods and m not in report["calibration"]]
    timed: dict[str, list[tuple[float, float]]] = {m: [] for m in pending}
    for _ in range(args.calibration_rounds):  # interleaved, so a slow spell of the host slows every method alike
        for method in pending:
            timed[method].append(calibrate_method(method, args, recipe, hf_train, batch_size, device, teacher_source,
                                                  threads, work))
            torch.set_num_threads(threads)  # whatever the trainer's Accelerator did
    for method in pending:
        sec = statistics.median(s for s, _ in timed[method])
        build_s = statistics.median(b for _, b in timed[method])
        report["calibration"][method] = {"steps_timed": args.calibration_steps, "rounds": args.calibration_rounds,
                                         "seconds_per_step": round(sec, 4),
                                         "seconds_per_step_by_round": [round(s, 4) for s, _ in timed[method]],
                                         "steps": steps_for_budget(sec, budget_s - build_s)}
        if method == "dreamteacher-cached":
            report["calibration"][method]["cache_build_s"] = round(build_s, 1)
        logger.info("%s: %.3f s/step measured -> %d steps for %.0f s (the budget less %.0f s of cache build)",
                    method, sec, report["calibration"][method]["steps"], budget_s - build_s, build_s)
    if pending:
        write_report(report, out_dir, tag)
    if args.calibrate_only:
        print("\n" + settings_line(report))
        return report

    for method, seed in args.entries:
        key = entry_key(method, seed)
        if key in report["methods"]:
            logger.info("%s: finished in an earlier session, kept", key)
            continue
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"method": method, "seed": seed}
        folder = work / key.replace("/", "_")
        if method in FROZEN_REFERENCES:
            if method == "teacher":
                module = PooledTeacherFeatures(teacher, seed=seed)
                entry["pretrain"] = {"teacher": teacher_source, "timestep": recipe.teacher.timestep,
                                     "taps": [f"{t.name}@stride{t.stride}x{t.channels}" for t in teacher.taps],
                                     "teacher_training": training_cost(teacher_source),
                                     "feature_dim": module.num_features}
            else:
                module = RawPixels(tuple(recipe.data.input_size))
                entry["pretrain"] = {"feature_dim": module.num_features}
            evaluation = evaluate(module, replace(eval_config, protocols="linear,knn", seed=seed), recipe=recipe)
        else:
            if method == "random":
                backbone = fresh_backbone(recipe, seed)
                entry["pretrain"] = {"steps": 0, "images": 0, "train_s": 0.0}
            elif method in ("simclr", "byol"):
                backbone, entry["pretrain"] = pretrain_ssl(method, seed, report["calibration"][method]["steps"],
                                                           args, recipe, hf_train, batch_size, device, folder)
            else:
                steps = report["calibration"][method]["steps"] if method in BUDGETED else None
                cached = ("--feature-cache", str(feature_cache_dir(work, seed))) \
                    if method == "dreamteacher-cached" else ()
                backbone, entry["pretrain"] = pretrain_dreamteacher(seed, steps, args, recipe, batch_size,
                                                                    teacher_source, threads, folder, len(hf_train),
                                                                    cached)
                if cached:
                    entry["pretrain"]["cache_build_s"] = report["calibration"][method]["cache_build_s"]
                torch.set_num_threads(threads)
            evaluation = evaluate(backbone.eval(), replace(eval_config, seed=seed), recipe=recipe)
        entry["evaluation"] = evaluation
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["methods"][key] = entry
        report["settings"]["evaluation"] = {k: evaluation["settings"][k]
                                            for k in ("train_images", "test_images", "fine_tune", "knn")}
        report["seconds_total"] = round(report.get("seconds_total", 0.0) + entry["seconds"], 1)
        write_report(report, out_dir, tag)
        ssl_state_file(folder).unlink(missing_ok=True)  # recorded: the weights are in backbone.safetensors
        logger.info("%s done in %.0f s: %s", key, entry["seconds"], _scores(entry))

    report["machine"]["matmul_gflops"].append(round(matmul_gflops(), 1))
    md, js = write_report(report, out_dir, tag)
    print("\n" + render(report))
    print(f"wrote {md} and {js} (this session: {time.perf_counter() - t_start:.0f} s)")
    return report


if __name__ == "__main__":
    main()
