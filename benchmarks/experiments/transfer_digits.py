"""Transfer to another domain: the Fashion-MNIST backbones on handwritten digits, frozen and fine-tuned.

    pip install scikit-learn      # its wheel ships the digits: no download
    python benchmarks/experiments/transfer_digits.py --tag main_job_length --split validation --levels \
        --backbone random=random --backbone pixels=pixels --backbone teacher=teacher \
        --backbone dreamteacher=runs/fmnist_ablation/validation_187steps/all4_nozero_at3/export \
        --backbone simclr=runs/ssl_tuning/main_job_length_defaults/simclr_seed0/backbone.safetensors

Data: scikit-learn's `load_digits` (UCI optdigits' test set: 1,797 images of the digits 0-9 by 43 writers, 8x8
pixels of 17 grey levels), written once as an image folder of 32x32 PNGs (bicubic upsampling, the recipe's input
size) under `--data-root`: a fixed, class-balanced third is the test split (TEST_FRACTION, TEST_SEED), the rest is
train, and `--split validation` scores on training/protocols/splits.py's fixed carve of that train split instead.
Why this set: it is the one labelled image set of another domain (pen strokes, not garments) installable offline
here, and none of our choices was made on it.

Each `--backbone NAME=SOURCE` is scored by training/evaluate.py's protocols with the recipe's eval transform:
linear probe and kNN on the pooled C5 features, and fine-tuning with FRACTIONS of the train labels. SOURCE is
`random` (the recipe's init, seed 0), `pixels` (the normalised image, frozen protocols only), `teacher` (the recipe's
teacher: its taps at the recipe's timestep, pooled and concatenated; frozen protocols only), an export folder
(`model.safetensors`, as training/pretrain.py writes), or a backbone's `.safetensors` state dict (as
indomain_fmnist.py saves SimCLR/BYOL). `--levels` adds, for each network backbone, the frozen protocols on each
pyramid level alone (C2..C5, globally pooled) and on all four pooled and concatenated: which level carries what
transfers; its last row (the mean over backbones of linear and kNN) chooses one level set, which `--pool-strides`
then feeds to the frozen protocols. Use `--split validation` for such questions and `--split test` once per
reported row. Few-label fine-tuning varies with the evaluation seed: rerun with `--seed N --fractions 0.1` and
`--combine TAG,TAG,... --tag T` for the mean and range.

Output: `<out-dir>/<tag>.json` and `.md`, rewritten after every backbone; a rerun keeps the backbones already there
(same settings).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dreamteacher_models.recipes import DEFAULT_RECIPE, Recipe, apply_overrides, get_recipe  # noqa: E402
from training.protocols.segmentation import PYRAMID_STRIDES, Pyramid  # noqa: E402
from training.protocols.splits import SPLITS, carve_validation_split  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

TEST_FRACTION = 1 / 3  # 599 of the 1,797 digits
TEST_SEED = 0
IMAGE_SIZE = 32
# fine-tuning: label fraction -> epochs (evaluate.py's for its 1% and 10% runs: few images, more passes);
# 10% is about 12 labels per digit
FT_EPOCHS = {0.1: 40, 1.0: 8}
FRACTIONS = tuple(FT_EPOCHS)
FROZEN_ONLY = ("pixels", "teacher")
DONE_MARKER = "complete.json"

logger = logging.getLogger("dreamteacher.bench.transfer_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="results file name")
    p.add_argument("--combine", metavar="TAG,TAG,...",
                   help="instead of evaluating: the mean and range over these earlier runs (e.g. evaluation seeds) "
                        "of every backbone and protocol they share, written as --tag")
    p.add_argument("--backbone", action="append", default=[], metavar="NAME=SOURCE",
                   help="a backbone to score, repeatable; SOURCE: random, pixels, teacher, an export folder or a "
                        ".safetensors state dict")
    p.add_argument("--split", choices=SPLITS, default="validation",
                   help="score on the validation carve of the digits' train split (default: for questions) or on "
                        "their test split (reported rows)")
    p.add_argument("--levels", action="store_true", help="also the frozen protocols on each pyramid level alone")
    p.add_argument("--pool-strides", type=lambda text: tuple(int(v) for v in text.split(",")),
                   help="the frozen protocols' features: these pyramid levels' (e.g. 16 for C4, or 8,16), each "
                        "globally pooled, concatenated (default: C5 pooled, timm's own); fine-tuning is unchanged")
    p.add_argument("--fractions", type=lambda text: tuple(float(v) for v in text.split(",")), default=FRACTIONS,
                   help=f"label fractions to fine-tune with, from {','.join(map(str, FRACTIONS))} (default: both)")
    p.add_argument("--seed", type=int, default=0,
                   help="evaluation seed: the fine-tuning label subsets, heads and order, the probe's hold-out")
    p.add_argument("--no-finetune", action="store_true", help="frozen protocols only")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"eval transform and init (default {DEFAULT_RECIPE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="recipe override, repeatable: e.g. --set 'data.input_size=(3,64,64)' for the dense "
                        "benchmark's 64-px backbones (the 32-px digits are resized by the eval transform)")
    p.add_argument("--data-root", default="runs/transfer_digits/data", help="where the image folder is written")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--out-dir", default="benchmarks/results/transfer_digits")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.fractions or set(args.fractions) - set(FRACTIONS):
        p.error(f"--fractions: choose from {','.join(map(str, FRACTIONS))}, got {args.fractions}")
    args.sources = {}
    for item in args.backbone:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            p.error(f"--backbone takes NAME=SOURCE, got {item!r}")
        args.sources[name] = source
    if not args.sources and not args.combine:
        p.error("give at least one --backbone NAME=SOURCE (or --combine)")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) in 0..255, labels int64 (N,)) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the digits come with scikit-learn: pip install scikit-learn (or -e .[bench])") from e
    digits = load_digits()
    return np.round(digits.images * 255 / 16).astype(np.uint8), digits.target.astype(np.int64)


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path, size: int = IMAGE_SIZE) -> Path:
    """`root`/{train,test}/<label>/<index>.png at `size` px (bicubic), test being the fixed class-balanced
    TEST_FRACTION; written into a temporary folder renamed into place, so a half-written folder is never read.
    A complete folder is kept as it is."""
    from PIL import Image

    if (root / DONE_MARKER).is_file():
        return root
    train_idx, test_idx = carve_validation_split(labels, TEST_FRACTION, TEST_SEED)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            folder = partial / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
    write_text_atomic(partial / DONE_MARKER, json.dumps({"images": len(labels), "train": len(train_idx),
                                                         "test": len(test_idx), "size": size}) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(root)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Backbones


class PooledLevels(nn.Module):
    """A timm CNN's pyramid levels at `strides`, each globally average-pooled, concatenated: (B, sum of channels)."""

    def __init__(self, model: nn.Module, arch: str, strides: tuple[int, ...]):
        super().__init__()
        self.pyramid = Pyramid(model, arch, strides=strides)
        self.num_features = int(sum(self.pyramid.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([level.mean(dim=(2, 3)) for level in self.pyramid(x)], dim=1)


def load_source(source: str, recipe: Recipe) -> nn.Module:
    """The backbone `source` names (see the module docstring); a clear error for anything else."""
    from benchmarks.experiments.indomain_fmnist import PooledTeacherFeatures, RawPixels, fresh_backbone, saved_backbone

    if source == "random":
        return fresh_backbone(recipe, 0)
    if source == "pixels":
        return RawPixels(tuple(recipe.data.input_size))
    if source == "teacher":
        from training.teacher.build import build_teacher

        return PooledTeacherFeatures(build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, device="cpu"))
    path = Path(source)
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        return saved_backbone(path, recipe)
    raise ValueError(f"backbone source {source!r} is none of: random, pixels, teacher, an export folder, a "
                     ".safetensors file (no such folder or file)")


# ---------------------------------------------------------------------------------------------------------------
# Report


def level_names(strides) -> str:
    return "+".join(f"C{s.bit_length() - 1}" for s in strides)  # stride 4 = 2**2 -> C2 ... 32 -> C5


def pooled_from(strides) -> str:
    return f"{level_names(strides)} pooled" if strides else "C5 pooled (timm's pre-logits)"


def level_means(levels: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per level set, the mean over backbones of (linear + kNN) / 2: one choice of pooled levels for every backbone
    (made on validation, then `--pool-strides` on test)."""
    names = list(next(iter(levels.values())))
    return {level: float(np.mean([(by_level[level]["linear probe"]["top1"] + by_level[level]["kNN k=20"]["top1"]) / 2
                                  for by_level in levels.values()])) for level in names}


def row_cells(results: dict[str, Any], keys: list[str]) -> str:
    return " | ".join(f"{results[k]['top1']:.2f}" if k in results else "—" for k in keys)


def render(report: dict[str, Any]) -> str:
    from training.protocols.evaluation import fraction_key

    keys = ["linear probe", "kNN k=20", *(fraction_key(f) for f in report["settings"].get("fractions", FRACTIONS))]
    lines = [f"# Transfer to handwritten digits, {report['tag']}", "",
             f"Top-1 on the digits' {report['split']} split ({report.get('scored_images', '?')} scored, "
             f"{report.get('fit_images', '?')} fitting images, at {report['input_px']} px); backbones frozen except "
             f"for fine-tuning; frozen features: {pooled_from(report['settings'].get('pool_strides'))}; evaluation "
             f"seed {report['settings'].get('seed', 0)}.", "",
             "| backbone | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, entry in report["backbones"].items():
        lines.append(f"| {name} | {row_cells(entry['results'], keys)} |")
    levels = {n: e["levels"] for n, e in report["backbones"].items() if e.get("levels")}
    if levels:
        names = list(next(iter(levels.values())))
        lines += ["", "Each pyramid level alone, globally pooled (linear probe / kNN):", "",
                  "| backbone | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, by_level in levels.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{r['linear probe']['top1']:.2f} / {r['kNN k=20']['top1']:.2f}" for r in by_level.values()) + " |")
        means = level_means(levels)
        best = max(means, key=means.get)
        lines.append("| mean of linear and kNN, over the backbones | " + " | ".join(
            f"**{v:.2f}**" if level == best else f"{v:.2f}" for level, v in means.items()) + " |")
    lines += ["", f"Sources: `{json.dumps(report['sources'])}`", "", f"machine: {report['machine']}", ""]
    return "\n".join(lines)


def with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A report's settings, with the default of each option added since (files from before it ran with it)."""
    for key, value in (("pool_strides", None), ("seed", 0), ("fractions", list(FRACTIONS))):
        settings.setdefault(key, value)
    return settings


def combine(tags: list[str], out_dir: Path, tag: str) -> dict[str, Any]:
    """Mean, min and max over the runs `tags` of each (backbone, protocol) they all have; refuses runs that differ in
    anything but the evaluation seed and the fractions, or that share a seed."""
    runs = []
    for name in tags:
        path = out_dir / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--combine: no {path}")
        runs.append(json.loads(path.read_text()))
    rest = [{k: v for k, v in with_defaults(r["settings"]).items() if k not in ("seed", "fractions")} for r in runs]
    seeds = [r["settings"].get("seed", 0) for r in runs]
    if any(r != rest[0] for r in rest) or len(set(seeds)) < len(seeds):
        raise SystemExit(f"--combine: {tags} differ in more than the evaluation seed, or repeat one: {seeds}")
    rows = {}
    for name in runs[0]["backbones"]:
        if all(name in r["backbones"] and r["sources"][name] == runs[0]["sources"][name] for r in runs):
            shared = [k for k in runs[0]["backbones"][name]["results"]
                      if all(k in r["backbones"][name]["results"] for r in runs)]
            rows[name] = {k: [r["backbones"][name]["results"][k]["top1"] for r in runs] for k in shared}
    report = {"tag": tag, "combined": tags, "seeds": seeds, "rows": rows, "split": runs[0]["split"],
              "machine": runs[-1]["machine"]}
    keys = list(next(iter(rows.values())))
    lines = [f"# Transfer to handwritten digits, {tag}", "",
             f"Top-1 on the digits' {report['split']} split: mean (min-max) over evaluation seeds {seeds} "
             f"({', '.join(tags)}).", "", "| backbone | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, by_key in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in by_key.values()) + " |")
    lines += ["", f"machine: {report['machine']}", ""]
    write_text_atomic(out_dir / f"{tag}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / f"{tag}.md", "\n".join(lines))
    return report


def save(report: dict[str, Any], out_json: Path) -> None:
    write_text_atomic(out_json, json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_json.with_suffix(".md"), render(report))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.combine:
        return combine([t for t in args.combine.split(",") if t], Path(args.out_dir), args.tag)
    from training.protocols.evaluation import EvalConfig, evaluate

    torch.set_num_threads(args.threads)
    recipe = apply_overrides(get_recipe(args.recipe), args.overrides)
    root = Path(args.data_root)
    if not (root / DONE_MARKER).is_file():
        write_image_folder(*load_sklearn_digits(), root)
    settings = {"split": args.split, "levels": args.levels, "finetune": not args.no_finetune, "seed": args.seed,
                "fractions": list(args.fractions),
                "pool_strides": list(args.pool_strides) if args.pool_strides else None,
                "recipe": recipe.name, "overrides": args.overrides,
                "data": json.loads((root / DONE_MARKER).read_text())}
    out_json = Path(args.out_dir) / f"{args.tag}.json"
    report: dict[str, Any] = {"tag": args.tag, "split": args.split, "input_px": recipe.data.input_size[-1],
                              "settings": settings, "sources": {}, "backbones": {}}
    if out_json.is_file():
        report = json.loads(out_json.read_text())
        with_defaults(report["settings"])
        if report["settings"] != settings:
            raise SystemExit(f"{out_json} was made with other settings ({report['settings']}): use another --tag")
    report["machine"] = describe_machine()
    config = EvalConfig(data_dir=str(root), split=args.split, fractions=args.fractions,
                        ft_epochs=[FT_EPOCHS[f] for f in args.fractions],
                        seed=args.seed, threads=args.threads, device="cpu", progress=not args.no_progress)
    frozen = replace(config, protocols="linear,knn")
    for name, source in args.sources.items():
        if name in report["backbones"]:
            continue
        logger.info("%s: %s", name, source)
        network = source not in FROZEN_ONLY
        model = load_source(source, recipe)  # loaded once: fine-tuning trains a copy, the frozen wrappers read it
        features = PooledLevels(model, recipe.arch, args.pool_strides) if network and args.pool_strides else model
        entry = evaluate(features, frozen, recipe=recipe)
        if network and not args.no_finetune:
            tuned = evaluate(model, replace(config, protocols="finetune"), recipe=recipe)
            entry["results"].update(tuned["results"])
        if args.levels and network:
            entry["levels"] = {
                level_names(strides): evaluate(PooledLevels(model, recipe.arch, strides), frozen,
                                               recipe=recipe)["results"]
                for strides in [(s,) for s in PYRAMID_STRIDES] + [tuple(PYRAMID_STRIDES)]}
        report["backbones"][name] = {"results": entry["results"], "levels": entry.get("levels"),
                                     "seconds": entry["seconds"]}
        report["sources"][name] = source
        report["fit_images"] = entry["settings"]["train_images"]
        report["scored_images"] = entry["settings"]["test_images"]
        save(report, out_json)
    if report["backbones"]:
        save(report, out_json)  # also re-renders a finished run's table
    print(render(report), flush=True)
    return report


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
