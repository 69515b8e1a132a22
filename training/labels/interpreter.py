"""The interpreter of DreamTeacher's label distillation: a small head trained on the frozen teacher's features.

With a few labeled images, the interpreter learns to read the task (segmentation masks, or image classes) off the
teacher's multi-scale features; its soft predictions on every unlabeled image are then distilled into the
student's task head (PAPER.md, "Losses"). Two heads:

* `DenseInterpreter` (the paper's, after BigDatasetGAN): a chain of feature-fuse layers from the coarsest tap to the
  finest. Each takes the running map, upsamples it bilinearly to the next finer tap's grid, concatenates that tap
  (projected by a 1x1 conv), mixes them with a depthwise-separable conv and applies GroupNorm(32) + Swish; width 256,
  dropout 0.1 before the final 1x1 conv to class logits, on the finest tap's grid. Loss: CE + 3.0 x Dice
  (`interpreter_loss`), the logits upsampled bilinearly to the mask's size.
* `PooledInterpreter`, for image classification: each tap globally average-pooled, concatenated, dropout, linear.

Both take the teacher's output as it comes, `{stride: (B, C, H/stride, W/stride)}`, and know their taps' channels
per stride, so a wrong tap layout is a clear error, not a shape mismatch deep inside.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.labels.losses import dice_loss

INTERPRETER_WEIGHTS = "interpreter.safetensors"  # what training/train_interpreter.py writes, beside
INTERPRETER_INFO = "interpreter.json"  # its task, classes, taps, timestep and teacher
INTERPRETER_WIDTH = 256
INTERPRETER_DROPOUT = 0.1
DICE_WEIGHT = 3.0


def _check_taps(features: Mapping[int, Tensor], channels: Mapping[int, int], what: str) -> None:
    if set(features) != set(channels):
        raise ValueError(f"{what} was built for taps at strides {sorted(channels)}, got strides {sorted(features)}")
    for stride, fmap in features.items():
        if fmap.ndim != 4 or fmap.shape[1] != channels[stride]:
            raise ValueError(f"{what}: the stride-{stride} tap should be (B, {channels[stride]}, H, W), got "
                             f"{tuple(fmap.shape)}")


class FeatureFuse(nn.Module):
    """running map (coarser) + one finer tap -> the fused map on the tap's grid."""

    def __init__(self, tap_channels: int, width: int, groups: int):
        super().__init__()
        self.project = nn.Conv2d(tap_channels, width, 1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.pointwise = nn.Conv2d(2 * width, width, 1)
        self.norm = nn.GroupNorm(groups, width)

    def forward(self, running: Tensor, tap: Tensor) -> Tensor:
        running = F.interpolate(running, size=tap.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.pointwise(self.depthwise(torch.cat([running, self.project(tap)], dim=1)))
        return F.silu(self.norm(fused))


class DenseInterpreter(nn.Module):
    """{stride: teacher map} -> (B, num_classes, H/s, W/s) logits on the finest tap's grid (stride s)."""

    def __init__(self, tap_channels: Mapping[int, int], num_classes: int, width: int = INTERPRETER_WIDTH,
                 dropout: float = INTERPRETER_DROPOUT, groups: int = 32):
        super().__init__()
        if not tap_channels:
            raise ValueError("the interpreter needs at least one teacher tap")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if width % groups:
            raise ValueError(f"width {width} must be divisible by the GroupNorm groups {groups}")
        self.channels = {int(s): int(c) for s, c in tap_channels.items()}
        self.strides = sorted(self.channels, reverse=True)  # coarsest first
        coarsest = self.strides[0]
        self.stem = nn.Sequential(nn.Conv2d(self.channels[coarsest], width, 1), nn.GroupNorm(groups, width), nn.SiLU())
        self.fuse = nn.ModuleDict({str(s): FeatureFuse(self.channels[s], width, groups) for s in self.strides[1:]})
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(width, num_classes, 1))
        self.num_classes = num_classes

    def forward(self, features: Mapping[int, Tensor]) -> Tensor:
        _check_taps(features, self.channels, "DenseInterpreter")
        x = self.stem(features[self.strides[0]].float())
        for stride in self.strides[1:]:
            x = self.fuse[str(stride)](x, features[stride].float())
        return self.head(x)


class PooledInterpreter(nn.Module):
    """{stride: teacher map} -> (B, num_classes) image logits from the globally pooled taps."""

    def __init__(self, tap_channels: Mapping[int, int], num_classes: int, dropout: float = INTERPRETER_DROPOUT):
        super().__init__()
        if not tap_channels:
            raise ValueError("the interpreter needs at least one teacher tap")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.channels = {int(s): int(c) for s, c in tap_channels.items()}
        self.strides = sorted(self.channels)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(sum(self.channels.values()), num_classes))
        self.num_classes = num_classes

    def forward(self, features: Mapping[int, Tensor]) -> Tensor:
        _check_taps(features, self.channels, "PooledInterpreter")
        return self.head(torch.cat([features[s].float().mean(dim=(2, 3)) for s in self.strides], dim=1))


def interpreter_loss(logits: Tensor, target: Tensor, dice_weight: float = DICE_WEIGHT,
                     ignore_index: int | None = None) -> dict[str, Tensor]:
    """CE (+ `dice_weight` x Dice for masks): image logits (B, K) with labels (B,), or dense logits (B, K, h, w)
    with masks (B, H, W), the logits upsampled bilinearly to the mask's size first."""
    if logits.ndim == 2:
        ce = F.cross_entropy(logits, target)
        return {"loss": ce, "ce": ce}
    if target.ndim != 3:
        raise ValueError(f"dense logits {tuple(logits.shape)} need masks (B, H, W), got {tuple(target.shape)}")
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
    dice = dice_loss(logits, target, ignore_index=ignore_index)
    return {"loss": ce + dice_weight * dice, "ce": ce, "dice": dice}
