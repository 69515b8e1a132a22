"""Semantic segmentation protocols on a backbone's multi-scale features (C2..C5): what DreamTeacher distils.

* frozen (`LinearPixelHead`): every level upsampled bilinearly to the finest level's grid, concatenated, standardised
  by a BatchNorm without affine parameters, and a 1x1 convolution to class logits: a per-pixel linear classifier on
  the frozen features, the DDPM-seg "pixel classifier" protocol with a linear head. The backbone runs in eval mode
  under no_grad; it measures the features themselves.
* finetune (`FPNHead`): a light Semantic-FPN head (lateral 1x1, top-down sum, a 3x3 conv per level, the levels
  upsampled to the finest grid and summed, 1x1 to logits), trained end to end with the backbone.

Logits are upsampled bilinearly to the mask's size for the loss (cross-entropy, ignore id 255) and the score.
Features are computed batch by batch on every step and every evaluation, never stored for the set, so memory is
bounded by the batch, not by the number of images. The number of steps is fixed, not the epochs, so 20 and 2,000
labelled images get the same optimisation budget; the state kept is the one with the best validation mIoU (scored
every `eval_every` steps), and the test split is scored once, with that state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.distill.regressor import (
    PYRAMID_STRIDES,
    conv_bn_relu,
    feature_reductions,
    resize_to,
    select_pyramid_indices,
    student_pyramid,
)
from training.labels.dense_masks import IGNORE_ID
from training.run.schedule import cosine_with_warmup

MODES = ("frozen", "finetune")


class Pyramid(nn.Module):
    """A timm CNN as its C2..C5 maps: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)] for s in 4, 8, 16, 32."""

    def __init__(self, model: nn.Module, arch: str = "model", strides: Sequence[int] = PYRAMID_STRIDES):
        super().__init__()
        self.model = model
        self.indices = select_pyramid_indices(feature_reductions(model, arch), arch, strides)
        self.channels = tuple(int(model.feature_info[i]["num_chs"]) for i in self.indices)

    def forward(self, images: Tensor) -> list[Tensor]:
        return student_pyramid(self.model, images, self.indices)


class LinearPixelHead(nn.Module):
    """[levels, finest first] -> (B, num_classes, H_0, W_0) logits: one linear map of the concatenated levels."""

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(sum(channels), affine=False)
        self.classifier = nn.Conv2d(sum(channels), num_classes, 1)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        size = levels[0].shape[-2:]
        return self.classifier(self.norm(torch.cat([resize_to(f.float(), size) for f in levels], dim=1)))


class FPNHead(nn.Module):
    """[levels, finest first] -> (B, num_classes, H_0, W_0): Semantic FPN (Kirillov et al. 2019), one conv per
    level instead of its upsampling stacks."""

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_relu(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in channels)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        merged = [lat(f) for lat, f in zip(self.lateral, levels, strict=True)]
        for i in range(len(merged) - 2, -1, -1):  # top-down: each level adds the coarser one, upsampled
            merged[i] = merged[i] + resize_to(merged[i + 1], merged[i].shape[-2:])
        size = merged[0].shape[-2:]
        return self.classifier(sum(resize_to(s(m), size) for s, m in zip(self.smooth, merged, strict=True)))


def build_head(mode: str, channels: Sequence[int], num_classes: int) -> nn.Module:
    if mode == "frozen":
        return LinearPixelHead(channels, num_classes)
    if mode == "finetune":
        return FPNHead(channels, num_classes)
    raise ValueError(f"unknown segmentation protocol {mode!r}; allowed: {', '.join(MODES)}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = truth, columns = prediction; ignore-id pixels left out."""
    keep = target != IGNORE_ID
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_scores(confusion: Tensor | np.ndarray) -> tuple[float, list[float | None]]:
    """(mIoU in percent over the classes present in truth or prediction, per-class IoU in percent or None where a
    class is in neither)."""
    c = np.asarray(confusion, dtype=np.float64)
    inter = np.diag(c)
    union = c.sum(0) + c.sum(1) - inter
    per_class = [float(100 * i / u) if u > 0 else None for i, u in zip(inter, union, strict=True)]
    present = [v for v in per_class if v is not None]
    return (float(np.mean(present)) if present else 0.0), per_class


