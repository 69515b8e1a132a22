"""One downstream evaluation of a backbone: its data, the chosen protocols, and the JSON report.

`EvalConfig` holds every setting (like the recipes: one frozen declaration); `evaluate(model, config)` runs it. The
protocols themselves live in training/protocols/classification.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dreamteacher_models.recipes import Recipe
from training.protocols.classification import (
    DEFAULT_WEIGHT_DECAYS,
    balanced_subset,
    check_fraction,
    extract_features,
    finetune,
    knn_classify,
    linear_probe,
)
from training.protocols.splits import carve_validation_split, check_split
from training.run.backbones import load_backbone, recipe_for_model
from training.run.data import ImageDataset, build_dataloader, build_transform, data_source, load_image_dataset
from training.run.hardware import machine_info

logger = logging.getLogger("dreamteacher.evaluate")

PROTOCOLS = ("linear", "knn", "finetune")
DEFAULT_FRACTIONS = (0.01, 0.1)
DEFAULT_FT_EPOCHS = (40, 8)  # per fraction: 360 + 744 steps of 64, about 71k images


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every setting of one evaluation; the defaults are training/evaluate.py's."""

    protocols: str | Sequence[str] = PROTOCOLS
    data_dir: str | None = None  # labeled images; default: the recipe's dataset
    max_train: int | None = None  # a seeded random N of the train images
    max_test: int | None = None
    seed: int = 0  # subsets, splits, init and order
    threads: int | None = None
    device: str | None = None  # default: cuda when available
    batch_size: int = 256  # feature extraction and test batches
    num_workers: int = 0
    k: int = 20  # kNN neighbours
    temperature: float = 0.07  # kNN vote temperature
    probe_weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS  # chosen on a 10% hold-out of train
    probe_max_iter: int = 100  # L-BFGS iterations per probe fit
    fractions: Sequence[float] = DEFAULT_FRACTIONS  # label fractions to fine-tune with
    ft_epochs: int | Sequence[int] = DEFAULT_FT_EPOCHS  # one value or one per fraction
    ft_batch_size: int = 64
    ft_lr: float = 1e-3
    ft_weight_decay: float = 0.05
    ft_warmup: float = 0.05  # fraction of fine-tune steps warming up
    split: str = "test"  # scored on: "test" (reporting) or "validation" (carved from train; for choosing)
    progress: bool = True


def load_split(data_dir: str | None, split: str, recipe: Recipe):
    try:
        return load_image_dataset(data_source(data_dir), split, recipe_data=recipe.data)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"cannot load the {split!r} split for evaluation: {e}") from e


