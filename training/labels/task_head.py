"""Mix-distillation: the student's task head learns the frozen interpreter's soft labels on every image.

    python training/train_interpreter.py --output-dir runs/interpreter            # a few labels -> interpreter
    accelerate launch training/pretrain.py --interpreter runs/interpreter         # L_mix = L_feat + 1.0 x L_ld

With `recipe.label_distill.interpreter` set (`--interpreter DIR`), the trainer loads the interpreter written by
training/train_interpreter.py, frozen, and gives the student a task head:

* classes: `ClassHead`, a linear layer on the student's globally pooled C5 (the head a fine-tune would add);
* masks: `DenseHead`, UperNet-like on the regressor's pyramid: each level's prediction projected by a 1x1 conv,
  upsampled bilinearly to the finest level's grid and summed, GroupNorm + Swish, a 1x1 conv to class logits.

Each step adds L_ld = soft cross-entropy at the recipe's temperature (training/labels/losses.py) between the head's
logits and the interpreter's logits on the same teacher features (resized to the head's grid for masks), weighted by
`label_distill.weight`. The exported backbone is unchanged; `--export-task-head` also writes the head.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.labels.interpreter import INTERPRETER_INFO, INTERPRETER_WEIGHTS, DenseInterpreter, PooledInterpreter
from training.labels.losses import soft_cross_entropy_loss
from training.run.checksums import read_safetensors

DENSE_HEAD_WIDTH = 128


def load_interpreter(folder: str | Path, teacher) -> tuple[nn.Module, dict[str, Any]]:
    """(the frozen interpreter in eval mode on the teacher's device, its interpreter.json); refuses one trained on
    other taps or another timestep than the run's teacher computes."""
    folder = Path(folder)
    if not (folder / INTERPRETER_INFO).is_file() or not (folder / INTERPRETER_WEIGHTS).is_file():
        raise FileNotFoundError(f"interpreter {folder}: expected {INTERPRETER_INFO} and {INTERPRETER_WEIGHTS} "
                                "(written by training/train_interpreter.py)")
    info = json.loads((folder / INTERPRETER_INFO).read_text())
    taps = {str(s): c for s, c in zip(teacher.strides, teacher.channels, strict=True)}
    if info["taps"] != taps or info["timestep"] != teacher.timestep:
        raise ValueError(f"interpreter {folder} was trained on taps {info['taps']} at t={info['timestep']}; this "
                         f"run's teacher computes taps {taps} at t={teacher.timestep}: train it with this recipe")
    channels = {int(s): c for s, c in info["taps"].items()}
    weights = read_safetensors(folder / INTERPRETER_WEIGHTS)
    if info["task"] == "classes":
        interpreter = PooledInterpreter(channels, info["num_classes"])
    else:
        width = weights["stem.0.weight"].shape[0]
        interpreter = DenseInterpreter(channels, info["num_classes"], width=width)
    interpreter.load_state_dict(weights)
    interpreter.requires_grad_(False)
    return interpreter.eval().to(teacher.device), info


class ClassHead(nn.Module):
    """Image logits from the student's pooled C5."""

    def __init__(self, c5_channels: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(c5_channels, num_classes)

    def forward(self, pyramid: Sequence[Tensor], predictions: Sequence[Tensor]) -> Tensor:
        return self.linear(pyramid[-1].mean(dim=(2, 3)))


class DenseHead(nn.Module):
    """Dense logits on the finest regressed level's grid, from every level of the regressor's pyramid."""

    def __init__(self, level_channels: Sequence[int], num_classes: int, width: int = DENSE_HEAD_WIDTH):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, width, 1) for c in level_channels)
        self.norm = nn.GroupNorm(32 if width % 32 == 0 else 1, width)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, pyramid: Sequence[Tensor], predictions: Sequence[Tensor]) -> Tensor:
        size = predictions[0].shape[-2:]
        fused = sum(F.interpolate(proj(p), size=size, mode="bilinear", align_corners=False)
                    for proj, p in zip(self.project, predictions, strict=True))
        return self.classify(F.silu(self.norm(fused)))


def build_task_head(info: Mapping[str, Any], c5_channels: int, prediction_channels: Sequence[int]) -> nn.Module:
    if info["task"] == "classes":
        return ClassHead(c5_channels, info["num_classes"])
    return DenseHead(prediction_channels, info["num_classes"])


def label_distillation_loss(student_logits: Tensor, interpreter_logits: Tensor, temperature: float) -> Tensor:
    """Soft cross-entropy at `temperature`; dense interpreter logits are resized to the student head's grid."""
    if interpreter_logits.ndim == 4 and interpreter_logits.shape[-2:] != student_logits.shape[-2:]:
        interpreter_logits = F.interpolate(interpreter_logits, size=student_logits.shape[-2:], mode="bilinear",
                                           align_corners=False)
    return soft_cross_entropy_loss(student_logits, interpreter_logits, temperature=temperature)


def save_task_head(head: nn.Module, info: Mapping[str, Any], folder: Path) -> Path:
    """The student's task head beside its backbone export: task_head.safetensors + task_head.json."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in head.state_dict().items()},
                                str(folder / "task_head.safetensors"))
    (folder / "task_head.json").write_text(json.dumps({"task": info["task"], "num_classes": info["num_classes"],
                                                       "head": type(head).__name__}, indent=2) + "\n")
    return folder
