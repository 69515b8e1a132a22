"""Downstream evaluation of any timm backbone: linear probe, kNN, and fine-tuning with 1% / 10% of the labels.

    python training/evaluate.py --model resnet18 --random-init                      # a random-init baseline
    python training/evaluate.py --checkpoint runs/resnet18.dreamteacher_fmnist        # a training run (recipe.json)
    python training/evaluate.py --model local-dir:runs/resnet18.dreamteacher_fmnist/export --out results.json
    python training/evaluate.py --model resnet18.dreamteacher_fmnist                  # registered name (published)
    python -m training.evaluate --model hf-hub:dreamteacher/resnet18.dreamteacher_fmnist --protocols linear,knn

Protocols (all on a labeled dataset: by default Fashion-MNIST train to fit, t10k to report top-1 in percent):

* ``linear``: global-average-pooled features of the frozen backbone (eval mode, no_grad, computed once for train and
  test), standardised with the train mean/std, then a multinomial logistic regression fitted full-batch with L-BFGS;
  its L2 weight decay is picked from a small grid on a seeded 10% hold-out of the train features (the search fits at
  most 10k of them), then the probe is refitted on all of them.
* ``knn``: the InstDisc / DINO weighted kNN on the same cached features: cosine similarity, the k=20 nearest train
  features vote for their class with weight exp(sim / 0.07).
* ``finetune``: the whole backbone plus a fresh linear head, trained on a class-balanced subset of the train labels
  (1% and 10%, chosen with the seed) with AdamW, linear warm-up + cosine decay, horizontal flips; test top-1.

Images go through the recipe's eval transform (`build_transform(recipe.data, train=False)`; the fine-tune adds the
flip). The recipe is `--recipe`, else the one a run / export folder carries (recipe.json), else the model name's
own recipe when it is a DreamTeacher checkpoint, else the default (resnet18.dreamteacher_fmnist, 32 px).

Output: a markdown table (protocol, metric, value) on stdout and, with `--out`, a JSON file
``{"model", "results": {protocol: {"top1": ...}}, "settings", "details", "machine", "seconds"}`` whose ``results``
is what ``python -m hub.export --results`` renders into the model card. Given the seed and the thread count,
every number is reproducible.

Cost: see the README / `--help` defaults; on 2 uncontended CPU cores a 32-px resnet18 evaluation with the defaults
is meant to take well under ten minutes. `--max-train` / `--max-test` subsample (seeded) for quick runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/evaluate.py` puts training/, not the repo root, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dreamteacher_models.recipes import DEFAULT_RECIPE, Recipe, UnknownRecipeError, get_recipe
from training.hardware import cpu_name

logger = logging.getLogger("dreamteacher.evaluate")

PROTOCOLS = ("linear", "knn", "finetune")
DEFAULT_FRACTIONS = (0.01, 0.1)
DEFAULT_FT_EPOCHS = (40, 8)  # per fraction: 360 + 744 steps of 64 (~71k images): ~3 min for a 32-px resnet18, 2 cores
DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Features


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled features (B, D): timm's pre-logits output, whatever head the model carries."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    out = model(x)
    return out.mean(dim=(2, 3)) if out.ndim == 4 else out


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: str | torch.device = "cpu",
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone over `loader` in eval mode: (features float32 (N, D) on CPU, labels int64 (N,)).

    Batches are `collate_skip_bad` dicts; unreadable images are dropped together with their labels (and counted in
    a warning), so features and labels always stay aligned.
    """
    was_training = model.training
    model.eval()
    feats, labels, skipped = [], [], 0
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            skipped += int(batch.get("num_skipped", 0))
            x = batch["pixel_values"]
            if x.numel() == 0:
                continue
            if "labels" not in batch:
                raise ValueError("the dataset yields no labels; the evaluation protocols need labeled images")
            feats.append(pooled_features(model, x.to(device)).float().cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    if skipped:
        logger.warning("%s: skipped %d unreadable images", desc, skipped)
    if not feats:
        raise ValueError(f"{desc}: no readable images")
    return torch.cat(feats), torch.cat(labels)


def _top1(pred: torch.Tensor, target: torch.Tensor) -> float:
    return 100.0 * (pred.cpu() == target.cpu()).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------
# Linear probe


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS (strong Wolfe): mean CE + wd/2 * ||W||^2 (bias free)."""
    linear = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)  # zero start: the fit is a deterministic function of the data
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y) + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return linear


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    max_iter: int = 100,
    select_max_samples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Logistic-regression probe on standardised frozen features; returns ``{"top1", "weight_decay", "val_top1",
    "predictions"}``.

    With several `weight_decays`, each is fitted on the train features minus a seeded `val_fraction` hold-out (at most
    `select_max_samples` of them, to keep the search cheap; the hold-out at most half that) and the best hold-out top-1
    wins (ties: the larger decay); the probe is then refitted on all train features with the chosen decay.
    """
    x_train, x_test = train_features.float(), test_features.float()
    y_train, y_test = train_labels.long(), test_labels.long()
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if not weight_decays:
        raise ValueError("weight_decays must hold at least one value")
    decays = sorted(float(w) for w in weight_decays)
    chosen, val_scores = decays[0], {}
    n_val = min(int(round(val_fraction * len(x_train))), select_max_samples // 2)
    if len(decays) > 1 and 0 < n_val < len(x_train):
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        val, fit = perm[:n_val], perm[n_val:n_val + select_max_samples]
        for wd in decays:
            probe = _fit_logreg(x_train[fit], y_train[fit], num_classes, wd, max_iter)
            with torch.no_grad():
                val_scores[wd] = _top1(probe(x_train[val]).argmax(1), y_train[val])
        chosen = max(decays, key=lambda w: (val_scores[w], w))
    probe = _fit_logreg(x_train, y_train, num_classes, chosen, max_iter)
    with torch.no_grad():
        pred = probe(x_test).argmax(1)
    return {"top1": _top1(pred, y_test), "weight_decay": chosen, "val_top1": val_scores, "predictions": pred}


# ---------------------------------------------------------------------------------------------------------------
# kNN


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Weighted kNN (InstDisc / DINO): cosine similarity, each of the k nearest train features votes for its label
    with weight exp(sim / temperature). Returns ``{"predictions"}`` plus ``"top1"`` (percent) when labels are given.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk_size):
        sim, idx = (test[start:start + chunk_size] @ train.T).topk(k, dim=1)  # (b, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    out: dict[str, Any] = {"predictions": pred}
    if test_labels is not None:
        out["top1"] = _top1(pred, test_labels)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning with few labels


def balanced_subset(labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset holding ~`fraction` of the labels: the same number per class,
    round(fraction * N / num_classes) (at least 1; a smaller class gives all it has), drawn with `seed`."""
    check_fraction(fraction)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    classes = np.unique(labels)
    if len(classes) == 0:
        raise ValueError("no labels to draw a subset from")
    per_class = max(1, int(round(fraction * len(labels) / len(classes))))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            logger.warning("class %d has %d images, fewer than the %d per class asked for: taking all of them",
                           c, len(members), per_class)
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"label fraction must be in (0, 1] (e.g. 0.01 for 1%), got {fraction!r}")
    return float(fraction)


class Classifier(nn.Module):
    """A backbone's pooled features followed by a linear head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, x))


def _num_features(model: nn.Module, input_size: Sequence[int]) -> int:
    if getattr(model, "num_features", None):
        return int(model.num_features)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dim = pooled_features(model, torch.zeros(1, *input_size, device=next(model.parameters()).device)).shape[1]
    model.train(was_training)
    return int(dim)


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, device: str | torch.device = "cpu",
            desc: str = "test", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, labels) of a classifier over a labeled loader, in eval mode."""
    model.eval()
    preds, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        if batch["pixel_values"].numel() == 0:
            continue
        preds.append(model(batch["pixel_values"].to(device)).argmax(1).cpu())
        labels.append(batch["labels"])
    return torch.cat(preds), torch.cat(labels)


def finetune(
    model: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    test_loader: torch.utils.data.DataLoader,
    *,
    num_classes: int,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    input_size: Sequence[int] = (3, 32, 32),
    desc: str = "fine-tune",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a copy of `model` (the original is left untouched) with a fresh linear head.

    AdamW on every parameter (no decay on biases and norms), per-step linear warm-up over `warmup_fraction` of the
    steps then cosine decay to 0, `epochs` passes over `train_loader` (whose transform should carry the augmentation;
    its `EpochSeededSampler` gets `set_epoch` each epoch). Returns ``{"top1", "steps", "train_images", "final_loss"}``
    (the final loss is a running average over the last steps).
    """
    from training.schedule import cosine_with_warmup

    if epochs < 1:
        raise ValueError(f"fine-tune epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)  # the head's init and the flips are drawn from the global generator
    backbone = copy.deepcopy(model)
    classifier = Classifier(backbone, _num_features(backbone, input_size), num_classes).to(device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{desc}: the training loader yields no batches (subset smaller than the batch size?)")
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_fraction * total))
    from timm.optim import create_optimizer_v2

    # AdamW; timm leaves biases and norm weights out of the weight decay
    optimizer = create_optimizer_v2(classifier, "adamw", lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    classifier.train()
    step, seen, loss_ema, skipped = 0, 0, None, 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for epoch in range(epochs):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for batch in train_loader:
            skipped += int(batch.get("num_skipped", 0))
            x = batch["pixel_values"]
            if x.shape[0] >= 2:  # BatchNorm needs two samples; an all-bad batch is empty
                loss = F.cross_entropy(classifier(x.to(device)), batch["labels"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += x.shape[0]
                loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
                bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            scheduler.step()
            step += 1
            bar.update(1)
        logger.info("%s epoch %d/%d: loss %.4f", desc, epoch + 1, epochs, loss_ema if loss_ema is not None else -1)
    bar.close()
    if skipped:
        logger.warning("%s: skipped %d unreadable training images", desc, skipped)
    pred, labels = predict(classifier, test_loader, device, desc=f"{desc} test", progress=progress)
    return {"top1": _top1(pred, labels), "steps": step, "train_images": seen, "final_loss": loss_ema}


# ---------------------------------------------------------------------------------------------------------------
# Model and data resolution


def _is_local_dir_spec(spec: str) -> bool:
    return spec.startswith("local-dir:")


def resolve_recipe(model_spec: str | None, recipe: Recipe | str | None = None,
                   checkpoint: str | os.PathLike | None = None) -> tuple[Recipe, str]:
    """The recipe whose eval transform to use, and where it came from."""
    from training.run_layout import find_run_recipe

    if recipe is not None:
        return (get_recipe(recipe) if isinstance(recipe, str) else recipe), "--recipe"
    if checkpoint is not None:
        found = find_run_recipe(Path(checkpoint))
        if found is not None:
            return found, f"recipe.json of {checkpoint}"
    if model_spec and _is_local_dir_spec(model_spec):
        found = find_run_recipe(Path(model_spec.removeprefix("local-dir:")))
        if found is not None:
            return found, f"recipe.json of {model_spec}"
    if model_spec:
        try:
            return get_recipe(model_spec), "model name"
        except UnknownRecipeError:
            pass
    return get_recipe(DEFAULT_RECIPE), "default"


def load_backbone(
    model_spec: str | None,
    *,
    random_init: bool = False,
    checkpoint: str | os.PathLike | None = None,
    recipe: Recipe | None = None,
) -> nn.Module:
    """A headless (num_classes=0) timm backbone in eval mode.

    `checkpoint`: a training run / checkpoint folder / .safetensors file; its student weights are loaded into
    `recipe`'s architecture (or `model_spec`'s, when given). Otherwise `model_spec` is anything
    `timm.create_model` takes: a registered name (DreamTeacher tags included), ``local-dir:PATH``, ``hf-hub:ID``,
    or a plain architecture (with `random_init`).
    """
    import timm

    import dreamteacher_models  # noqa: F401 - registers the DreamTeacher tags with timm

    if checkpoint is not None:
        import safetensors.torch

        from hub.export import load_student
        from training.run_layout import find_run_checkpoint

        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        weights = safetensors.torch.load_file(find_run_checkpoint(path))
        if recipe is None:
            raise ValueError(f"no recipe found for checkpoint {path}: pass --recipe NAME")
        if model_spec and model_spec.split(".")[0] != recipe.arch:
            raise ValueError(f"--model {model_spec} does not match the checkpoint recipe's architecture {recipe.arch}")
        return load_student(recipe, weights).eval()
    if not model_spec:
        raise ValueError("nothing to evaluate: pass --model NAME (or --checkpoint RUN_DIR)")
    if _is_local_dir_spec(model_spec):  # an export: its files must match its SHA256SUMS before they are trusted
        from hub.export import CHECKSUMS_FILENAME, verify_checksums

        folder = Path(model_spec.removeprefix("local-dir:")).expanduser()
        if (folder / CHECKSUMS_FILENAME).is_file():
            verify_checksums(folder)
    model = timm.create_model(model_spec, pretrained=not random_init, num_classes=0)
    return model.eval()


def _load_split(data_dir: str | None, split: str, recipe: Recipe):
    from training.data import data_source, load_image_dataset

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


def _per_fraction(values: int | Sequence[int], fractions: Sequence[float], name: str) -> list[int]:
    values = [values] if isinstance(values, int) else list(values)
    if len(values) == 1:
        values = values * len(fractions)
    if len(values) != len(fractions):
        raise ValueError(f"{name}: give one value or one per fraction ({len(fractions)}), got {values}")
    return [int(v) for v in values]


def fraction_key(fraction: float) -> str:
    return f"fine-tune {fraction * 100:g}%"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(
    model_spec: str | nn.Module | None = None,
    *,
    protocols: str | Sequence[str] | None = None,
    random_init: bool = False,
    checkpoint: str | os.PathLike | None = None,
    recipe: Recipe | str | None = None,
    data_dir: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    probe_weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    probe_max_iter: int = 100,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ft_epochs: int | Sequence[int] = DEFAULT_FT_EPOCHS,
    ft_batch_size: int = 64,
    ft_lr: float = 1e-3,
    ft_weight_decay: float = 0.05,
    ft_warmup: float = 0.05,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen protocols on one backbone; returns the report that `main` writes as JSON.

    `model_spec`: a `timm.create_model` name (see `load_backbone`) or an already built backbone (nn.Module).
    """
    from training.data import ImageDataset, build_dataloader, build_transform

    t_start = time.perf_counter()
    protocols = parse_protocols(protocols)
    fractions = [check_fraction(f) for f in fractions] if "finetune" in protocols else list(fractions)
    epochs = _per_fraction(ft_epochs, fractions, "ft_epochs") if "finetune" in protocols else []
    if threads:
        torch.set_num_threads(int(threads))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    spec_name = model_spec if isinstance(model_spec, str) or model_spec is None else type(model_spec).__name__
    recipe, recipe_source = resolve_recipe(spec_name if isinstance(model_spec, str) else None, recipe, checkpoint)
    if isinstance(model_spec, nn.Module):
        model, weights = model_spec.eval(), "given module"
    else:
        torch.manual_seed(seed)  # random init is reproducible too
        model = load_backbone(model_spec, random_init=random_init, checkpoint=checkpoint, recipe=recipe)
        weights = f"checkpoint {checkpoint}" if checkpoint else ("random init" if random_init else "pretrained")
    model = model.to(device)
    model_name = spec_name or f"{recipe.arch} ({checkpoint})"

    train_hf, test_hf = _load_split(data_dir, "train", recipe), _load_split(data_dir, "test", recipe)
    train_idx = subsample(len(train_hf), max_train, seed)
    test_idx = subsample(len(test_hf), max_test, seed + 1)
    train_labels_all = dataset_labels(train_hf, "the train split")
    test_labels_all = dataset_labels(test_hf, "the test split")
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
        return build_dataloader(ds, bs, shuffle=shuffle, seed=seed, num_workers=num_workers, drop_last=drop_last)

    seconds["load"] = time.perf_counter() - t0
    results: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}

    if "linear" in protocols or "knn" in protocols:
        t0 = time.perf_counter()
        train_x, train_y = extract_features(model, loader(train_eval, batch_size), device, "features train", progress)
        test_x, test_y = extract_features(model, loader(test_eval, batch_size), device, "features test", progress)
        seconds["features"] = time.perf_counter() - t0
        details["feature_dim"] = int(train_x.shape[1])
        if "linear" in protocols:
            t0 = time.perf_counter()
            out = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes,
                               weight_decays=probe_weight_decays, max_iter=probe_max_iter, seed=seed)
            seconds["linear probe"] = time.perf_counter() - t0
            results["linear probe"] = {"top1": round(out["top1"], 2)}
            details["linear probe"] = {"weight_decay": out["weight_decay"],
                                       "val_top1": {f"{w:g}": round(v, 2) for w, v in out["val_top1"].items()}}
            logger.info("linear probe: top-1 %.2f%% (weight decay %g)", out["top1"], out["weight_decay"])
        if "knn" in protocols:
            t0 = time.perf_counter()
            out = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                               num_classes=num_classes)
            seconds[f"kNN k={k}"] = time.perf_counter() - t0
            results[f"kNN k={k}"] = {"top1": round(out["top1"], 2)}
            logger.info("kNN k=%d: top-1 %.2f%%", k, out["top1"])
        del train_x, test_x

    if "finetune" in protocols:
        train_tf = build_transform(recipe.data, train=True, hflip=True)
        train_aug = ImageDataset(train_hf, train_tf)
        labels = train_labels_all[train_idx]
        details["fine-tune"] = {}
        for fraction, n_epochs in zip(fractions, epochs, strict=True):
            key = fraction_key(fraction)
            t0 = time.perf_counter()
            subset = train_idx[balanced_subset(labels, fraction, seed)]
            if len(subset) < 2:
                raise ValueError(f"{key}: the subset holds {len(subset)} image(s); fine-tuning needs at least 2")
            bs = min(ft_batch_size, len(subset))
            train_loader = loader(torch.utils.data.Subset(train_aug, subset.tolist()), bs, shuffle=True,
                                  drop_last=True)
            out = finetune(model, train_loader, loader(test_eval, batch_size), num_classes=num_classes,
                           epochs=n_epochs, lr=ft_lr, weight_decay=ft_weight_decay, warmup_fraction=ft_warmup,
                           seed=seed, device=device, input_size=recipe.data.input_size, desc=key, progress=progress)
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
        "data": data_dir or recipe.data.name,
        "train_images": int(len(train_idx)),
        "test_images": int(len(test_idx)),
        "num_classes": num_classes,
        "seed": seed,
        "batch_size": batch_size,
        "knn": {"k": k, "temperature": temperature},
        "linear_probe": {"solver": "L-BFGS full batch, standardised features; decay chosen on a 10% hold-out",
                         "weight_decays": [float(w) for w in probe_weight_decays], "max_iter": probe_max_iter},
        "fine_tune": {"fractions": fractions, "epochs": epochs, "batch_size": ft_batch_size, "lr": ft_lr,
                      "weight_decay": ft_weight_decay, "warmup_fraction": ft_warmup,
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


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="timm name: registered (resnet18.dreamteacher_fmnist), local-dir:PATH, "
                                   "hf-hub:ID, or a plain architecture with --random-init")
    m.add_argument("--random-init", action="store_true", help="random weights (pretrained=False): the baseline")
    m.add_argument("--checkpoint", help="a training run dir, checkpoint dir or .safetensors file (student weights)")
    m.add_argument("--recipe", help="recipe for the eval transform (default: the run's/export's recipe.json, the "
                                    f"model name's recipe, else {DEFAULT_RECIPE})")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="folder of labeled images (IDX files, or imagefolder with train/ and test/); "
                                      "default: the recipe's dataset (Fashion-MNIST: the Debian folder)")
    d.add_argument("--max-train", type=int, help="use a seeded random N of the train images (quick runs)")
    d.add_argument("--max-test", type=int, help="use a seeded random N of the test images (quick runs)")
    d.add_argument("--batch-size", type=int, default=256, help="feature extraction / test batch size (default 256)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    e = p.add_argument_group("protocols")
    e.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated subset of {','.join(PROTOCOLS)}")
    e.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    e.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    e.add_argument("--probe-wd", type=_floats, default=list(DEFAULT_WEIGHT_DECAYS),
                   help="linear-probe L2 weight decays to choose from on a 10%% hold-out (default "
                        f"{','.join(f'{w:g}' for w in DEFAULT_WEIGHT_DECAYS)})")
    e.add_argument("--probe-iters", type=int, default=100, help="L-BFGS iterations per probe fit (default 100)")
    e.add_argument("--ft-fractions", type=_floats, default=list(DEFAULT_FRACTIONS),
                   help="label fractions in (0, 1] to fine-tune with (default 0.01,0.1)")
    e.add_argument("--ft-epochs", type=_ints, default=list(DEFAULT_FT_EPOCHS),
                   help="fine-tune epochs, one value or one per fraction (default 40,8)")
    e.add_argument("--ft-batch-size", type=int, default=64, help="fine-tune batch size (default 64)")
    e.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tune AdamW peak lr (default 1e-3)")
    e.add_argument("--ft-weight-decay", type=float, default=0.05, help="fine-tune AdamW weight decay (default 0.05)")
    e.add_argument("--ft-warmup", type=float, default=0.05, help="fraction of fine-tune steps warming up (0.05)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed for subsets, splits, init and order (default 0)")
    r.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    r.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    r.add_argument("--out", help="write the JSON report here (e.g. results.json, for hub.export --results)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.model and not args.checkpoint:
        p.error("pass --model NAME or --checkpoint RUN_DIR")
    try:
        parse_protocols(args.protocols)
        if "finetune" in parse_protocols(args.protocols):
            for f in args.ft_fractions:
                check_fraction(f)
            _per_fraction(args.ft_epochs, args.ft_fractions, "--ft-epochs")
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    report = evaluate(
        args.model, protocols=args.protocols, random_init=args.random_init, checkpoint=args.checkpoint,
        recipe=args.recipe, data_dir=args.data_dir, max_train=args.max_train, max_test=args.max_test, seed=args.seed,
        threads=args.threads, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers, k=args.k,
        temperature=args.temperature, probe_weight_decays=args.probe_wd, probe_max_iter=args.probe_iters,
        fractions=args.ft_fractions, ft_epochs=args.ft_epochs, ft_batch_size=args.ft_batch_size, ft_lr=args.ft_lr,
        ft_weight_decay=args.ft_weight_decay, ft_warmup=args.ft_warmup, progress=not args.no_progress,
    )
    print(f"\n{report['model']} ({report['settings']['weights']}), {report['settings']['train_images']} train / "
          f"{report['settings']['test_images']} test images, {report['machine']['threads']} threads, "
          f"{report['seconds']['total']:.0f} s\n")
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out)  # atomic: an interrupted write never leaves a half file
        print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    from training.cli import run

    run(main)
