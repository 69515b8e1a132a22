"""The distillation trainer end to end: tiny UNet teacher, resnet18 student, generated images, in-process."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import training.pretrain as pretrain
from dreamteacher_models.recipes import UnknownRecipeError
from tests.tiny import write_fashion_mnist, write_image_folder
from training.run.schedule import noise_seed
from training.teacher.fast_path import GPU_FAST_PATH, PLAIN

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n=64)


def _args(out, teacher_dir, data_dir, *extra, threads: bool = True):
    """The trainer on the tiny fixture; one torch thread (see conftest.py) unless `threads` is False."""
    return [*(["--threads", "1"] if threads else []),
            "--teacher", str(teacher_dir), "--data-dir", str(data_dir), "--output-dir", str(out),
            "--batch-size", "8", "--per-device-batch-size", "4", "--num-workers", "0",
            "--set", "regressor_width=16", "--feature-images", "0", "--log-every", "1", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(checkpoint / "model.safetensors")


def test_runs_and_exports_a_backbone_timm_loads(tmp_path, teacher_dir, idx_dir, caplog):
    with caplog.at_level("INFO", logger="dreamteacher"):
        out = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "3", "--feature-images",
                                  "2", "--set", "pairs=()", "--checkpoint-every", "2"))
    export = out / "export"
    assert f"exported the student to {export}: timm.create_model('local-dir:{export}', pretrained=True)" in caplog.text
    # the pairing, logged with the grid each pair is compared on at the recipe's 32 px
    assert any(r.getMessage().startswith("student levels <- teacher taps, by stride:\n| student stride |")
               for r in caplog.records)
    assert "| 8 | 8 | 16 | as is | 4x4 |" in caplog.text
    assert "fast path off: teacher plain" in caplog.text  # on a CPU, the plain path unless --fast-path
    model = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()
    trained = {k.removeprefix("student."): v for k, v in _weights(out / "checkpoints" / "step_3").items()
               if k.startswith("student.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["regressor_width"] == 16 and recipe["teacher"]["source"] == str(teacher_dir)
    # automatic pairing by stride, written as resolved: the teacher's stride-1 level has no student level
    assert recipe["pairs"] == [[2, 2], [4, 4], [8, 8]]
    assert (out / "checkpoints" / "step_3" / "features.png").is_file()
    assert (out / "checkpoints" / "step_2" / "features.png").is_file()  # beside every checkpoint
    for written in ("recipe.json", "args.json"):  # indented for people to read
        text = (out / written).read_text()
        assert text == json.dumps(json.loads(text), indent=2) + "\n"
    assert (out / "logs" / "pretrain").is_dir()  # TensorBoard's run folder
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss/loss", "loss/mse", "loss/at", "lr", "images_per_s", "time/teacher_s"} <= set(rows[0])
    assert list((out / "logs").rglob("events.out.tfevents*"))  # TensorBoard scalars


def test_loss_goes_down_on_a_fixed_batch(tmp_path, teacher_dir, idx_dir):
    out = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "30", "--limit-images", "8",
                              "--batch-size", "8", "--per-device-batch-size", "8", "--set", "data.hflip=False",
                              "--set", "teacher.timestep=0",  # nearly noise-free targets: a fixed regression problem
                              "--checkpoint-every", "0", "--no-export"))
    losses = [r["loss/loss"] for r in _metrics(out)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses  # a frozen student stays at ~1.0


def test_resume_continues_exactly(tmp_path, teacher_dir, idx_dir, monkeypatch, caplog):
    common = ["--max-steps", "6", "--checkpoint-every", "3", "--no-export", "--set", "optim.warmup_epochs=0.5"]
    straight = pretrain.main(_args(tmp_path / "straight", teacher_dir, idx_dir, *common))

    real_save = pretrain.save_checkpoint

    def save_then_die(accelerator, output_dir, step, keep, facts):
        real_save(accelerator, output_dir, step, keep, facts)
        raise KeyboardInterrupt("killed after the checkpoint")  # a kill right after step 3's checkpoint

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(_args(tmp_path / "resumed", teacher_dir, idx_dir, *common))
    monkeypatch.setattr(pretrain, "save_checkpoint", real_save)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step_3"]
    with caplog.at_level("INFO", logger="dreamteacher"):
        resumed = pretrain.main(_args(tmp_path / "resumed", teacher_dir, idx_dir, *common, "--resume", "latest"))
    # 3 steps of 2 micro-batches of 4 of the 64 images
    assert f"resumed from {resumed / 'checkpoints' / 'step_3'} at step 3 (epoch 0, batch 6)" in caplog.text

    a, b = _weights(straight / "checkpoints" / "step_6"), _weights(resumed / "checkpoints" / "step_6")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    lr_straight = [r["lr"] for r in _metrics(straight)]
    lr_resumed = {r["step"]: r["lr"] for r in _metrics(resumed)}
    assert [lr_resumed[s] for s in range(1, 7)] == lr_straight
    other = write_fashion_mnist(tmp_path / "other", n=64)  # the same number of images from another folder
    with pytest.raises(ValueError, match=rf"\(data: {re.escape(repr(str(idx_dir)))} in the checkpoint, "
                                         rf"{re.escape(repr(str(other)))} now; seed: 0 in the checkpoint, 9 now\)"):
        pretrain.main(_args(tmp_path / "resumed", teacher_dir, other, *common, "--resume", "latest", "--seed", "9"))


def test_corrupt_image_is_skipped_and_counted(tmp_path, teacher_dir, caplog):
    data = write_image_folder(tmp_path / "images", n=15, corrupt=1)
    out = pretrain.main(_args(tmp_path / "run", teacher_dir, data, "--max-steps", "1", "--batch-size", "16",
                              "--per-device-batch-size", "16", "--no-export"))
    assert _metrics(out)[-1]["data/skipped_images"] == 1
    assert "broken_0.png" in caplog.text


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, teacher_dir, idx_dir, monkeypatch):
    real_loss = pretrain.distillation_loss
    calls = {"n": 0}

    def loss_turning_nan(*args, **kwargs):
        calls["n"] += 1
        losses = real_loss(*args, **kwargs)
        if calls["n"] == 5:  # only the FIRST of step 3's two micro-batches: the last one's loss is finite
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(pretrain, "distillation_loss", loss_turning_nan)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 \(micro-batch 5\); stopped before the "
                                                 r"optimizer step.*step_2"):
        pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "6", "--checkpoint-every", "2"))
    good = tmp_path / "run" / "checkpoints" / "step_2"
    assert all(torch.isfinite(v).all() for v in _weights(good).values())
    assert not (tmp_path / "run" / "export").exists()
    calls["n"] = 0  # a run that turns NaN before its first checkpoint has none to name
    with pytest.raises(FloatingPointError, match=r"Last checkpoint \(finite weights\): none\. Lower the learning rate "
                                                 r"\(--lr\) or run in fp32 \(--mixed-precision no\), then --resume "
                                                 r"latest$"):
        pretrain.main(_args(tmp_path / "fresh", teacher_dir, idx_dir, "--max-steps", "6", "--checkpoint-every", "4"))


def test_bad_inputs_give_clear_errors(tmp_path, teacher_dir, idx_dir):
    with pytest.raises(UnknownRecipeError, match="resnet18.dreamteacher_fmnist"):
        pretrain.main(["--recipe", "resnet18.dreamteacher_nope", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown recipe field 'teacher.timestamp'"):
        pretrain.main(_args(tmp_path / "a", teacher_dir, idx_dir, "--set", "teacher.timestamp=10"))
    with pytest.raises(ValueError, match=r"pair \(16, 16\): the teacher has no tap at stride 16; its taps are at "
                                         r"strides \[1, 2, 4, 8\]"):
        pretrain.main(_args(tmp_path / "b", teacher_dir, idx_dir, "--set", "pairs=((4,4),(16,16))"))
    with pytest.raises(ValueError, match=r"pair \(4, 8\).*stride 8 can only feed"):
        pretrain.main(_args(tmp_path / "b", teacher_dir, idx_dir, "--set", "pairs=((4,8),)"))
    with pytest.raises(ValueError, match="not a multiple of per-device batch 3"):
        pretrain.main(_args(tmp_path / "c", teacher_dir, idx_dir, "--per-device-batch-size", "3"))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        pretrain.main(_args(tmp_path / "d", tmp_path / "does-not-exist", idx_dir))
    with pytest.raises(ValueError, match="teacher input 30x30 is not a multiple of 8"):  # at start-up: no data read
        pretrain.main(_args(tmp_path / "e", teacher_dir, tmp_path / "no-data-needed", "--set",
                            "data.input_size=(3,30,30)"))


def test_data_that_gives_no_batch_fails_instead_of_looping_forever(tmp_path, teacher_dir, idx_dir):
    with pytest.raises(ValueError, match=r"3 training images are fewer than one micro-batch of 4 x 1 processes"):
        pretrain.main(_args(tmp_path / "a", teacher_dir, idx_dir, "--limit-images", "3", "--max-steps", "2"))
    broken = write_image_folder(tmp_path / "broken", n=0, corrupt=8)
    with pytest.raises(ValueError, match=r"no usable micro-batch: 8 images, micro-batch 4 x 1 processes.*8 unreadable"):
        pretrain.main(_args(tmp_path / "b", teacher_dir, broken, "--max-steps", "2"))


def _accelerate(*launch_args: str, cwd: Path, tmp_path: Path, teacher_dir: Path, idx_dir: Path, steps: int = 2,
                extra: tuple[str, ...] = ()):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "training/pretrain.py",
               *_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", str(steps), *extra, threads=False)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_documented_accelerate_launch_command_runs(tmp_path, teacher_dir, idx_dir):
    result = _accelerate("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                         "--dynamo_backend", "no", cwd=REPO, tmp_path=tmp_path, teacher_dir=teacher_dir,
                         idx_dir=idx_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert timm.create_model(f"local-dir:{tmp_path / 'run' / 'export'}", pretrained=True)
    # accelerate launch sets OMP_NUM_THREADS=1 on a CPU machine (the env above does too): the trainer uses every core
    assert f"{len(os.sched_getaffinity(0))} torch threads per process on cpu" in result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_process_layouts_1x1_1x2_2x1_train_the_same_steps(tmp_path, teacher_dir, idx_dir):
    """Global batch 8 as 1 process x 2 accumulation, 1 node x 2 processes (configs/accelerate/cpu_2proc.yaml) and
    2 nodes x 1 process: the same batches, noise, lr schedule and, gradients averaged, the same losses."""
    steps = ["--max-steps", "3"]
    single = pretrain.main(_args(tmp_path / "1x1", teacher_dir, idx_dir, *steps))
    one_node = _accelerate("--config_file", "configs/accelerate/cpu_2proc.yaml", cwd=REPO, tmp_path=tmp_path / "1x2",
                           teacher_dir=teacher_dir, idx_dir=idx_dir, steps=3)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    assert "(4 x 2 processes x 1 accumulation)" in one_node.stderr

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes",
         "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "--mixed_precision", "no", "--dynamo_backend", "no", "training/pretrain.py",
         *_args(tmp_path / "2x1" / "run", teacher_dir, idx_dir, *steps, threads=False)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-3000:] + outputs[1][1][-3000:]

    runs = {"1x1": _metrics(single), "1x2": _metrics(tmp_path / "1x2" / "run"),
            "2x1": _metrics(tmp_path / "2x1" / "run")}
    for name, rows in runs.items():
        assert [r["step"] for r in rows] == [1, 2, 3], name
        assert [r["lr"] for r in rows] == [r["lr"] for r in runs["1x1"]], name
        losses, reference = [r["loss/loss"] for r in rows], [r["loss/loss"] for r in runs["1x1"]]
        assert losses[0] == pytest.approx(reference[0], rel=1e-5), name  # same batch, noise and weights
        # after updates: all-reduce order differs between layouts and Adam magnifies float noise in tiny gradients
        assert losses == pytest.approx(reference, rel=5e-3), name
    assert timm.create_model(f"local-dir:{tmp_path / '1x2' / 'run' / 'export'}", pretrained=True)


def test_no_argument_default_uses_the_fmnist_recipe_and_the_committed_teacher(tmp_path, monkeypatch):
    import training.run.data

    monkeypatch.setattr(training.run.data, "DEBIAN_FASHION_MNIST_DIR", write_fashion_mnist(tmp_path / "debian", n=32))
    monkeypatch.chdir(tmp_path)  # the recipe's relative teacher folder is found in the repo from anywhere
    # One thread, as in every in-process test (the every-core default is checked by the accelerate launch test): a
    # thread pool started here outlives the test, and a process forked after it (mutmut's) deadlocks in its first op.
    monkeypatch.setattr(pretrain, "cpu_threads_per_process", lambda: 1)
    out = pretrain.main(["--max-steps", "2", "--batch-size", "16", "--num-workers", "0"])  # only shorter, smaller
    assert out == Path("runs/resnet18.dreamteacher_fmnist")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["teacher"]["source"] == "teachers/ddpm-fashion-mnist-32" and recipe["arch"] == "resnet18"
    model = timm.create_model(f"local-dir:{tmp_path / out / 'export'}", pretrained=True).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 512)


@pytest.mark.parametrize("script", ["training/pretrain.py", "training/train_teacher.py",
                                    "training/evaluate.py --model resnet18 --random-init"])
def test_command_line_user_errors_are_one_line_with_status_2(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DREAMTEACHER_TRACEBACK", None)
    script, *extra = script.split()
    result = subprocess.run([sys.executable, str(REPO / script), *extra, "--recipe", "resnet51.dreamteacher_in1k"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"{Path(script).name}: error: unknown DreamTeacher recipe 'resnet51.dreamteacher_in1k'")
    assert "Traceback" not in result.stderr


def test_checkpoint_saves_replace_atomically_and_clean_leftovers(tmp_path, teacher_dir, idx_dir, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        pretrain.main(_args(run, teacher_dir, idx_dir, "--max-steps", "2", "--resume", "latest", "--no-export"))
    assert "--resume latest: no checkpoint" in caplog.text and "starting from scratch" in caplog.text
    before = _weights(run / "checkpoints" / "step_2")
    (run / "checkpoints" / ".tmp_step_7").mkdir()  # what a save killed half-way leaves behind
    (run / "checkpoints" / ".tmp_step_7" / "model.safetensors").write_bytes(b"partial")
    pretrain.main(_args(run, teacher_dir, idx_dir, "--max-steps", "2", "--resume", "latest", "--no-export"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_2"]  # re-saved in place, leftovers and the replaced copy gone
    after = _weights(run / "checkpoints" / "step_2")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_streaming_run_trains_and_resumes_and_a_changed_micro_batch_is_refused(tmp_path, teacher_dir):
    data = write_image_folder(tmp_path / "images", n=16)
    common = ["--streaming", "--max-steps", "4", "--checkpoint-every", "2", "--no-export"]
    out = pretrain.main(_args(tmp_path / "run", teacher_dir, data, *common))
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if killed after step 4's metrics, before its checkpoint
    straight = _metrics(out)
    resumed = pretrain.main(_args(tmp_path / "run", teacher_dir, data, *common, "--resume", "latest"))
    assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3, 4]  # steps 3 and 4 again, from step_2
    assert [r["loss/loss"] for r in _metrics(resumed)] == pytest.approx([r["loss/loss"] for r in straight])
    with pytest.raises(ValueError, match=r"accumulation: 2 in the checkpoint, 4 now.*micro_batch: 4 .* 2 now"):
        pretrain.main(_args(tmp_path / "run", teacher_dir, data, *common, "--resume", "latest",
                            "--per-device-batch-size", "2"))


def test_lr_follows_warm_up_then_cosine_to_min_lr_by_formula(tmp_path, teacher_dir, idx_dir):
    # 8 steps, warm-up 0.25 of them (2 steps), peak 1e-3, floor 1e-4: an independent formula, not the code's own
    out = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "8", "--lr", "1e-3",
                              "--epochs", "1", "--set", "optim.warmup_epochs=0.25", "--set", "optim.min_lr=1e-4",
                              "--checkpoint-every", "0", "--no-export"))
    lrs = [r["lr"] for r in _metrics(out)]

    def expected(step):  # the lr in force after `step` optimizer steps (the logged value)
        if step < 2:
            return 1e-3 * (step + 1) / 2
        return 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (step - 2) / 6))

    assert lrs == pytest.approx([expected(s) for s in range(1, 9)], rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-4)


def test_without_max_steps_the_run_lasts_the_recipes_epochs(tmp_path, teacher_dir, idx_dir):
    # 64 images in batches of 8: 8 steps per epoch, so a quarter epoch is 2 steps
    out = pretrain.main(_args(tmp_path / "quarter", teacher_dir, idx_dir, "--epochs", "0.25", "--no-export"))
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    # a recipe without epochs (steps only) has no warm-up: the cosine starts at the peak lr
    out = pretrain.main(_args(tmp_path / "steps", teacher_dir, idx_dir, "--epochs", "0", "--max-steps", "2",
                              "--lr", "1e-3", "--set", "optim.min_lr=1e-4", "--no-export"))
    assert [r["lr"] for r in _metrics(out)] == pytest.approx([1e-4 + 0.9e-3 * 0.5, 1e-4], rel=1e-9)


def test_logged_metrics_average_the_steps_micro_batches_and_time_them(tmp_path, teacher_dir, idx_dir, monkeypatch,
                                                                      capsys, tracker_runs):
    from types import SimpleNamespace

    import accelerate

    ticks = iter(range(10_000))  # a clock that moves 1/8 s per reading
    monkeypatch.setattr(pretrain, "time", SimpleNamespace(perf_counter=lambda: next(ticks) / 8))
    micro_losses, logged = [], []
    real_loss, real_log = pretrain.distillation_loss, accelerate.Accelerator.log

    def loss(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        micro_losses.append(losses["loss"].item())
        return losses

    def log(self, values, step=None, **kwargs):
        logged.append(step)
        return real_log(self, values, step=step, **kwargs)

    monkeypatch.setattr(pretrain, "distillation_loss", loss)
    monkeypatch.setattr(accelerate.Accelerator, "log", log)
    out = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "2", "--no-export"))
    rows = _metrics(out)
    assert [r["loss/loss"] for r in rows] == pytest.approx([sum(micro_losses[:2]) / 2, sum(micro_losses[2:]) / 2])
    # per step: 2 micro-batches, each read 3 times (teacher 1 tick, student 1 tick), then the step's end: 7 ticks
    assert [(r["time/teacher_s"], r["time/student_s"]) for r in rows] == [(0.25, 0.25)] * 2
    assert [r["images_per_s"] for r in rows] == pytest.approx([8 / 0.875] * 2)
    assert logged == [1, 2]  # TensorBoard's step axis
    assert tracker_runs == [("pretrain", {"recipe": "resnet18.dreamteacher_fmnist", "total_steps": 2, "micro_batch": 4,
                                      "accumulation": 2, "processes": 1})]
    bars = [line for line in capsys.readouterr().err.replace("\n", "\r").split("\r") if line.startswith("distill")]
    assert "| 2/2 [" in bars[-1]  # the progress bar counts optimizer steps


def test_teacher_noise_is_fresh_every_micro_batch(tmp_path, teacher_dir, idx_dir, monkeypatch, capsys):
    draws, seeds, loaders = [], [], []
    real_targets, real_loader = pretrain.teacher_targets, pretrain.build_dataloader

    def recording(teacher, cache, batch, images, hflip, noise):
        draws.append(torch.randn(4, generator=torch.Generator().set_state(noise.get_state())))
        seeds.append(noise.initial_seed())
        return real_targets(teacher, cache, batch, images, hflip, noise)

    def loader(dataset, micro_batch, **kwargs):
        loaders.append(kwargs)
        return real_loader(dataset, micro_batch, **kwargs)

    monkeypatch.setattr(pretrain, "teacher_targets", recording)
    monkeypatch.setattr(pretrain, "build_dataloader", loader)
    pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "2", "--no-export", "--seed", "5"))
    assert len(draws) == 4  # 2 steps x 2 micro-batches
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    # seeded by (seed, micro-step, rank) so that a resumed run draws the same: one process here
    assert seeds == [noise_seed(5, micro_step) for micro_step in range(4)]
    assert loaders == [{"shuffle": True, "seed": 5, "num_workers": 0}]  # a seeded shuffle
    assert "distill: 100%" in capsys.readouterr().err  # the progress bar


def test_feature_picture_shows_seeded_teacher_targets_beside_eval_mode_predictions(tmp_path, monkeypatch):
    """save_feature_picture: the teacher encodes with a generator seeded from `seed` on the run's device, its maps
    are pooled to each student level, the student predicts in eval mode and is left in the mode it was in, and only
    the main process draws, only when there are images."""
    from types import SimpleNamespace

    import training.distill.pictures
    from training.distill.pairing import LevelPair

    pairs = [LevelPair(student_stride=4, teacher_stride=2, teacher_channels=3),
             LevelPair(student_stride=8, teacher_stride=8, teacher_channels=5)]
    maps = {2: torch.randn(2, 3, 8, 8), 8: torch.randn(2, 5, 2, 2)}
    teacher_calls, drawn = [], []

    class Teacher:
        mean, std = torch.tensor([0.1]), torch.tensor([0.2])

        def __call__(self, images, generator):
            teacher_calls.append((generator.initial_seed(), generator.device.type, images))
            return maps

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pairs, self.modes = pairs, []

        def forward(self, images):
            self.modes.append(self.training)
            return [torch.ones(2, 4, 4, 4), torch.ones(2, 6, 2, 2)]

    def accelerator(main_process=True):
        return SimpleNamespace(is_main_process=main_process, device=torch.device("cpu"), unwrap_model=lambda m: m)

    monkeypatch.setattr(training.distill.pictures, "save_feature_comparison", lambda *a, **k: drawn.append((a, k)))
    images = torch.randn(2, 1, 16, 16)
    for main_process, was_training in ((True, True), (True, False), (False, True)):
        student = Student().train(was_training)
        pretrain.save_feature_picture(accelerator(main_process), Teacher(), student, images, tmp_path / "s", seed=7)
        assert student.training is was_training
        assert student.modes == ([False] if main_process else [])
    for no_images in (None, images[:0]):
        pretrain.save_feature_picture(accelerator(), Teacher(), Student(), no_images, tmp_path / "s", seed=7)
    assert len(teacher_calls) == len(drawn) == 2
    assert all(seed == 7 and device == "cpu" and shown is images for seed, device, shown in teacher_calls)
    (shown, targets, predictions, strides, path), kwargs = drawn[0]
    assert shown is images and strides == [4, 8] and path == tmp_path / "s" / "features.png"
    torch.testing.assert_close(targets[0], torch.nn.functional.avg_pool2d(maps[2], 2))  # stride 2 -> the 4x4 grid
    assert targets[1] is maps[8] and [tuple(p.shape) for p in predictions] == [(2, 4, 4, 4), (2, 6, 2, 2)]
    assert kwargs == {"mean": Teacher.mean, "std": Teacher.std}


def test_build_data_takes_the_sources_limit_and_training_augmentation(tmp_path, teacher_dir, idx_dir, monkeypatch):
    def build(*extra):
        args = pretrain.parse_args(["--teacher", str(teacher_dir), "--data-dir", str(idx_dir), *extra])
        return pretrain.build_data(args, pretrain.recipe_from_args(args), accelerator=None)

    def views(dataset, index=3):  # one item under 16 augmentation seeds
        return {dataset[(index, seed)]["pixel_values"].numpy().tobytes() for seed in range(16)}

    dataset, images = build()
    assert images == len(dataset) == 64 and "index" not in dataset[0]
    assert len(views(dataset)) > 1  # the recipe's random training augmentation (flips)
    dataset, images = build("--limit-images", "10")
    assert images == len(dataset) == 10
    assert build("--limit-images", "100")[1] == 64
    dataset, _ = build("--feature-cache", str(tmp_path / "cache"))  # the trainer flips batch and targets together
    assert len(views(dataset)) == 1 and dataset[5]["index"] == 5
    sources = []
    monkeypatch.setattr(pretrain, "load_image_dataset", lambda source, **kw: sources.append(source) or [])
    args = pretrain.parse_args(["--teacher", str(teacher_dir), "--dataset", "someone/their-images"])
    pretrain.build_data(args, pretrain.recipe_from_args(args), accelerator=None)
    assert sources == ["someone/their-images"]


def test_command_line_defaults_and_choices():
    args = pretrain.parse_args([])
    assert (args.num_workers, args.checkpoint_every, args.channels_last, args.teacher_dtype) == (2, 500, False, None)
    assert (args.cache_encodings, args.feature_cache) == (2, None)  # the cache is opt-in
    assert args.fast_path is None  # settled by the device and the recipe (tests/test_fast_path.py)
    assert pretrain.parse_args(["--channels-last", "--teacher-dtype", "fp16"]).teacher_dtype == "fp16"
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--teacher-dtype", "fp64"])


class _TeacherBuilt(Exception):
    """Stops a run once its teacher is configured."""


@pytest.mark.parametrize("flags, mixed_precision, dtype, channels_last, fast_path", [
    ([], "no", None, False, PLAIN),  # on a CPU the fast path stays off unless asked for
    (["--teacher-dtype", "bf16"], "no", torch.bfloat16, False, PLAIN),
    (["--teacher-dtype", "fp16", "--channels-last"], "no", torch.float16, True, PLAIN),
    ([], "bf16", torch.bfloat16, False, PLAIN),  # the mixed precision `accelerate launch` was given
    (["--teacher-dtype", "fp32"], "bf16", None, False, PLAIN),
    (["--fast-path"], "bf16", torch.bfloat16, True, GPU_FAST_PATH),  # brings channels_last along
    (["--fast-path"], "no", None, True, dataclasses.replace(GPU_FAST_PATH, weights_in_dtype=False)),  # stays fp32
])
def test_the_teacher_runs_in_the_dtype_asked_for_else_in_the_runs_mixed_precision(
        tmp_path, teacher_dir, idx_dir, monkeypatch, flags, mixed_precision, dtype, channels_last, fast_path):
    from accelerate.state import AcceleratorState

    built = []

    def build_teacher(*args, **kwargs):
        built.append((kwargs["dtype"], kwargs["channels_last"], kwargs["device"], kwargs["fast_path"]))
        raise _TeacherBuilt

    monkeypatch.setattr(pretrain, "build_teacher", build_teacher)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed_precision)
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(_TeacherBuilt):
            pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, *flags))
    finally:
        AcceleratorState._reset_state(True)
    assert built == [(dtype, channels_last, torch.device("cpu"), fast_path)]


def test_a_convnext_student_trains_under_two_process_ddp(tmp_path, teacher_dir, idx_dir):
    """The ImageNet ConvNeXt recipe's family on 2 gloo processes: without its unreached head.norm frozen, DDP stops
    at the second step waiting for that parameter's gradient."""
    result = _accelerate("--config_file", "configs/accelerate/cpu_2proc.yaml", cwd=REPO, tmp_path=tmp_path,
                         teacher_dir=teacher_dir, idx_dir=idx_dir, steps=3,
                         extra=["--set", "arch=convnext_atto", "--set", "zero_init_last=None"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4 x 2 processes x 1 accumulation)" in result.stderr
    assert "frozen at their init: head.norm.weight, head.norm.bias" in result.stderr
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3]
    model = timm.create_model(f"local-dir:{tmp_path / 'run' / 'export'}", pretrained=True)
    assert type(model).__name__ == "ConvNeXt"


