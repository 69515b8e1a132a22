"""DreamTeacher feature-distillation losses: MSE to the layer-normed teacher and attention transfer.

All losses compute in float32 (ADM activations squared and summed over ~1000 channels overflow fp16) and treat
the teacher as a fixed target (detached).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Layer-norm axes (PAPER.md ambiguity 2): "chw" = per sample over (C, H, W), the common reading and the default;
# "c" = per pixel over channels.
_NORM_DIMS = {"chw": (1, 2, 3), "c": (1,)}


def layer_norm_features(f: Tensor, axes: str = "chw", eps: float = 1e-6) -> Tensor:
    """Non-learnable layer norm: (B, C, H, W) -> (B, C, H, W), zero mean / unit (biased) variance over `axes`."""
    if axes not in _NORM_DIMS:
        raise ValueError(f"unknown layer-norm axes {axes!r}: allowed are {sorted(_NORM_DIMS)}")
    dims = _NORM_DIMS[axes]
    mean = f.mean(dim=dims, keepdim=True)
    var = f.var(dim=dims, unbiased=False, keepdim=True)
    return (f - mean) * torch.rsqrt(var + eps)


def check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)} "
            "(regress the student to the teacher's channels and pass target_sizes to the regressor)"
        )


def feature_mse_loss(student: Tensor, teacher: Tensor, norm_axes: str = "chw") -> Tensor:
    """Mean squared error between the regressed student map and LN(teacher); both (B, C, H, W) -> scalar.

    ||.||^2 of the paper is read as the mean over all B*C*H*W elements, which keeps L_MSE ~1 at init (LN targets
    have unit variance) and so on the scale the paper's AT weight of 10 assumes.
    """
    check_same_shape(student, teacher, "feature_mse_loss")
    target = layer_norm_features(teacher.detach().float(), norm_axes)
    return F.mse_loss(student.float(), target)


def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis: Q = vec(sum_c |A_c|^p), L2-normalised per sample.

    (B, C, H, W) -> (B, H*W), float32.
    """
    q = f.float().abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2) -> Tensor:
    """Attention transfer: mean over the batch of || Q_s/||Q_s|| - Q_t/||Q_t|| ||_p (the paper's reading).

    student (B, C_s, H, W), teacher (B, C_t, H, W): channels may differ, spatial size must match -> scalar.
    `p` is both the attention exponent and the norm of the difference (p = 2 in the paper). This is the p-norm per
    sample, not the common implementation's (Q_s - Q_t).pow(2).mean(), which is its square divided by H*W and
    would make the weight 10 negligible. The value lies in [0, sqrt(2)] for p = 2 (Q >= 0).
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention_transfer_loss: student shape {tuple(student.shape)} and teacher shape "
            f"{tuple(teacher.shape)} must agree in batch and spatial size"
        )
    diff = attention_map(student, p) - attention_map(teacher.detach(), p)
    return torch.linalg.vector_norm(diff, ord=p, dim=1).mean()


def feature_distillation_loss(
    student_levels: Sequence[Tensor],
    teacher_levels: Sequence[Tensor],
    at_weight: float = 10.0,
    mse_weight: float = 1.0,
    norm_axes: str = "chw",
) -> dict[str, Tensor]:
    """L_feat = mse_weight * L_MSE + at_weight * L_AT, each averaged over levels (AT over the levels larger than
    1x1: a single position's attention is always 1).

    student_levels[i]: regressed map (B, C_i, H_i, W_i); teacher_levels[i]: raw teacher map of the same shape.
    Returns {"loss", "mse", "at", "mse/level{i}", "at/level{i}"} (scalars, for the trainer to log).

    AT compares against the raw teacher, not LN(teacher): the paper applies LN in L_MSE only; AT's own L2
    normalisation already removes the teacher's per-sample scale, and a per-pixel ("c") LN would flatten Q_t to a
    constant map. So the total is invariant to a positive per-sample scale of the teacher, and (with "chw") the
    MSE term, but not AT, to a per-sample shift as well.
    """
    if len(student_levels) != len(teacher_levels) or not student_levels:
        raise ValueError(
            f"need the same non-zero number of student and teacher levels, got {len(student_levels)} "
            f"and {len(teacher_levels)}"
        )
    out: dict[str, Tensor] = {}
    at_terms = []
    for i, (s, t) in enumerate(zip(student_levels, teacher_levels, strict=True)):
        out[f"mse/level{i}"] = feature_mse_loss(s, t, norm_axes)
        if s.shape[-2:].numel() > 1:  # a 1x1 map's attention is the constant 1: no AT term (zero gradient)
            out[f"at/level{i}"] = attention_transfer_loss(s, t)
            at_terms.append(out[f"at/level{i}"])
    n = len(student_levels)
    out["mse"] = sum(out[f"mse/level{i}"] for i in range(n)) / n
    out["at"] = sum(at_terms) / len(at_terms) if at_terms else out["mse"].new_zeros(())
    out["loss"] = mse_weight * out["mse"] + at_weight * out["at"]
    return out
