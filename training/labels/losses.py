"""Label-distillation losses: KD soft cross-entropy (student task head vs interpreter) and multi-class soft Dice.

Both compute in float32 and treat the teacher side as a fixed target (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.distill.losses import check_same_shape


def soft_cross_entropy_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """KD soft cross-entropy, classes on dim 1: (B, K, ...) each -> scalar.

    -sum_k softmax(t/T)_k * log_softmax(s/T)_k, averaged over batch and positions, times T^2 (Hinton et al.: keeps
    the gradient scale independent of T, so the paper's L_mix weight of 1.0 means the same at any T). Its minimum
    over the student is the teacher's entropy (times T^2), reached at student == teacher, not zero.
    """
    check_same_shape(student_logits, teacher_logits, "soft_cross_entropy_loss")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(p_t * log_p_s).sum(dim=1).mean() * temperature**2


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int | None = None, smooth: float = 1.0) -> Tensor:
    """Multi-class soft dice loss: logits (B, K, H, W), integer target (B, H, W) -> scalar in [0, 1].

    1 - mean over the K classes of (2 |P.G| + smooth) / (|P| + |G| + smooth), with P = softmax(logits), G the
    one-hot target, sums over the whole batch and all non-ignored pixels.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"dice_loss: logits must be (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    labels = torch.where(valid, target, 0)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"dice_loss: target labels must be in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    mask = valid.unsqueeze(1).float()
    probs = F.softmax(logits.float(), dim=1) * mask
    onehot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float() * mask
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + smooth) / (total + smooth)).mean()