def test_a_fresh_start_drops_the_metrics_of_a_killed_run_that_left_no_checkpoint(tmp_path, teacher_dir, idx_dir,
                                                                                caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss/loss": 9.0}\n{"step": 2, "loss/lo')  # torn by the kill
    with caplog.at_level("INFO", logger="dreamteacher"):
        pretrain.main(_args(out, teacher_dir, idx_dir, "--max-steps", "2", "--no-export"))
    assert [r["step"] for r in _metrics(out)] == [1, 2] and all(r["loss/loss"] != 9.0 for r in _metrics(out))
    assert "metrics.jsonl of an earlier run that left no checkpoint dropped: this run logs from step 1" in caplog.text


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--max-steps", "-5"], "--max-steps must be >= 1, got -5"),
    (["--per-device-batch-size", "0"], "--per-device-batch-size must be >= 1, got 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--epochs", "-1"], "--epochs must be >= 0, got -1.0"),
])
def test_out_of_range_flags_end_at_once_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain.parse_args(flags)
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")
    assert pretrain.parse_args(["--checkpoint-every", "0"]).checkpoint_every == 0  # 0: a checkpoint at the end only


def test_a_damaged_latest_checkpoint_is_reported_and_the_one_before_is_resumed(tmp_path, teacher_dir, idx_dir,
                                                                              caplog):
    common = ("--max-steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--no-export")
    run = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, *common))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_1", "step_2"]
    (run / "checkpoints" / "step_2" / "model.safetensors").write_bytes(b"")  # as a crash before the data hit the disk
    with caplog.at_level("INFO", logger="dreamteacher"):
        pretrain.main(_args(run, teacher_dir, idx_dir, *common, "--resume", "latest"))
    assert "step_2 does not load" in caplog.text and "resuming from" in caplog.text
    assert f"resumed from {run / 'checkpoints' / 'step_1'} at step 1" in caplog.text
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot resume: checkpoint .* no earlier checkpoint"):
        pretrain.main(_args(run, teacher_dir, idx_dir, *common, "--resume", "latest"))


