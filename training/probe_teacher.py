"""Which teacher level, at which timestep, is worth distilling? A probe of a frozen diffusion teacher's taps.

    python training/probe_teacher.py                                   # the default recipe's teacher, Fashion-MNIST
    python training/probe_teacher.py --teacher runs/teacher/export --timesteps 10,50,150 --out probe.json
    python training/probe_teacher.py --data-dir my_labeled_images/ --train-images 2000 --test-images 500

For each timestep t and each candidate tap (default: every decoder level, read before its upsampler) it prints
one row with
- linear-probe and kNN top-1 (percent) of the tap's globally average-pooled features on a fixed labelled subset
  (the protocols of `training/evaluate.py`: standardised features + logistic regression, and weighted kNN, k=20),
  scored on the validation carve of train by default (`--split`; a choice made here never reads the test split);
- the tap's noise fraction `1 - corr(LN f(x, eps1), LN f(x, eps2))`: the mean over the scored images of one minus the
  correlation of the layer-normed (over C, H, W) features from two independent noise draws. 0 means the tap sees
  only the image; 1 means it sees only the injected noise (e.g. the level next to the output, which predicts it).

Use it to choose a recipe's `teacher.timestep` and `teacher.taps` (pair the taps with the student by stride), and
to choose between teacher checkpoints. A user with a new domain and a handful of labels runs the same command on an
image folder with one subfolder per class.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/probe_teacher.py` puts training/, not the repo, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe  # noqa: E402
from training.distill.losses import layer_norm_features  # noqa: E402
from training.protocols.classification import knn_classify, linear_probe  # noqa: E402
from training.protocols.evaluation import load_scored_splits, subsample  # noqa: E402
from training.protocols.splits import SPLITS  # noqa: E402
from training.run.hardware import machine_info  # noqa: E402
from training.run.layout import write_report  # noqa: E402
from training.run.schedule import noise_seed  # noqa: E402

logger = logging.getLogger("dreamteacher.probe_teacher")

# (images, generator) -> {key: (B, C, h, w)}: a FrozenTeacher, or any stand-in with the same call
Encoder = Callable[[Tensor, torch.Generator], dict[Any, Tensor]]


def noise_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample correlation of two feature maps (B, C, H, W) -> (B,): the mean of LN(a) * LN(b) over (C, H, W)."""
    return (layer_norm_features(a.float()) * layer_norm_features(b.float())).mean(dim=(1, 2, 3))


@torch.no_grad()
def encode_split(
    encoder: Encoder, loader, seed: int, *, second_draw: bool = False, desc: str = "encode"
) -> tuple[dict[Any, Tensor], Tensor, dict[Any, float]]:
    """Pooled features of every tap over `loader`, the labels, and (with `second_draw`) each tap's noise fraction.

    Returns ({tap: (N, C) float32}, labels (N,), {tap: 1 - mean correlation} or {}). Noise draws are seeded per
    batch from `seed`, so two calls with the same seed see the same noise.
    """
    pooled: dict[Any, list[Tensor]] = {}
    corr_sum: dict[Any, float] = {}
    labels, n = [], 0
    gen = torch.Generator()
    for i, batch in enumerate(tqdm(loader, desc=desc, unit="batch", leave=False)):
        images = batch["pixel_values"]
        if images.numel() == 0:
            continue
        if "labels" not in batch:
            raise ValueError("the probe needs labelled images (Fashion-MNIST with its label files, or an image "
                             "folder with one subfolder per class)")
        gen.manual_seed(noise_seed(seed, 2 * i))
        feats = encoder(images, gen)
        for key, f in feats.items():
            pooled.setdefault(key, []).append(f.float().mean(dim=(2, 3)))
        if second_draw:
            gen.manual_seed(noise_seed(seed, 2 * i + 1))
            again = encoder(images, gen)
            for key, f in feats.items():
                corr_sum[key] = corr_sum.get(key, 0.0) + noise_correlation(f, again[key]).sum().item()
        labels.append(batch["labels"])
        n += len(images)
    if n == 0:
        raise ValueError(f"{desc}: the data yielded no readable images")
    fractions = {key: 1.0 - s / n for key, s in corr_sum.items()}
    return {k: torch.cat(v) for k, v in pooled.items()}, torch.cat(labels), fractions


