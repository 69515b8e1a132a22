"""The trainable half of DreamTeacher: a timm student plus the feature regressor that maps it onto the teacher.

This is the one module `accelerator.prepare` wraps; the frozen teacher stays outside it. Its state dict holds
`student.*` (timm's own key names, what `hub/export.py` keeps) and `regressor.*` (discarded after pretraining).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dreamteacher_models.recipes import LossConfig, Recipe
from training.distill.losses import feature_distillation_loss
from training.distill.pairing import LevelPair, pair_levels, pooled_targets
from training.distill.regressor import FeatureRegressor, freeze_unreached, student_levels, student_pyramid
from training.run.backbones import build_backbone


class Distiller(nn.Module):
    """Student levels from the finest paired one up to the coarsest (C5) -> one prediction per pair, finest first,
    each on its student level's grid."""

    def __init__(self, student: nn.Module, indices: Sequence[int], regressor: FeatureRegressor,
                 pairs: Sequence[LevelPair]):
        super().__init__()
        self.student = student
        self.indices = tuple(indices)
        self.regressor = regressor
        self.pairs = tuple(pairs)
        self.task_head: nn.Module | None = None  # set for mix-distillation (training/labels/task_head.py)

    def forward(self, images: Tensor, with_logits: bool = False) -> list[Tensor] | tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) -> [(B, teacher channels, H / student stride, W / student stride)] per pair, finest first;
        with `with_logits`, also the task head's logits (passed through the call, so DDP sees one forward)."""
        pyramid = student_pyramid(self.student, images, self.indices)
        predictions = self.regressor(pyramid)
        if not with_logits:
            return predictions
        if self.task_head is None:
            raise ValueError("this distiller has no task head: set recipe.label_distill.interpreter")
        return predictions, self.task_head(pyramid, predictions)



def build_distiller(recipe: Recipe, teacher_channels: Mapping[int, int]) -> tuple[Distiller, list[str]]:
    """(the student + regressor for `recipe`, notes on teacher taps left out), levels paired by stride.

    `teacher_channels`: {tap stride: channels} of the teacher's taps. The pairing is the recipe's `pairs`, or the
    automatic rule of training/distill/pairing.py when the recipe declares none.
    """
    student = build_backbone(recipe)
    levels = student_levels(student, recipe.arch)
    pairs, notes = pair_levels(levels, teacher_channels, recipe.pairs)
    target_of = {p.student_stride: p.teacher_channels for p in pairs}
    used = [s for s in sorted(levels) if s >= pairs[0].student_stride]  # finest paired level .. C5
    if not recipe.regressor_top_down:  # no path carries an unpaired level's features to a loss
        used = [s for s in used if s in target_of]
    regressor = FeatureRegressor([levels[s][1] for s in used], [target_of.get(s, 0) for s in used],
                                 width=recipe.regressor_width, ppm_bins=recipe.ppm_bins,
                                 top_down=recipe.regressor_top_down)
    indices = [levels[s][0] for s in used]
    frozen = freeze_unreached(student, indices)
    if frozen:
        notes = [*notes, "student parameters the distillation never reaches, frozen at their init: "
                 + ", ".join(frozen)]
    return Distiller(student, indices, regressor, pairs), notes


def distillation_loss(predictions: Sequence[Tensor], teacher_maps: Mapping[int, Tensor], pairs: Sequence[LevelPair],
                      loss: LossConfig) -> dict[str, Tensor]:
    """The recipe's L_feat for one batch: each pair's teacher map ({stride: map}) pooled to its prediction's grid,
    then MSE to its layer norm + AT (training/distill/losses.py). Shared by the trainer and the benchmarks."""
    targets = pooled_targets(teacher_maps, pairs, [p.shape[-2:] for p in predictions])
    return feature_distillation_loss(predictions, targets, at_weight=loss.at_weight, mse_weight=loss.mse_weight,
                                     norm_axes=loss.norm_axes)
