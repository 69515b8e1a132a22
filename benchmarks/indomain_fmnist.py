"""In-domain Fashion-MNIST: DreamTeacher vs SimCLR vs BYOL vs random init, at the same wall-clock pretraining budget.

    python benchmarks/indomain_fmnist.py                                   # 6 min per method, full evaluation
    python benchmarks/indomain_fmnist.py --budget-minutes 0.5 --max-train 2000 --max-test 1000 --tag quick
    python benchmarks/indomain_fmnist.py --methods dreamteacher --set teacher.timestep=250 --tag t250

Every backbone is timm `resnet18` (num_classes=0), trained and evaluated on the same 32x32 RGB Fashion-MNIST train
split with the recipe's normalisation (resnet18.dreamteacher_fmnist; `--set` overrides apply to the whole comparison:
the DreamTeacher run, the teacher reference and the data):

* random      no pretraining (seeded init): the floor.
* simclr      lightly's SimCLR (benchmarks/ssl_baselines.py: heads, NTXentLoss, SimCLRTransform at 32 px, SGD).
* byol        lightly's BYOL (same file: heads, momentum encoder with a cosine momentum schedule, BYOLTransform).
* dreamteacher  training/pretrain.py with the recipe and its teacher (`--teacher`, default the recipe's source).
* teacher     reference, not a backbone: the frozen teacher's features at the recipe's timestep, each tap globally
              average-pooled and concatenated, then the same linear probe and kNN (no fine-tune: it is frozen).

Fair budget, by wall clock: each pretraining method first runs `--calibration-steps` steps (its own loop, its data
loading included) to measure its median seconds per step (the first step, with start-up, is left out), then is
given steps = floor(budget / seconds-per-step) so it runs a complete LR schedule of that length from a fresh
init. The table reports the measured loop time, steps and source images/s (SimCLR/BYOL draw 2 augmented views per
image; DreamTeacher's step includes the teacher's forward). All methods use the same batch (`--batch-size`, default
the recipe's 256) and the same DataLoader workers. Start-up, checkpointing and export are excluded from the loop
time (the JSON has the whole wall time too).

Evaluation: training/evaluate.py's `evaluate` with all protocols (linear probe, kNN k=20, fine-tune with 1% and 10%
of the labels) on Fashion-MNIST train -> t10k; `--max-train/--max-test` subsample both (seeded) for quick runs.

Output: one markdown table and a machine line on stdout, and `<out-dir>/<tag>.md` + `<out-dir>/<tag>.json` (raw
numbers, settings, per-method calibration and the full evaluation reports), rewritten after every method so an
interrupted run keeps what it finished. Trained backbones and the DreamTeacher run folder go to `<work-dir>/<tag>/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/indomain_fmnist.py` puts benchmarks/, not the repo, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import machine_facts, matmul_gflops  # noqa: E402
from dreamteacher_models.recipes import DEFAULT_RECIPE, Recipe, apply_overrides, get_recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = ("random", "simclr", "byol", "dreamteacher", "teacher")
PRETRAINED = ("simclr", "byol", "dreamteacher")
LABELS = {"random": "random init", "simclr": "SimCLR (lightly)", "byol": "BYOL (lightly)",
          "dreamteacher": "DreamTeacher", "teacher": "teacher features (reference)"}
DEFAULT_OUT_DIR = "benchmarks/results/indomain_fmnist"
DEFAULT_WORK_DIR = "runs/bench_indomain_fmnist"

logger = logging.getLogger("dreamteacher.bench.indomain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=6.0,
                   help="wall-clock pretraining budget per method, in minutes (default 6)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--teacher", help="DreamTeacher teacher folder (default: the recipe's teacher.source)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="recipe override, repeatable (e.g. --set teacher.timestep=250); passed to the DreamTeacher "
                        "run and used for the teacher reference and the data")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe (default {DEFAULT_RECIPE})")
    p.add_argument("--seed", type=int, default=0, help="seed for inits, data order, subsets (default 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--tag", help="name of this run's outputs (default: budget<M>min_seed<S>[_<overrides>])")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"table + JSON folder (default {DEFAULT_OUT_DIR})")
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                   help=f"trained backbones and the DreamTeacher run (default {DEFAULT_WORK_DIR})")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the recipe's, i.e. the Debian folder)")
    d.add_argument("--pretrain-images", type=int, help="pretrain on the first N train images only (default: all)")
    d.add_argument("--max-train", type=int, help="evaluate with a seeded random N of the train images")
    d.add_argument("--max-test", type=int, help="evaluate on a seeded random N of the test images")
    t = p.add_argument_group("pretraining")
    t.add_argument("--batch-size", type=int, help="batch for every method (default: the recipe's optim.batch_size)")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for every method (default 0)")
    t.add_argument("--calibration-steps", type=int, default=6,
                   help="steps timed per method to size its schedule (default 6; the first is not counted)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--ft-epochs", help="fine-tune epochs, one value or one per fraction (default: evaluate.py's)")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.method_list = parse_methods(args.methods)
    except ValueError as err:
        p.error(str(err))
    if args.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    if args.calibration_steps < 2:
        p.error("--calibration-steps must be >= 2 (the first step is not counted)")
    if args.ft_epochs:
        try:
            args.ft_epochs = [int(v) for v in args.ft_epochs.split(",") if v.strip()]
        except ValueError:
            p.error(f"--ft-epochs: expected comma-separated integers, got {args.ft_epochs!r}")
    return args


def parse_methods(text: str) -> list[str]:
    items = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise ValueError(f"unknown method(s) {bad or text!r}; choose from {','.join(METHODS)}")
    return [m for m in METHODS if m in items]  # canonical order


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
    from training.regressor import build_student

    torch.manual_seed(seed)
    return build_student(recipe.arch)


def load_pretrain_images(args: argparse.Namespace, recipe: Recipe):
    from training.data import load_image_dataset

    hf = load_image_dataset(args.data_dir, split="train", recipe_data=recipe.data)
    if args.pretrain_images:
        hf = hf.select(range(min(args.pretrain_images, len(hf))))
    return hf


def steps_for_budget(seconds_per_step: float, budget_s: float) -> int:
    return max(1, math.floor(budget_s / seconds_per_step))


def pretrain_ssl(method: str, args, recipe: Recipe, hf_train, batch_size: int, budget_s: float, device: str,
                 work: Path) -> tuple[nn.Module, dict[str, Any]]:
    from benchmarks.ssl_baselines import sgd_lr, train_ssl

    kw = dict(batch_size=batch_size, input_size=recipe.data.input_size[-1], mean=recipe.data.mean,
              std=recipe.data.std, seed=args.seed, num_workers=args.num_workers, device=device,
              progress=not args.no_progress)
    calib = train_ssl(method, fresh_backbone(recipe, args.seed), hf_train, steps=args.calibration_steps,
                      desc=f"{method} calibration", **kw)
    sec_per_step = statistics.median(calib["step_s"][1:])
    steps = steps_for_budget(sec_per_step, budget_s)
    logger.info("%s: %.3f s/step measured -> %d steps for %.0f s", method, sec_per_step, steps, budget_s)
    backbone = fresh_backbone(recipe, args.seed)
    t0 = time.perf_counter()
    out = train_ssl(method, backbone, hf_train, steps=steps, desc=method, **kw)
    wall_s = time.perf_counter() - t0
    folder = work / method
    folder.mkdir(parents=True, exist_ok=True)
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in backbone.state_dict().items()},
                                str(folder / "backbone.safetensors"))
    info = {"steps": steps, "batch_size": batch_size, "images": out["images"], "views": out["views"],
            "epochs": round(out["epochs"], 3), "train_s": round(out["train_s"], 2), "wall_s": round(wall_s, 2),
            "images_per_s": round(out["images"] / out["train_s"], 2), "final_loss": out["final_loss"],
            "optimizer": f"SGD lr {sgd_lr(batch_size):g} (0.06 x batch/128) momentum 0.9 wd 5e-4, "
                         "10% warm-up + cosine",
            "median_step_s": round(statistics.median(out["step_s"]), 4),
            "calibration": {"steps": args.calibration_steps, "seconds_per_step": round(sec_per_step, 4)},
            "weights": str(folder / "backbone.safetensors")}
    return backbone, info


def _dreamteacher_argv(args, batch_size: int, output_dir: Path, steps: int, teacher: str) -> list[str]:
    argv = ["--recipe", args.recipe, "--output-dir", str(output_dir), "--max-steps", str(steps),
            "--batch-size", str(batch_size), "--num-workers", str(args.num_workers), "--seed", str(args.seed),
            "--checkpoint-every", "0", "--log-every", "1", "--teacher", teacher]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.pretrain_images:
        argv += ["--limit-images", str(args.pretrain_images)]
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def _step_seconds(run_dir: Path, batch_size: int) -> list[float]:
    """Each optimizer step's wall time, from the run's metrics.jsonl written with --log-every 1."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [batch_size / row["images_per_s"] for row in lines]