def test_resume_takes_a_new_lr_and_refuses_another_recipe_or_length_naming_the_field(tmp_path, teacher_dir, idx_dir,
                                                                                    caplog):
    common = ("--max-steps", "2", "--checkpoint-every", "1", "--no-export")
    run = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, *common))
    step_1 = run / "checkpoints" / "step_1"
    with caplog.at_level("INFO", logger="dreamteacher"):
        pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, *common, "--resume", str(step_1), "--lr", "1e-3"))
    assert "--lr 0.001: the resumed schedule peaks at it from step 1 on" in caplog.text
    assert _metrics(run)[-1]["step"] == 2 and _metrics(run)[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine end
    with pytest.raises(ValueError, match=r"its run's recipe .* differs .*regressor_width: 16 then, 32 now"):
        pretrain.main(_args(tmp_path / "elsewhere", teacher_dir, idx_dir, *common, "--resume", str(step_1),
                            "--set", "regressor_width=32"))  # into another --output-dir: still checked
    with pytest.raises(ValueError, match=r"steps: 2 in the checkpoint, 5 now"):
        pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, "--max-steps", "5", "--checkpoint-every", "1",
                            "--no-export", "--resume", str(step_1)))


class _RunsCode:
    """A pickle that would run a command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_runs_no_code_from_a_planted_pickle(tmp_path, teacher_dir, idx_dir):
    common = ("--max-steps", "2", "--checkpoint-every", "1", "--no-export")
    run = pretrain.main(_args(tmp_path / "run", teacher_dir, idx_dir, *common))
    marker = tmp_path / "code-ran"
    torch.save({"step": _RunsCode(marker)}, run / "checkpoints" / "step_2" / "custom_checkpoint_1.pkl")
    with pytest.raises(ValueError, match=r"refusing to resume .*step_2: custom_checkpoint_1\.pkl is a pickle that "
                                         r"does more than hold data"):
        pretrain.main(_args(run, teacher_dir, idx_dir, *common, "--resume", "latest"))
    assert not marker.exists()
