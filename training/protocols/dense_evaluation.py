"""One segmentation evaluation of a backbone: the masked data, the validation carve, the label counts, the report.

`evaluate_segmentation(make_pyramid, config)` runs each protocol (training/protocols/segmentation.py) at each label
count on a fresh copy of the backbone (`make_pyramid()` builds one), chooses its state on validation and scores
the test split once. The data is a DDPM-seg layout folder (training/labels/dense_masks.py): the Fashion-MNIST
scenes of training/make_scenes.py or a real benchmark (ffhq_34, bedroom_28, ...).

Validation is carved from the train split once, the same for every seed and method: the last `val_images` train
images in name order (the scenes are drawn independently, so that is a random carve; `train_interpreter.py --task
masks`, which labels the first N, never touches it). The labelled images of a run are the first N of a
seed-dependent permutation of the rest, so seeds draw different labelled sets and a larger N of the same seed
contains the smaller ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from argparse import ArgumentTypeError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamteacher_models.recipes import Recipe
from training.labels.dense_masks import MaskedImages, split_folder
from training.protocols.segmentation import (
    MODES,
    SegmentationConfig,
    build_head,
    iou_scores,
    score,
    train_segmentation,
)
from training.run.data import build_transform
from training.run.hardware import machine_info

logger = logging.getLogger("dreamteacher.evaluate_segmentation")


@dataclasses.dataclass(frozen=True)
class DenseEvalConfig:
    data_dir: str
    num_classes: int
    labels: Sequence[int | None] = (20, 200, None)  # labelled train images per run; None = all but validation
    protocols: Sequence[str] = MODES
    val_images: int | None = None  # default: a fifth of the train images, at most 500
    image_size: int | None = None  # default: the first train image's height
    max_test: int | None = None  # the first N test images (quick runs)
    frozen: SegmentationConfig = SegmentationConfig(mode="frozen", lr=1e-2, steps=300)
    finetune: SegmentationConfig = SegmentationConfig(mode="finetune", lr=1e-3, steps=300)
    eval_batch_size: int = 100
    seed: int = 0
    device: str | None = None
    progress: bool = True
    pictures: str | None = None  # write a picture of test predictions here (one per protocol and label count)


def label_counts(text: str) -> list[int | None]:
    """'20,200,all' -> [20, 200, None]."""
    counts: list[int | None] = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        if item == "all":
            counts.append(None)
            continue
        try:
            counts.append(int(item))
        except ValueError:
            raise ArgumentTypeError(f"--labels takes counts or 'all', comma-separated; got {item!r}") from None
        if counts[-1] < 1:
            raise ArgumentTypeError(f"--labels counts must be >= 1, got {item}")
    if not counts:
        raise ArgumentTypeError("--labels is empty")
    return counts


def carve_validation(n: int, val_images: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(the train indices left for labels, the validation indices): the last `val_images` train images by name
    (default a fifth, at most 500), the same for every seed and method."""
    val = min(500, n // 5) if val_images is None else val_images
    if not 0 < val < n:
        raise ValueError(f"validation needs between 1 and {n - 1} of the {n} train images, got {val} (at least 2 "
                         "train images are needed)")
    return np.arange(n - val), np.arange(n - val, n)


def labelled_subset(pool: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """The first `count` of a seeded permutation of `pool` (all of it for None)."""
    if count is not None and not 1 <= count <= len(pool):
        raise ValueError(f"--labels {count}: the train split has {len(pool)} images outside validation")
    return np.random.default_rng(seed).permutation(pool)[: count or len(pool)]


def eval_transform(recipe: Recipe, image_size: int):
    data = dataclasses.replace(recipe.data, input_size=(3, image_size, image_size), crop_pct=1.0)
    return build_transform(data, train=False)


def evaluate_segmentation(make_pyramid: Callable[[], torch.nn.Module], recipe: Recipe, config: DenseEvalConfig,
                          model_name: str = "model") -> dict[str, Any]:
    """Every protocol x label count of `config` on fresh pyramids; returns the JSON report."""
    c = config
    t_start = time.perf_counter()
    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_folder, test_folder = split_folder(c.data_dir, "train"), split_folder(c.data_dir, "test")
    probe = MaskedImages(train_folder, c.num_classes, lambda im: im, (1, 1))
    if len(probe) < 2:
        raise ValueError(f"{train_folder} holds {len(probe)} labelled image(s); at least 2 are needed")
    size = c.image_size or probe.read(0)[0].height
    transform = eval_transform(recipe, size)
    train_all = MaskedImages(train_folder, c.num_classes, transform, (size, size))
    test_set = MaskedImages(test_folder, c.num_classes, transform, (size, size), limit=c.max_test)
    pool, val_idx = carve_validation(len(train_all), c.val_images)
    val_set = torch.utils.data.Subset(train_all, val_idx.tolist())

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=c.eval_batch_size, shuffle=False)

    results: dict[str, dict[str, Any]] = {}
    for mode in c.protocols:
        seg = c.frozen if mode == "frozen" else c.finetune
        results[mode] = {}
        for count in c.labels:
            key = str(count or "all")
            idx = labelled_subset(pool, count, c.seed)
            t0 = time.perf_counter()
            torch.manual_seed(c.seed)
            pyramid = make_pyramid()
            head = build_head(mode, pyramid.channels, c.num_classes)
            fit = train_segmentation(pyramid, head, torch.utils.data.Subset(train_all, idx.tolist()), loader(val_set),
                                     c.num_classes, seg, device, seed=c.seed, desc=f"{mode} {key} labels",
                                     progress=c.progress)
            confusion = score(pyramid, head, loader(test_set), c.num_classes, device, f"test {mode} {key}",
                              c.progress)
            miou, per_class = iou_scores(confusion)
            results[mode][key] = {"miou": round(miou, 2),
                                  "per_class_iou": [None if v is None else round(v, 2) for v in per_class],
                                  "labelled_images": int(len(idx)), "val_miou": fit["val_miou"],
                                  "best_step": fit["best_step"], "val_history": fit["history"],
                                  "seconds": round(time.perf_counter() - t0, 1)}
            logger.info("%s, %s labels: test mIoU %.2f (validation %.2f at step %d)", mode, key, miou,
                        fit["val_miou"], fit["best_step"])
            if c.pictures:
                from training.protocols.mask_pictures import save_mask_picture

                path = Path(c.pictures) / f"{mode}_{key}.png"
                save_mask_picture(pyramid, head, test_set, path, device)
    settings = {"data": str(c.data_dir), "num_classes": c.num_classes, "image_size": size,
                "train_images": len(train_all), "labelled_pool": int(len(pool)), "val_images": int(len(val_idx)),
                "test_images": len(test_set), "recipe": recipe.name, "seed": c.seed,
                "frozen": dataclasses.asdict(c.frozen), "finetune": dataclasses.asdict(c.finetune),
                "selection": "the state with the best validation mIoU; test scored once with it"}
    return {"model": model_name, "results": results, "settings": settings, "machine": machine_info(device),
            "seconds": round(time.perf_counter() - t_start, 1)}


def format_table(report: dict[str, Any]) -> str:
    lines = ["| protocol | labelled images | test mIoU | validation mIoU |", "|---|---|---|---|"]
    for mode, rows in report["results"].items():
        for key, row in rows.items():
            lines.append(f"| {mode} | {row['labelled_images']} ({key}) | {row['miou']:.2f} | {row['val_miou']:.2f} |")
    return "\n".join(lines)