def pretrain_dreamteacher(args, recipe: Recipe, batch_size: int, budget_s: float, teacher: str, work: Path,
                          num_images: int) -> tuple[nn.Module, dict[str, Any]]:
    from training import pretrain
    from training.evaluate import load_backbone

    calib_dir = work / "dreamteacher_calibration"
    shutil.rmtree(calib_dir, ignore_errors=True)
    pretrain.main(_dreamteacher_argv(args, batch_size, calib_dir, args.calibration_steps, teacher)
                  + ["--no-export", "--feature-images", "0"])
    sec_per_step = statistics.median(_step_seconds(calib_dir, batch_size)[1:])
    shutil.rmtree(calib_dir, ignore_errors=True)
    steps = steps_for_budget(sec_per_step, budget_s)
    logger.info("dreamteacher: %.3f s/step measured -> %d steps for %.0f s", sec_per_step, steps, budget_s)

    run_dir = work / "dreamteacher"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (metrics.jsonl is appended to)
    t0 = time.perf_counter()
    pretrain.main(_dreamteacher_argv(args, batch_size, run_dir, steps, teacher) + ["--feature-images", "4"])
    wall_s = time.perf_counter() - t0
    step_s = _step_seconds(run_dir, batch_size)
    train_s = sum(step_s)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    backbone = load_backbone(None, checkpoint=run_dir / "export", recipe=recipe)
    info = {"steps": len(step_s), "batch_size": batch_size, "images": len(step_s) * batch_size,
            "epochs": round(len(step_s) * batch_size / num_images, 3),
            "train_s": round(train_s, 2), "wall_s": round(wall_s, 2),
            "images_per_s": round(len(step_s) * batch_size / train_s, 2), "final_loss": metrics[-1]["loss/loss"],
            "optimizer": f"{recipe.optim.optimizer} lr {recipe.optim.lr:g} wd {recipe.optim.weight_decay:g} "
                         f"betas {tuple(recipe.optim.betas)}, 10% warm-up + cosine (the recipe)",
            "median_step_s": round(statistics.median(step_s), 4),
            "calibration": {"steps": args.calibration_steps, "seconds_per_step": round(sec_per_step, 4)},
            "teacher": teacher, "timestep": recipe.teacher.timestep, "run_dir": str(run_dir)}
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
    from training.evaluate import DEFAULT_FRACTIONS, fraction_key

    return ("linear probe", f"kNN k={k}", *(fraction_key(f) for f in DEFAULT_FRACTIONS))


