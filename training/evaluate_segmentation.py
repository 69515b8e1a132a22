"""Semantic segmentation of any timm backbone's C2..C5 features: frozen per-pixel linear, and fine-tuned FPN.

    python training/make_scenes.py                                                  # the offline benchmark, once
    python training/evaluate_segmentation.py --checkpoint runs/resnet18.dreamteacher_fmnist \
        --data-dir datasets/fmnist_scenes_11 --out seg.json --pictures seg_pictures
    python training/evaluate_segmentation.py --model resnet18 --random-init --data-dir datasets/fmnist_scenes_11
    python training/evaluate_segmentation.py --model local-dir:runs/x/export --data-dir datasets/ffhq_34 --labels 16,all

Data: a folder in the DDPM-seg layout (real/train, real/test: images + .npy class masks; training/labels/
dense_masks.py): the Fashion-MNIST scenes of training/make_scenes.py, or ffhq_34, bedroom_28, ... as published.
The class count comes from `--num-classes`, a card.json beside the data, or the folder's name.

Protocols (training/protocols/segmentation.py): `frozen`, a per-pixel linear classifier on every level upsampled
to the stride-4 grid and concatenated (the backbone frozen: it measures the features); `finetune`, the backbone
plus a light Semantic-FPN head trained end to end. Each runs at every `--labels` count (labelled train images;
`all` = every train image outside validation) for a fixed number of steps; validation is carved from the train
split (fixed, whatever the seed), the state with the best validation mIoU is kept and the test split is scored once.

Images are resized to `--image-size` (default: the data's own size) and normalised with the recipe's mean/std (the
run's / export's recipe.json, `--recipe`, or the default). Output: a table on stdout; `--out` the JSON report (mIoU
and per-class IoU per protocol and label count, validation curve, settings, machine); `--pictures DIR` a picture
of test predictions next to the truth per protocol and label count.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import logging  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from training.labels.dense_masks import num_classes_of  # noqa: E402
from training.protocols.dense_evaluation import (  # noqa: E402
    DenseEvalConfig,
    evaluate_segmentation,
    format_table,
    label_counts,
)
from training.protocols.segmentation import MODES, Pyramid  # noqa: E402
from training.run.backbones import load_backbone, recipe_for_model  # noqa: E402
from training.run.layout import write_report  # noqa: E402


def protocols(text: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in MODES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown protocol(s) {bad or text!r}; allowed: {', '.join(MODES)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DenseEvalConfig(data_dir="", num_classes=0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="timm name, local-dir:PATH, hf-hub:ID, or an architecture with --random-init")
    m.add_argument("--random-init", action="store_true", help="random weights: the baseline")
    m.add_argument("--checkpoint", help="a training run dir, checkpoint dir or .safetensors file")
    m.add_argument("--recipe", help="recipe for the normalisation (default: the run's/export's, else the default)")
    a = p.add_argument_group("data")
    a.add_argument("--data-dir", required=True, help="DDPM-seg layout folder (real/train, real/test)")
    a.add_argument("--num-classes", type=int, help="classes (default: card.json, else the folder's name)")
    a.add_argument("--image-size", type=int, help="side the images and masks are resized to (default: the data's)")
    a.add_argument("--val-images", type=int, help="train images carved off for validation (default: a fifth, <= 500)")
    a.add_argument("--max-test", type=int, help="score the first N test images only (quick runs)")
    e = p.add_argument_group("protocols")
    e.add_argument("--protocols", type=protocols, default=list(MODES), help="frozen,finetune (default both)")
    e.add_argument("--labels", type=label_counts, default=list(d.labels),
                   help="labelled train images per run, comma-separated, 'all' = all (default 20,200,all)")
    e.add_argument("--steps", type=int, help=f"steps per run (default {d.frozen.steps})")
    e.add_argument("--batch-size", type=int, help=f"images per step (default {d.frozen.batch_size})")
    e.add_argument("--frozen-lr", type=float, default=d.frozen.lr, help=f"frozen head's lr (default {d.frozen.lr})")
    e.add_argument("--finetune-lr", type=float, default=d.finetune.lr,
                   help=f"fine-tune lr, backbone and head (default {d.finetune.lr})")
    e.add_argument("--eval-every", type=int, help=f"validate every N steps (default {d.frozen.eval_every})")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="labelled subset, init and order (default 0)")
    r.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    r.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    r.add_argument("--out", help="write the JSON report here")
    r.add_argument("--pictures", metavar="DIR", help="write test-prediction pictures here")
    r.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.model and not args.checkpoint:
        p.error("pass --model NAME or --checkpoint RUN_DIR")
    for name in ("steps", "batch_size", "eval_every", "image_size", "val_images", "max_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("frozen_lr", "finetune_lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    return args


def config_from_args(args: argparse.Namespace) -> DenseEvalConfig:
    d = DenseEvalConfig(data_dir="", num_classes=0)
    common = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                ("eval_every", args.eval_every)) if v is not None}
    return DenseEvalConfig(
        data_dir=args.data_dir, num_classes=num_classes_of(args.data_dir, args.num_classes), labels=args.labels,
        protocols=args.protocols, val_images=args.val_images, image_size=args.image_size, max_test=args.max_test,
        frozen=replace(d.frozen, lr=args.frozen_lr, **common), finetune=replace(d.finetune, lr=args.finetune_lr,
                                                                                **common),
        seed=args.seed, device=args.device, progress=not args.no_progress, pictures=args.pictures)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    recipe, _ = recipe_for_model(args.model, args.recipe, args.checkpoint)
    name = args.model or f"{recipe.arch} ({args.checkpoint})"

    def make_pyramid():
        torch.manual_seed(args.seed)
        model = load_backbone(args.model, random_init=args.random_init, checkpoint=args.checkpoint, recipe=recipe)
        return Pyramid(model, name)

    report = evaluate_segmentation(make_pyramid, recipe, config, model_name=name)
    print(f"\n{name}: {config.data_dir}, {report['settings']['num_classes']} classes, "
          f"{report['settings']['test_images']} test images, {report['seconds']:.0f} s\n")
    print(format_table(report))
    if args.out:
        print(f"\nwrote {write_report(args.out, report)}")
    return report


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
