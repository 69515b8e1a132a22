"""Mix-distillation in the trainer: the task head learns the frozen interpreter's soft labels, every loss logged."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import training.pretrain as pretrain
from tests.tiny import make_teacher_and_fmnist
from training import train_interpreter
from training.labels.task_head import label_distillation_loss, load_interpreter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ld")
    teacher, data = make_teacher_and_fmnist(root)
    interpreters = {}
    for task, extra in (("classes", ["--labels-fraction", "0.5"]), ("fmnist-masks", ["--labels", "8"])):
        interpreters[task] = train_interpreter.main(
            ["--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(root / task), "--task", task,
             "--epochs", "1", "--batch-size", "4", "--threads", "1", "--width", "32", *extra])
    return teacher, data, interpreters


def _distill(out, setup, task, *extra):
    teacher, data, interpreters = setup
    return pretrain.main(["--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(out),
                          "--interpreter", str(interpreters[task]), "--threads", "1", "--batch-size", "8",
                          "--per-device-batch-size", "4", "--num-workers", "0", "--set", "regressor_width=16",
                          "--feature-images", "0", "--log-every", "1", "--max-steps", "2", *extra])


@pytest.mark.parametrize("task", ["classes", "fmnist-masks"])
def test_mix_distillation_logs_every_term_and_keeps_the_interpreter_frozen(tmp_path, setup, task):
    interpreter_dir = setup[2][task]
    before = safetensors.torch.load_file(interpreter_dir / "interpreter.safetensors")
    out = _distill(tmp_path / "run", setup, task, "--export-task-head")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"loss/loss", "loss/mse", "loss/at", "loss/ld"} <= set(row)
        assert row["loss/ld"] > 0
        # L_mix = L_feat + 1.0 x L_ld, as logged (each the mean over the step's micro-batches)
        assert row["loss/loss"] == pytest.approx(row["loss/mse"] + 3.0 * row["loss/at"] + row["loss/ld"], rel=1e-5)
    after = safetensors.torch.load_file(interpreter_dir / "interpreter.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = safetensors.torch.load_file(out / "checkpoints" / "step_2" / "model.safetensors")
    assert any(k.startswith("task_head.") for k in state) and not any(k.startswith("interpreter") for k in state)
    export = safetensors.torch.load_file(out / "export" / "model.safetensors")
    assert not any("task_head" in k for k in export)  # the backbone export is unchanged
    assert json.loads((out / "task_head" / "task_head.json").read_text())["task"] == task


def test_an_interpreter_for_other_taps_or_t_is_refused(tmp_path, setup):
    with pytest.raises(ValueError, match=r"trained on taps .* at t=50; this run's teacher computes .* at t=100"):
        _distill(tmp_path / "run", setup, "classes", "--set", "teacher.timestep=100")


def test_the_interpreter_loads_frozen(setup):
    from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe
    from training.teacher.build import build_teacher

    recipe = get_recipe(DEFAULT_RECIPE)
    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, source=str(setup[0]))
    teacher.keep_strides({4, 8})
    interpreter, info = load_interpreter(setup[2]["fmnist-masks"], teacher)
    assert not interpreter.training and not any(p.requires_grad for p in interpreter.parameters())
    assert info["num_classes"] == 2


def test_dense_soft_labels_are_resized_to_the_student_head():
    student = torch.randn(2, 3, 8, 8)
    interpreter = torch.randn(2, 3, 16, 16)
    loss = label_distillation_loss(student, interpreter, temperature=4.0)
    resized = torch.nn.functional.interpolate(interpreter, size=(8, 8), mode="bilinear", align_corners=False)
    reference = -(torch.softmax(resized / 4, 1) * torch.log_softmax(student / 4, 1)).sum(1).mean() * 16
    torch.testing.assert_close(loss, reference)