def probe_rows(
    encoder: Encoder, train_loader, test_loader, *, seed: int = 0, knn_k: int = 20, desc: str = ""
) -> dict[Any, dict[str, float]]:
    """{tap: {"linear", "knn", "noise_fraction"}} for one encoder (one teacher at one timestep)."""
    train, y_train, _ = encode_split(encoder, train_loader, seed, desc=f"{desc} train")
    test, y_test, fractions = encode_split(encoder, test_loader, seed + 1, second_draw=True, desc=f"{desc} test")
    rows = {}
    for key in train:
        rows[key] = {
            "linear": linear_probe(train[key], y_train, test[key], y_test, seed=seed)["top1"],
            "knn": knn_classify(train[key], y_train, test[key], y_test, k=knn_k)["top1"],
            "noise_fraction": fractions[key],
        }
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| t | tap | stride | channels | linear top-1 | kNN top-1 | noise fraction |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['timestep']} | {r['tap']} | {r['stride']} | {r['channels']} | {r['linear']:.2f} | "
                     f"{r['knn']:.2f} | {r['noise_fraction']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="teacher, data and preprocessing from this recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, repeatable (e.g. --set teacher.source=DIR)")
    p.add_argument("--teacher", help="teacher folder / Hub id (default: the recipe's teacher.source)")
    p.add_argument("--timesteps", default=None,
                   help="comma-separated timesteps to probe (default: 10, 50, 150 and the recipe's)")
    p.add_argument("--taps", nargs="*", help="candidate module names (default: every decoder level before its "
                                             "upsampler; they must sit at distinct strides)")
    p.add_argument("--data-dir", help="labelled data: Fashion-MNIST IDX folder or an image folder of class folders")
    p.add_argument("--train-images", type=int, default=6000, help="labelled images to fit the probes on")
    p.add_argument("--test-images", type=int, default=2000,
                   help="labelled images of --split to score top-1 on (default 2000)")
    p.add_argument("--split", choices=SPLITS, default="validation",
                   help="score on the validation carve of train (default: this tool is for choosing) or on test")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the rows, settings and machine as JSON here")
    args = p.parse_args(argv)
    try:
        args.timesteps = None if args.timesteps is None else [int(t) for t in args.timesteps.split(",") if t]
    except ValueError:
        p.error(f"--timesteps takes comma-separated integers, got {args.timesteps!r}")
    for name in ("train_images", "test_images", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from training.run.data import ImageDataset, build_dataloader, build_transform
    from training.teacher.build import build_teacher
    from training.teacher.taps import default_tap_names

    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    recipe = apply_overrides(get_recipe(args.recipe), args.overrides)
    timesteps = args.timesteps or sorted({10, 50, 150, recipe.teacher.timestep})
    transform = build_transform(recipe.data, train=False)

    splits = load_scored_splits(args.data_dir, args.split, recipe)

    def loader(hf, pool: np.ndarray, limit: int, seed: int):
        subset = torch.utils.data.Subset(ImageDataset(hf, transform), pool[subsample(len(pool), limit, seed)].tolist())
        return build_dataloader(subset, args.batch_size, shuffle=False, drop_last=False, num_workers=args.num_workers)

    train_loader = loader(splits.fit, splits.fit_pool, args.train_images, args.seed)
    test_loader = loader(splits.score, splits.score_pool, args.test_images, args.seed + 1)
    source = args.teacher or recipe.teacher.source
    config = dataclasses.replace(recipe.teacher, source=source)
    teacher = build_teacher(config, recipe.data.mean, recipe.data.std, taps=tuple(args.taps or ()))
    every_level = default_tap_names(teacher.unet, len(teacher.unet.up_blocks))
    if not args.taps and len(every_level) > len(teacher.taps):
        teacher = build_teacher(config, recipe.data.mean, recipe.data.std, taps=every_level)
    num_train = int(teacher.scheduler.config.num_train_timesteps)
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad:
        raise ValueError(f"--timesteps {bad} outside the teacher's range [0, {num_train - 1}]")
    rows, started = [], time.perf_counter()
    by_stride = {tap.stride: tap for tap in teacher.taps}
    for t in timesteps:
        teacher.timestep = t
        for stride, r in probe_rows(teacher, train_loader, test_loader, seed=args.seed, desc=f"t={t}").items():
            tap = by_stride[stride]
            rows.append({"timestep": t, "tap": tap.name, "stride": stride, "channels": tap.channels, **r})
        logger.info("t=%d probed (%.0f s so far)", t, time.perf_counter() - started)
    print(format_table(rows))
    if args.out:
        report = {"teacher": source, "recipe": recipe.name, "rows": rows, "machine": machine_info(),
                  "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "seconds": round(time.perf_counter() - started, 1)}
        write_report(args.out, report)
    return rows


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
