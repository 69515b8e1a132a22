"""The trainable half of DreamTeacher: a timm student plus the feature regressor that maps it onto the teacher.

This is the one module `accelerator.prepare` wraps; the frozen teacher stays outside it. Its state dict holds
`student.*` (timm's own key names, what `hub/export.py` keeps) and `regressor.*` (discarded after pretraining).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dreamteacher_models.recipes import Recipe

from .regressor import FeatureRegressor, build_student, pyramid_taps, student_pyramid


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, indices: Sequence[int], regressor: FeatureRegressor):
        super().__init__()
        self.student = student
        self.indices = tuple(indices)
        self.regressor = regressor

    def forward(self, images: Tensor, target_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """(B, 3, H, W) -> the regressed student maps, finest first, each resized to target_sizes[i]."""
        return self.regressor(student_pyramid(self.student, images, self.indices), target_sizes)


def build_distiller(recipe: Recipe, teacher_channels: Sequence[int], teacher_strides: Sequence[int]) -> Distiller:
    """Student C2..C5 matched finest-to-finest with the teacher's taps (which must be four)."""
    student = build_student(recipe.arch)
    indices, channels = pyramid_taps(student, recipe.arch)
    if len(teacher_channels) != len(channels):
        raise ValueError(
            f"teacher/student pyramid mismatch: the teacher has {len(teacher_channels)} taps at strides "
            f"{list(teacher_strides)} but the student {recipe.arch} has {len(channels)} levels (C2..C5, strides "
            f"4/8/16/32); set teacher.taps to exactly {len(channels)} module names (finest first)"
        )
    regressor = FeatureRegressor(channels, teacher_channels, width=recipe.regressor_width, ppm_bins=recipe.ppm_bins)
    return Distiller(student, indices, regressor)
