"""Pictures people can look at: feature maps projected to RGB with PCA, teacher beside student."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def pca_rgb(features: Tensor, basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) -> ((N, 3, H, W) in [0, 1], basis (C, 3)): the top-3 principal components, min-max scaled.

    Pass the teacher's `basis` when projecting the student so both use the same colours.
    """
    n, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c).float()
    flat = flat - flat.mean(0, keepdim=True)
    if basis is None:
        _, _, v = torch.pca_lowrank(flat, q=min(3, c), center=False)
        basis = v[:, :3]
    rgb = flat @ basis
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1])], dim=1)
    lo, hi = rgb.min(0).values, rgb.max(0).values
    rgb = (rgb - lo) / (hi - lo).clamp_min(1e-8)
    return rgb.reshape(n, h, w, 3).permute(0, 3, 1, 2), basis


def _upsample(x: Tensor, size: int) -> Tensor:
    return torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")


def save_feature_comparison(
    images: Tensor,
    teacher_levels: Sequence[Tensor],
    student_levels: Sequence[Tensor],
    strides: Sequence[int],
    path: str | Path,
    mean: Tensor,
    std: Tensor,
    cell: int = 96,
) -> Path:
    """One row per image: the image, then for each level teacher | student (shared PCA basis). Writes a PNG."""
    from torchvision.utils import make_grid

    rows = []
    shown = (images.cpu() * std.cpu().reshape(1, -1, 1, 1) + mean.cpu().reshape(1, -1, 1, 1)).clamp(0, 1)
    columns = [_upsample(shown, cell)]
    for teacher, student in zip(teacher_levels, student_levels, strict=True):
        t_rgb, basis = pca_rgb(teacher.cpu())
        s_rgb, _ = pca_rgb(student.detach().cpu(), basis)
        columns += [_upsample(t_rgb, cell), _upsample(s_rgb, cell)]
    for i in range(images.shape[0]):
        rows += [col[i] for col in columns]
    grid = make_grid(torch.stack(rows), nrow=len(columns), padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path
