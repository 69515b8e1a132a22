"""Classification protocols on a backbone's pooled features (C5, global average): a linear probe (L-BFGS
logistic regression, weight decay chosen on a hold-out), the InstDisc/DINO weighted kNN, and few-label fine-tuning
of the whole backbone with a fresh linear head."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training.run.schedule import cosine_with_warmup

logger = logging.getLogger("dreamteacher.evaluate")

DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)  # the linear probe chooses among these on a hold-out


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