def format_table(results: dict[str, dict[str, Any]]) -> str:
    keys = protocol_keys()
    lines = ["| method | pretraining wall time | steps | images/s | linear top-1 | kNN top-1 | fine-tune 1% | "
             "fine-tune 10% |", "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in results:
            continue
        row = results[method]
        pre = row.get("pretrain") or {}
        scores = (row.get("evaluation") or {}).get("results", {})
        if method in PRETRAINED:
            wall = f"{pre['train_s']:.0f} s" if "train_s" in pre else "—"
            steps, speed = str(pre.get("steps", "—")), _fmt(pre.get("images_per_s"), ".0f")
        else:
            wall, steps, speed = ("0 s", "0", "—") if method == "random" else ("—", "—", "—")
        cells = [_fmt(scores.get(key, {}).get("top1")) for key in keys]
        lines.append(f"| {LABELS[method]} | {wall} | {steps} | {speed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    ev = s.get("evaluation", {})
    return (f"budget {s['budget_minutes']:g} min per method, batch {s['batch_size']}, {s['num_workers']} workers, "
            f"seed {s['seed']}, recipe {s['recipe']} (teacher {s['teacher']}, t={s['timestep']}"
            + (f", overrides {' '.join(s['overrides'])}" if s["overrides"] else "") + "); evaluation on "
            f"{ev.get('train_images', '?')} train / {ev.get('test_images', '?')} test images")


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    probes = ", ".join(f"{g:.0f}" for g in m["matmul_gflops"])
    return f"machine: {m['facts']}; fp32 matmul probe {probes} GFLOP/s (start, end)"


def render(report: dict[str, Any]) -> str:
    return "\n\n".join([format_table(report["methods"]), settings_line(report), machine_line(report)]) + "\n"


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{tag}.md", out_dir / f"{tag}.json"
    report["table"] = format_table(report["methods"])
    for path, text in ((md, f"# In-domain Fashion-MNIST, {tag}\n\n" + render(report)),
                       (js, json.dumps(report, indent=2, default=str) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md, js


# ---------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from training.evaluate import evaluate

    base = get_recipe(args.recipe)
    recipe = apply_overrides(base, args.overrides)
    teacher_source = resolve_teacher_source(args, recipe)
    recipe = apply_overrides(recipe, [f"teacher.source={teacher_source!r}"])
    batch_size = args.batch_size or recipe.optim.batch_size
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag = args.tag or default_tag(args)
    work = Path(args.work_dir) / tag
    work.mkdir(parents=True, exist_ok=True)
    budget_s = 60.0 * args.budget_minutes
    eval_kw: dict[str, Any] = dict(recipe=recipe, data_dir=args.data_dir, max_train=args.max_train,
                                   max_test=args.max_test, seed=args.seed, device=device,
                                   progress=not args.no_progress)
    if args.ft_epochs:
        eval_kw["ft_epochs"] = args.ft_epochs

    report: dict[str, Any] = {
        "tag": tag,
        "settings": {"budget_minutes": args.budget_minutes, "methods": args.method_list, "batch_size": batch_size,
                     "num_workers": args.num_workers, "calibration_steps": args.calibration_steps,
                     "seed": args.seed, "recipe": recipe.name, "overrides": args.overrides,
                     "teacher": teacher_source, "timestep": recipe.teacher.timestep,
                     "data": args.data_dir or recipe.data.name, "pretrain_images": args.pretrain_images,
                     "input_size": list(recipe.data.input_size), "arch": recipe.arch, "device": device,
                     "budget_rule": "steps = floor(budget / median calibrated seconds per step), full LR schedule"},
        "machine": {"facts": machine_facts(), "threads": threads, "torch": torch.__version__,
                    "matmul_gflops": [round(matmul_gflops(), 1)]},
        "methods": {},
    }
    logger.info("in-domain benchmark %s: methods %s, %.1f min per pretraining method, %s", tag,
                ",".join(args.method_list), args.budget_minutes, report["machine"]["facts"])
    hf_train = load_pretrain_images(args, recipe) if set(args.method_list) & set(PRETRAINED) else None
    teacher = None
    if set(args.method_list) & {"dreamteacher", "teacher"}:  # fail now, not after an hour, if it is missing
        from training.teachers import build_teacher

        teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, device=device)
        logger.info("teacher: %s", teacher)

    t_start = time.perf_counter()
    for method in args.method_list:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        if method == "teacher":
            module = PooledTeacherFeatures(teacher, seed=args.seed)
            entry["pretrain"] = {"teacher": teacher_source, "timestep": recipe.teacher.timestep,
                                 "taps": [f"{t.name}@stride{t.stride}x{t.channels}" for t in teacher.taps],
                                 "feature_dim": module.num_features}
            evaluation = evaluate(module, protocols="linear,knn", **eval_kw)
        else:
            if method == "random":
                backbone = fresh_backbone(recipe, args.seed)
                entry["pretrain"] = {"steps": 0, "images": 0, "train_s": 0.0}
            elif method in ("simclr", "byol"):
                backbone, entry["pretrain"] = pretrain_ssl(method, args, recipe, hf_train, batch_size, budget_s,
                                                           device, work)
            else:
                backbone, entry["pretrain"] = pretrain_dreamteacher(args, recipe, batch_size, budget_s,
                                                                    teacher_source, work, len(hf_train))
                torch.set_num_threads(threads)  # whatever the trainer's Accelerator did
            evaluation = evaluate(backbone.eval(), **eval_kw)
        entry["evaluation"] = evaluation
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["methods"][method] = entry
        report["settings"]["evaluation"] = {k: evaluation["settings"][k]
                                            for k in ("train_images", "test_images", "fine_tune", "knn")}
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_report(report, Path(args.out_dir), tag)
        logger.info("%s done in %.0f s: %s", method, entry["seconds"],
                    {k: v["top1"] for k, v in evaluation["results"].items()})

    report["machine"]["matmul_gflops"].append(round(matmul_gflops(), 1))
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    md, js = write_report(report, Path(args.out_dir), tag)
    print("\n" + render(report))
    print(f"wrote {md} and {js} ({report['seconds_total']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