@dataclass(frozen=True)
class SegmentationConfig:
    """One training of a segmentation head (and, fine-tuning, the backbone)."""

    mode: str = "frozen"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3  # AdamW peak, linear warm-up over 5% then cosine to 0
    weight_decay: float = 1e-4
    eval_every: int = 50  # validation mIoU every N steps (and at the end); the best state is kept
    hflip: bool = True  # flip image and mask together, per sample


def pixel_logits(pyramid: nn.Module, head: nn.Module, images: Tensor, frozen: bool, size: Sequence[int]) -> Tensor:
    if frozen:
        with torch.no_grad():
            levels = pyramid(images)
    else:
        levels = pyramid(images)
    return resize_to(head(levels), size)


@torch.no_grad()
def score(pyramid: nn.Module, head: nn.Module, loader, num_classes: int, device, desc: str = "",
          progress: bool = False) -> Tensor:
    """The confusion matrix of `pyramid` + `head` over every (image, mask) batch of `loader`."""
    from tqdm.auto import tqdm

    pyramid.eval()
    head.eval()
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, masks in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, masks = images.to(device), masks.to(device)
        pred = pixel_logits(pyramid, head, images, True, masks.shape[-2:]).argmax(1)
        total += confusion_matrix(pred, masks, num_classes)
    return total


def _batches(dataset, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches (an epoch is one permutation; a set smaller than the batch gives whole-set batches)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                         drop_last=True, generator=generator)
    while True:
        yield from loader


def train_segmentation(pyramid: nn.Module, head: nn.Module, train_set, val_loader, num_classes: int,
                       config: SegmentationConfig, device, seed: int = 0, desc: str = "",
                       progress: bool = True) -> dict:
    """Train `head` (and `pyramid` when fine-tuning) on `train_set` ((image, mask) pairs) for `config.steps`
    steps; load the state with the best validation mIoU back into both and return
    {"best_step", "val_miou", "history": [(step, val mIoU)], "final_loss"}."""
    from tqdm.auto import tqdm

    if config.mode not in MODES:
        raise ValueError(f"unknown segmentation protocol {config.mode!r}; allowed: {', '.join(MODES)}")
    if len(train_set) < 1:
        raise ValueError("the segmentation protocol needs at least one labelled image")
    frozen = config.mode == "frozen"
    pyramid.to(device)
    head.to(device)
    for p in pyramid.parameters():
        p.requires_grad_(not frozen)
    params = list(head.parameters()) + ([] if frozen else list(pyramid.parameters()))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, round(0.05 * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, config.steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(train_set, config.batch_size, generator)
    trained = [head] if frozen else [head, pyramid]
    best = (-1.0, 0, None)
    history: list[list] = []
    loss_value = math.nan
    bar = tqdm(total=config.steps, desc=desc or f"segmentation {config.mode}", unit="step", disable=not progress,
               leave=False)
    for step in range(1, config.steps + 1):
        pyramid.train(not frozen)
        head.train()
        images, masks = next(batches)
        if config.hflip:
            flip = torch.rand(len(images), generator=generator) < 0.5
            images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
        images, masks = images.to(device), masks.to(device)
        loss = F.cross_entropy(pixel_logits(pyramid, head, images, frozen, masks.shape[-2:]), masks,
                               ignore_index=IGNORE_ID)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"segmentation {config.mode}: non-finite loss at step {step}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if step % config.eval_every == 0 or step == config.steps:
            val_miou, _ = iou_scores(score(pyramid, head, val_loader, num_classes, device))
            history.append([step, round(val_miou, 2)])
            if val_miou > best[0]:
                best = (val_miou, step, [copy.deepcopy(m.state_dict()) for m in trained])
    bar.close()
    for module, state in zip(trained, best[2], strict=True):
        module.load_state_dict(state)
    return {"best_step": best[1], "val_miou": round(best[0], 2), "history": history, "final_loss": loss_value}