def dataset_labels(hf_dataset, what: str = "dataset") -> np.ndarray:
    """The ``label`` column as int64 (read without decoding images); a clear error when there is none."""
    features = getattr(hf_dataset, "features", None) or {}
    if "label" not in features:
        raise ValueError(
            f"{what} has no labels (columns: {', '.join(features) or 'none'}); the evaluation protocols need a "
            "labeled dataset: Fashion-MNIST IDX files with their label files, or an image folder with one "
            "subfolder per class"
        )
    labels = hf_dataset.with_format(None)["label"]
    missing = sum(label is None for label in labels)
    if missing:
        raise ValueError(f"{what} has no labels for {missing} of its {len(labels)} images; the evaluation protocols "
                         "need every image labeled (an image folder: one subfolder per class)")
    return np.asarray(labels, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class ScoredSplits:
    """The images a protocol fits on (`fit` at `fit_pool`) and scores on (`score` at `score_pool`), with labels."""

    fit: Any
    fit_labels: np.ndarray
    fit_pool: np.ndarray
    score: Any
    score_labels: np.ndarray
    score_pool: np.ndarray


def load_scored_splits(data_dir: str | None, split: str, recipe: Recipe) -> ScoredSplits:
    """split "test": fit on all of train, score on test. split "validation": score on the fixed validation carve of
    train (training/protocols/splits.py), fit on the rest; the test split is not even loaded."""
    train = load_split(data_dir, "train", recipe)
    train_labels = dataset_labels(train, "the train split")
    if check_split(split) == "validation":
        fit_pool, val_pool = carve_validation_split(train_labels)
        logger.info("scoring on the validation carve (%d train images, class-balanced, fixed); the test split is "
                    "not read", len(val_pool))
        return ScoredSplits(train, train_labels, fit_pool, train, train_labels, val_pool)
    test = load_split(data_dir, "test", recipe)
    test_labels = dataset_labels(test, "the test split")
    return ScoredSplits(train, train_labels, np.arange(len(train)), test, test_labels, np.arange(len(test)))


def subsample(n: int, max_n: int | None, seed: int) -> np.ndarray:
    """All of range(n), or a seeded random `max_n` of them (sorted)."""
    if max_n is None or max_n >= n:
        return np.arange(n)
    if max_n < 1:
        raise ValueError(f"--max-train/--max-test must be >= 1, got {max_n}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_n])


def parse_protocols(protocols: str | Sequence[str] | None) -> list[str]:
    if protocols is None:
        return list(PROTOCOLS)
    items = [p.strip().lower() for p in (protocols.split(",") if isinstance(protocols, str) else protocols)]
    items = [p for p in items if p]
    bad = [p for p in items if p not in PROTOCOLS]
    if bad or not items:
        raise ValueError(f"unknown protocol(s) {bad or protocols!r}; allowed: {', '.join(PROTOCOLS)} "
                         "(comma-separated, e.g. --protocols linear,knn)")
    return [p for p in PROTOCOLS if p in items]


def per_fraction(values: int | Sequence[int], fractions: Sequence[float], name: str) -> list[int]:
    values = [values] if isinstance(values, int) else list(values)
    if len(values) == 1:
        values = values * len(fractions)
    if len(values) != len(fractions):
        raise ValueError(f"{name}: give one value or one per fraction ({len(fractions)}), got {values}")
    return [int(v) for v in values]


def fraction_key(fraction: float) -> str:
    return f"fine-tune {fraction * 100:g}%"


def evaluate(
    model_spec: str | nn.Module | None = None,
    config: EvalConfig = EvalConfig(),
    *,
    random_init: bool = False,
    checkpoint: str | os.PathLike | None = None,
    recipe: Recipe | str | None = None,
) -> dict[str, Any]:
    """Run `config`'s protocols on one backbone; returns the report that training/evaluate.py writes as JSON.

    `model_spec`: a `timm.create_model` name (see `load_backbone`) or an already built backbone (nn.Module).
    """
    c = config
    t_start = time.perf_counter()
    protocols = parse_protocols(c.protocols)
    fractions = [check_fraction(f) for f in c.fractions] if "finetune" in protocols else list(c.fractions)
    epochs = per_fraction(c.ft_epochs, fractions, "ft_epochs") if "finetune" in protocols else []
    if c.threads:
        torch.set_num_threads(int(c.threads))
    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    spec_name = model_spec if isinstance(model_spec, str) or model_spec is None else type(model_spec).__name__
    recipe, recipe_source = recipe_for_model(spec_name if isinstance(model_spec, str) else None, recipe, checkpoint)
    if isinstance(model_spec, nn.Module):
        model, weights = model_spec.eval(), "given module"
    else:
        torch.manual_seed(c.seed)  # random init is reproducible too
        model = load_backbone(model_spec, random_init=random_init, checkpoint=checkpoint, recipe=recipe)
        weights = f"checkpoint {checkpoint}" if checkpoint else ("random init" if random_init else "pretrained")
    model = model.to(device)
    model_name = spec_name or f"{recipe.arch} ({checkpoint})"

    splits = load_scored_splits(c.data_dir, c.split, recipe)
    train_hf, train_labels_all = splits.fit, splits.fit_labels
    test_hf, test_labels_all = splits.score, splits.score_labels
    train_idx = splits.fit_pool[subsample(len(splits.fit_pool), c.max_train, c.seed)]
    test_idx = splits.score_pool[subsample(len(splits.score_pool), c.max_test, c.seed + 1)]
    if len(np.unique(train_labels_all[train_idx])) < 2:
        raise ValueError(
            f"the train split has a single label ({train_labels_all[train_idx][0]}) for all "
            f"{len(train_idx)} images; the protocols need at least two classes (an image folder whose images sit "
            "directly in train/ and test/ gets its split name as the only label: put them in one subfolder per class)"
        )
    num_classes = int(max(train_labels_all.max(), test_labels_all.max())) + 1
    eval_tf = build_transform(recipe.data, train=False)
    train_eval = torch.utils.data.Subset(ImageDataset(train_hf, eval_tf), train_idx.tolist())
    test_eval = torch.utils.data.Subset(ImageDataset(test_hf, eval_tf), test_idx.tolist())

    def loader(ds, bs, shuffle=False, drop_last=False):
        return build_dataloader(ds, bs, shuffle=shuffle, seed=c.seed, num_workers=c.num_workers, drop_last=drop_last)

    seconds["load"] = time.perf_counter() - t0
    results: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}

    if "linear" in protocols or "knn" in protocols:
        t0 = time.perf_counter()
        train_x, train_y = extract_features(model, loader(train_eval, c.batch_size), device, "features train",
                                            c.progress)
        test_x, test_y = extract_features(model, loader(test_eval, c.batch_size), device, "features test",
                                          c.progress)
        seconds["features"] = time.perf_counter() - t0
        details["feature_dim"] = int(train_x.shape[1])
        if "linear" in protocols:
            t0 = time.perf_counter()
            out = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes,
                               weight_decays=c.probe_weight_decays, max_iter=c.probe_max_iter, seed=c.seed)
            seconds["linear probe"] = time.perf_counter() - t0
            results["linear probe"] = {"top1": round(out["top1"], 2)}
            details["linear probe"] = {"weight_decay": out["weight_decay"],
                                       "val_top1": {f"{w:g}": round(v, 2) for w, v in out["val_top1"].items()}}
            logger.info("linear probe: top-1 %.2f%% (weight decay %g)", out["top1"], out["weight_decay"])
        if "knn" in protocols:
            t0 = time.perf_counter()
            out = knn_classify(train_x, train_y, test_x, test_y, k=c.k, temperature=c.temperature,
                               num_classes=num_classes)
            seconds[f"kNN k={c.k}"] = time.perf_counter() - t0
            results[f"kNN k={c.k}"] = {"top1": round(out["top1"], 2)}
            logger.info("kNN k=%d: top-1 %.2f%%", c.k, out["top1"])
        del train_x, test_x

    if "finetune" in protocols:
        train_tf = build_transform(recipe.data, train=True, hflip=True)
        train_aug = ImageDataset(train_hf, train_tf)
        labels = train_labels_all[train_idx]
        details["fine-tune"] = {}
        for fraction, n_epochs in zip(fractions, epochs, strict=True):
            key = fraction_key(fraction)
            t0 = time.perf_counter()
            subset = train_idx[balanced_subset(labels, fraction, c.seed)]
            if len(subset) < 2:
                raise ValueError(f"{key}: the subset holds {len(subset)} image(s); fine-tuning needs at least 2")
            bs = min(c.ft_batch_size, len(subset))
            train_loader = loader(torch.utils.data.Subset(train_aug, subset.tolist()), bs, shuffle=True,
                                  drop_last=True)
            out = finetune(model, train_loader, loader(test_eval, c.batch_size), num_classes=num_classes,
                           epochs=n_epochs, lr=c.ft_lr, weight_decay=c.ft_weight_decay, warmup_fraction=c.ft_warmup,
                           seed=c.seed, device=device, input_size=recipe.data.input_size, desc=key, progress=c.progress)
            seconds[key] = time.perf_counter() - t0
            results[key] = {"top1": round(out["top1"], 2)}
            details["fine-tune"][key] = {"images": int(len(subset)), "epochs": n_epochs, "steps": out["steps"],
                                         "batch_size": bs, "final_loss": out["final_loss"]}
            logger.info("%s: top-1 %.2f%% (%d images, %d steps)", key, out["top1"], len(subset), out["steps"])

    seconds["total"] = time.perf_counter() - t_start
    settings = {
        "protocols": protocols,
        "weights": weights,
        "recipe": recipe.name,
        "recipe_source": recipe_source,
        "input_size": list(recipe.data.input_size),
        "data": c.data_dir or recipe.data.name,
        "split": c.split,
        "train_images": int(len(train_idx)),
        "test_images": int(len(test_idx)),
        "num_classes": num_classes,
        "seed": c.seed,
        "batch_size": c.batch_size,
        "knn": {"k": c.k, "temperature": c.temperature},
        "linear_probe": {"solver": "L-BFGS full batch, standardised features; decay chosen on a 10% hold-out",
                         "weight_decays": [float(w) for w in c.probe_weight_decays], "max_iter": c.probe_max_iter},
        "fine_tune": {"fractions": fractions, "epochs": epochs, "batch_size": c.ft_batch_size, "lr": c.ft_lr,
                      "weight_decay": c.ft_weight_decay, "warmup_fraction": c.ft_warmup,
                      "optimizer": "AdamW", "schedule": "linear warm-up + cosine", "augmentation": "hflip"},
    }
    return {"model": model_name, "results": results, "settings": settings, "details": details,
            "machine": machine_info(device), "seconds": {k_: round(v, 2) for k_, v in seconds.items()}}


def format_table(report: dict[str, Any]) -> str:
    """Markdown table (protocol, metric, value) of a report's results."""
    lines = ["| protocol | metric | value |", "|---|---|---|"]
    for protocol, row in report["results"].items():
        for metric, value in row.items():
            lines.append(f"| {protocol} | {metric} | {value:.2f} |")
    return "\n".join(lines)


