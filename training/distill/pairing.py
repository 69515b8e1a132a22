"""Which teacher tap feeds which student level: pairing by STRIDE, as the paper does (never by order).

Both strides are relative to each network's own input (a teacher that runs at another resolution resamples its
maps back to the image's grid, so its strides keep their meaning). A pair (student stride s, teacher stride t)
needs t <= s with s a multiple of t: the teacher's map is area-pooled (`adaptive_avg_pool2d`) to the student
level's grid before its layer norm, so predictions are made and compared at the student's resolution and never
upsampled. A teacher map coarser than a student level would need upsampling and is refused.

A recipe declares its pairs (`Recipe.pairs`, (student stride, teacher stride) each) or leaves them empty for the
automatic rule: each teacher tap goes to the student level at its own stride; a tap finer than every student level
goes to the finest level when that level has no tap of its own stride; any other tap is dropped with a logged
reason (e.g. the decoder level next to the output of a small-image UNet, or a stride-64 level of a latent teacher
beside a resnet whose coarsest level is stride 32).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelPair:
    """One distillation target: the student level at `student_stride` regresses the teacher tap at `teacher_stride`
    (`teacher_channels` wide), pooled by `student_stride // teacher_stride` when that is above 1."""

    student_stride: int
    teacher_stride: int
    teacher_channels: int

    @property
    def pool_factor(self) -> int:
        return self.student_stride // self.teacher_stride


def pair_levels(
    student_strides: Sequence[int],
    teacher_channels: Mapping[int, int],
    declared: Sequence[Sequence[int]] = (),
) -> tuple[tuple[LevelPair, ...], list[str]]:
    """(pairs finest student level first, notes on what was dropped and why).

    `student_strides`: the strides of the student's levels; `teacher_channels`: {tap stride: channels};
    `declared`: the recipe's (student stride, teacher stride) pairs, or () for the automatic rule.
    """
    student = sorted(set(student_strides))
    notes: list[str] = []
    if declared:
        pairs = []
        for item in declared:
            if len(item) != 2:
                raise ValueError(f"recipe pairs take (student stride, teacher stride) items, got {tuple(item)!r}")
            s, t = int(item[0]), int(item[1])
            if s not in student:
                raise ValueError(f"recipe pair {(s, t)}: the student has no level at stride {s}; its levels are at "
                                 f"strides {student}")
            if t not in teacher_channels:
                raise ValueError(f"recipe pair {(s, t)}: the teacher has no tap at stride {t}; its taps are at "
                                 f"strides {sorted(teacher_channels)}")
            if t > s or s % t:
                raise ValueError(f"recipe pair {(s, t)}: a teacher map at stride {t} can only feed a student level "
                                 f"whose stride is a multiple of {t} (the target is area-pooled, never upsampled)")
            pairs.append(LevelPair(s, t, teacher_channels[t]))
        if len({p.student_stride for p in pairs}) != len(pairs):
            raise ValueError(f"recipe pairs {list(map(tuple, declared))} give one student level two targets")
        unused = sorted(set(teacher_channels) - {p.teacher_stride for p in pairs})
        notes += [f"teacher tap at stride {t} is not in the recipe's pairs: not computed" for t in unused]
    else:
        pairs = []
        taken = {t for t in teacher_channels if t in student}
        for t in sorted(teacher_channels):
            if t in student:
                pairs.append(LevelPair(t, t, teacher_channels[t]))
            elif t < student[0] and student[0] not in taken:
                pairs.append(LevelPair(student[0], t, teacher_channels[t]))
                taken.add(student[0])
            elif t < student[0]:
                notes.append(f"teacher tap at stride {t} dropped: finer than every student level, and the finest "
                             f"(stride {student[0]}) takes the teacher's own stride-{student[0]} tap")
            else:
                notes.append(f"teacher tap at stride {t} dropped: the student has no level at stride {t} "
                             f"(its levels: {student})")
    if not pairs:
        raise ValueError(f"no teacher tap (strides {sorted(teacher_channels)}) pairs with a student level (strides "
                         f"{student}); declare the recipe's pairs or choose other teacher taps")
    return tuple(sorted(pairs, key=lambda p: p.student_stride)), notes


def pooled_targets(teacher_maps: Mapping[int, Tensor], pairs: Sequence[LevelPair],
                   sizes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Each pair's teacher map ({stride: (B, C, H, W)}) area-pooled to the student level's grid `sizes[i]`."""
    out = []
    for pair, size in zip(pairs, sizes, strict=True):
        target = teacher_maps[pair.teacher_stride]
        out.append(target if tuple(target.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(target, tuple(size)))
    return out


def describe_pairs(pairs: Sequence[LevelPair], image_size: int | None = None) -> str:
    """A markdown table of the pairing; with `image_size`, the grid each pair is compared on."""
    lines = ["| student stride | teacher stride | teacher channels | target | grid |", "|---|---|---|---|---|"]
    for p in pairs:
        target = "as is" if p.pool_factor == 1 else f"area-pooled {p.pool_factor}x"
        side = max(1, image_size // p.student_stride) if image_size else None
        grid = "-" if side is None else f"{side}x{side}" + (" (no AT term: 1x1)" if side == 1 else "")
        lines.append(f"| {p.student_stride} | {p.teacher_stride} | {p.teacher_channels} | {target} | {grid} |")
    return "\n".join(lines)
