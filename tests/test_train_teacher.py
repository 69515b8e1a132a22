"""training/train_teacher.py: a few DDPM steps on tiny IDX data, export, checkpoint rotation, exact resume."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tiny import make_fmnist_dir
from training import train_teacher
from training.run.schedule import noise_seed
from training.teacher import ddpm

REPO = Path(__file__).resolve().parents[1]
TINY = ["--block-out-channels", "8,8,16,16", "--norm-num-groups", "4", "--layers-per-block", "1",
        "--batch-size", "8", "--lr-warmup-steps", "1", "--num-samples", "4", "--sample-steps", "2",
        "--log-every", "1", "--seed", "3"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Runs default to every core; tests keep conftest's one thread (see test_cpu_runs_default_to_every_core)."""
    monkeypatch.setattr(train_teacher, "cpu_threads_per_process", lambda: 1)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    make_fmnist_dir(d, n=32)  # 4 batches of 8 per epoch
    return d


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_train_export_and_rotation(tmp_path, idx_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    out = tmp_path / "run"
    export = train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(out), "--max-steps", "6",
                                 "--checkpoint-every", "2", "--keep-checkpoints", "2", "--fp16-export", *TINY])
    assert export == out / "export"
    unet = UNet2DModel.from_pretrained(export / "unet", torch_dtype=torch.float32)
    assert unet.config.block_out_channels == (8, 8, 16, 16) or list(unet.config.block_out_channels) == [8, 8, 16, 16]
    assert set(unet.config.down_block_types) == {"DownBlock2D"} and set(unet.config.up_block_types) == {"UpBlock2D"}
    assert all(w.dtype == torch.float16 for w in _unet_weights(export).values())
    sched = DDPMScheduler.from_pretrained(export / "scheduler")
    assert sched.config.beta_schedule == "linear" and sched.config.prediction_type == "epsilon"
    assert sched.config.num_train_timesteps == 1000
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert (export / "samples.png").is_file() and (out / "samples" / "step_0000006.png").is_file()
    readme = (export / "README.md").read_text()
    assert "--max-steps 6" in readme and "| optimizer steps | 6 |" in readme
    with torch.no_grad():
        y = unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 500])).sample
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
    # rotation: checkpoints at steps 2, 4, 6 with total_limit 2 -> the last two remain
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_6"]
    # the export holds the EMA weights, not the raw model weights
    ema = torch.load(out / "checkpoints" / "step_6" / "custom_checkpoint_0.pkl", weights_only=True)
    names = [n for n, _ in unet.named_parameters()]
    exported = _unet_weights(export)
    for name, shadow in zip(names, ema["shadow_params"], strict=True):
        torch.testing.assert_close(exported[name].float(), shadow.half().float())
    assert not list(export.parent.glob(".export.*"))  # no temp folder left behind


def test_resume_continues_exactly(tmp_path, idx_dir):
    full = tmp_path / "full"
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(full), "--max-steps", "6",
                        "--checkpoint-every", "2", *TINY])
    # a run killed after step 2 (mid-epoch: 4 steps/epoch), resumed with --resume latest
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_2", part / "checkpoints" / "step_2")
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(part), "--max-steps", "6",
                        "--checkpoint-every", "2", "--resume", "latest", *TINY])
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    state = torch.load(part / "checkpoints" / "step_6" / "custom_checkpoint_2.pkl", weights_only=True)
    assert state["step"] == 6 and state["images_seen"] == 6 * 8
    a, b = _unet_weights(full / "export"), _unet_weights(part / "export")
    for k in a:  # same data order, noise and timesteps after the resume as in the uninterrupted run: bit-equal
        assert torch.equal(a[k], b[k]), k
    assert "| optimizer steps | 6 |" in (part / "export" / "README.md").read_text()


def test_lr_follows_the_cosine_once_per_optimizer_step_with_accumulation_and_resume(tmp_path, idx_dir, caplog):
    # 4 micro-batches per epoch, accumulation 3: optimizer steps of 3 + 1 micro-batches (Accelerate syncs at the end
    # of the loader), so 2 steps per epoch; a resume after step 3 must continue mid-epoch 1, not at its start
    common = ["--data-dir", str(idx_dir), "--max-steps", "6", "--checkpoint-every", "3",
              "--per-device-batch-size", "8", "--lr-warmup-steps", "0", "--lr", "1e-3",
              "--block-out-channels", "8,8,16,16", "--norm-num-groups", "4", "--batch-size", "24",
              "--num-samples", "4", "--sample-steps", "2"]
    full = tmp_path / "full"
    train_teacher.main([*common, "--output-dir", str(full), "--seed", "3", "--log-every", "1"])
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:  # diffusers' cosine, stepped once per optimizer step: lr(step) = 0.5 (1 + cos(pi step / 6))
        assert r["lr"] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * r["step"] / 6)), abs=1e-12)
    assert [round(r["epoch"], 6) for r in rows] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_3", part / "checkpoints" / "step_3")
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text()[:-20])  # torn by a kill mid-line
    with caplog.at_level("INFO", logger="train_teacher"):
        train_teacher.main([*common, "--output-dir", str(part), "--seed", "3", "--log-every", "1", "--resume",
                            "latest"])
    assert f"resumed from {part / 'checkpoints' / 'step_3'} at step 3 (epoch 1, batch 3)" in caplog.text
    a, b = _unet_weights(full / "export"), _unet_weights(part / "export")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # no torn line, no step twice

    with pytest.raises(ValueError, match=r"batch_per_device: 8 in the checkpoint, 4 now; .*seed: 3 in the "
                                         r"checkpoint, 4 now.*--allow-resume-mismatch"):
        train_teacher.main([*common, "--output-dir", str(part), "--seed", "4", "--log-every", "1", "--batch-size",
                            "12", "--per-device-batch-size", "4", "--resume", str(part / "checkpoints" / "step_3")])


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(tmp_path, idx_dir):
    run = tmp_path / "run"
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(run), "--max-steps", "1", *TINY])
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*--resume latest"):
        train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(run), "--max-steps", "2", *TINY])


def test_a_fresh_start_drops_the_metrics_of_a_killed_run_that_left_no_checkpoint(tmp_path, idx_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # torn by the kill
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(run), "--max-steps", "2", *TINY])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] != 9.0 for r in rows)


def test_bad_arguments_are_rejected(idx_dir, tmp_path):
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--block-out-channels", "32,64,x"])
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--block-out-channels", "8,8", "--norm-num-groups", "32"])
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--resolution", "30"])  # not divisible by 2**3
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path), "--max-steps", "1",
                            "--resume", str(tmp_path / "nope"), *TINY])


def test_teacher_export_refuses_a_folder_with_a_users_files_before_training(idx_dir, tmp_path):
    target = tmp_path / "teachers" / "mine"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a previous teacher export.*notes\.txt"):
        train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                            "--export-dir", str(target), *TINY])
    assert (target / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_unreadable_data_fails_instead_of_looping_forever(tmp_path):
    from tests.tiny import write_image_folder

    broken = write_image_folder(tmp_path / "broken", n=0, corrupt=8)
    with pytest.raises(ValueError, match=r"no training step: 8 images, batch 8 x 1 accumulation, 8 unreadable"):
        train_teacher.main(["--data-dir", str(broken), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                            *TINY])


def test_nan_loss_stops_before_the_optimizer_step(idx_dir, tmp_path, monkeypatch):
    import torch.nn.functional as F

    calls = {"n": 0}

    class NanOnSecondStep:
        def __getattr__(self, name):
            return getattr(F, name)

        def mse_loss(self, *args, **kwargs):
            calls["n"] += 1
            loss = F.mse_loss(*args, **kwargs)
            return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(ddpm, "F", NanOnSecondStep())
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(micro-batch 2\); stopped before the "
                                                 r"optimizer step.*"
                                                 r"step_1"):
        train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
                            "--checkpoint-every", "1", *TINY])
    assert not (tmp_path / "run" / "export").exists()


def test_script_entry_point_imports_from_any_cwd(tmp_path):
    """`python training/train_teacher.py` (and `accelerate launch`) put training/, not the repo, on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(REPO / "training" / "train_teacher.py"), "--help"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--block-out-channels" in r.stdout and "--resume" in r.stdout


def test_unet_decoder_levels_at_strides_8_4_2_1():
    unet = ddpm.build_unet(32, (8, 8, 16, 16), 1, norm_num_groups=4)
    sizes = []
    hooks = [blk.resnets[-1].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for blk in unet.up_blocks]
    with torch.no_grad():
        unet(torch.zeros(1, 3, 32, 32), torch.tensor([50]))
    for h in hooks:
        h.remove()
    assert [32 // s for s in sizes] == [8, 4, 2, 1]
    assert not any("attn" in n.lower() for n, _ in unet.named_modules())
    np.testing.assert_equal(len(unet.down_blocks), 4)


@pytest.mark.slow
def test_two_processes_step_the_lr_once_per_optimizer_step(tmp_path, idx_dir):
    # a prepared scheduler would step once per process: the cosine would end after half the steps
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
         "training/train_teacher.py", "--data-dir", str(idx_dir), "--output-dir", str(run), "--max-steps", "4",
         "--lr", "1e-3", "--lr-warmup-steps", "0", "--block-out-channels", "8,8,16,16", "--norm-num-groups", "4",
         "--batch-size", "4", "--num-samples", "2", "--sample-steps", "2", "--log-every", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in (1, 2, 3, 4)],
                                                    abs=1e-12)


class _OracleUNet(torch.nn.Module):
    """Knows the clean images, so it inverts the forward process exactly: returns the noise or the clean images."""

    def __init__(self, scheduler, clean, returns):
        super().__init__()
        self.scheduler, self.clean, self.returns = scheduler, clean, returns

    def forward(self, noisy, t, return_dict=False):
        abar = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = (noisy - abar.sqrt() * self.clean) / (1 - abar).sqrt()
        return (noise if self.returns == "noise" else self.clean,)


@pytest.mark.parametrize("prediction_type, right, wrong", [("epsilon", "noise", "clean"),
                                                           ("sample", "clean", "noise")])
def test_denoising_loss_targets_what_the_scheduler_predicts(prediction_type, right, wrong):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    exact = ddpm.denoising_loss(_OracleUNet(scheduler, clean, right), scheduler, clean, noise, t)
    mistaken = ddpm.denoising_loss(_OracleUNet(scheduler, clean, wrong), scheduler, clean, noise, t)
    assert exact.item() < 1e-8 and mistaken.item() > 0.5


def test_the_default_teacher_is_trained_to_predict_the_noise():
    assert ddpm.build_scheduler().config.prediction_type == "epsilon"


def test_init_from_starts_from_a_teacher_folders_weights_and_a_resume_from_its_checkpoint(tmp_path, idx_dir):
    first = train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "a"), "--max-steps", "2",
                                "--checkpoint-every", "2", "--fp16-export", *TINY])
    first_cost = ddpm.training_cost(first)
    # lr 0: the optimizer leaves the weights as loaded, so the (fp32) EMA export must equal the fp16 folder's
    second = train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "b"), "--max-steps", "1",
                                 "--checkpoint-every", "1", "--init-from", str(first), *TINY, "--lr", "0"])
    a, b = _unet_weights(first), _unet_weights(second)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.float32 and torch.equal(a[k].float(), b[k]), k
    readme = (second / "README.md").read_text()
    assert f"| initialized from | {first} |" in readme and f"| prior training | {first_cost} |" in readme
    assert ddpm.training_cost(second).startswith(f"{first_cost}, then ")
    assert "_name_or_path" not in json.loads((second / "unet" / "config.json").read_text())  # no local path

    # a resume takes the checkpoint's weights: the init folder is not read again (here it is gone)
    common = ["--data-dir", str(idx_dir), "--max-steps", "2", "--checkpoint-every", "1", "--init-from", str(first),
              *TINY, "--lr", "1e-3"]
    full = train_teacher.main([*common, "--output-dir", str(tmp_path / "full")])
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_1", part / "checkpoints" / "step_1")
    shutil.rmtree(first)
    resumed = train_teacher.main([*common, "--output-dir", str(part), "--resume", "latest"])
    a, b = _unet_weights(full), _unet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"init_from: .* in the checkpoint, None now"):
        train_teacher.main(["--data-dir", str(idx_dir), "--max-steps", "3", *TINY, "--output-dir", str(part),
                            "--resume", "latest"])


@pytest.mark.parametrize("flags, difference", [
    (["--layers-per-block", "2"], r"UNet layers_per_block: folder 1, flags 2"),
    (["--norm-num-groups", "8"], r"UNet norm_num_groups: folder 4, flags 8"),  # same weight shapes
    (["--block-out-channels", "8,8,16,32"],
     r"UNet block_out_channels: folder \(8, 8, 16, 16\), flags \(8, 8, 16, 32\)"),
    (["--num-train-timesteps", "500"], r"noise schedule num_train_timesteps: folder 1000, flags 500"),
])
def test_init_from_refuses_a_folder_the_flags_do_not_describe_before_reading_data(tmp_path, idx_dir, flags,
                                                                                   difference):
    teacher = tmp_path / "teacher"
    ddpm.build_unet(32, (8, 8, 16, 16), 1, norm_num_groups=4).save_pretrained(teacher / "unet")
    ddpm.build_scheduler().save_pretrained(teacher / "scheduler")
    with pytest.raises(ValueError, match=difference):
        train_teacher.main(["--data-dir", str(tmp_path / "no-data-here"), "--output-dir", str(tmp_path / "run"),
                            "--max-steps", "1", "--init-from", str(teacher), *TINY, *flags])
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match=r"no unet/config.json"):
        train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "d"), "--max-steps", "1",
                            "--init-from", str(tmp_path), *TINY])


def test_every_optimizer_ema_and_noise_flag_reaches_what_it_configures(tmp_path, idx_dir, monkeypatch):
    import accelerate
    import diffusers.optimization
    import diffusers.training_utils

    seen = {}

    def spy(name, real):
        def wrapped(*args, **kwargs):
            seen[name] = {"name": args[0], **kwargs} if name == "sched" else kwargs
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(torch.optim, "AdamW", spy("adamw", torch.optim.AdamW))
    monkeypatch.setattr(diffusers.training_utils, "EMAModel", spy("ema", diffusers.training_utils.EMAModel))
    monkeypatch.setattr(diffusers.optimization, "get_scheduler", spy("sched", diffusers.optimization.get_scheduler))
    real_clip = accelerate.Accelerator.clip_grad_norm_
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_",
                        lambda self, params, max_norm, *a, **k: seen.setdefault("clip", []).append(max_norm)
                        or real_clip(self, params, max_norm, *a, **k))
    export = train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
                                 *TINY, "--lr", "3e-4", "--adam-beta1", "0.8", "--adam-beta2", "0.97",
                                 "--weight-decay", "0.02", "--max-grad-norm", "0.5", "--ema-max-decay", "0.99",
                                 "--ema-inv-gamma", "2.0", "--ema-power", "0.5", "--lr-scheduler", "constant",
                                 "--lr-warmup-steps", "2", "--num-train-timesteps", "500"])
    assert seen["adamw"] == {"lr": 3e-4, "betas": (0.8, 0.97), "weight_decay": 0.02}
    assert {k: seen["ema"][k] for k in ("decay", "use_ema_warmup", "inv_gamma", "power")} == {
        "decay": 0.99, "use_ema_warmup": True, "inv_gamma": 2.0, "power": 0.5}
    assert seen["sched"] == {"name": "constant_with_warmup", "num_warmup_steps": 2, "num_training_steps": 3}
    assert seen["clip"] == [0.5] * 3  # once per optimizer step
    from diffusers import DDPMScheduler

    assert DDPMScheduler.from_pretrained(export / "scheduler").config.num_train_timesteps == 500
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1.5e-4, 3e-4, 3e-4], abs=1e-12)  # 2 warm-up steps, constant
    # EMA warm-up: decay(step) = 1 - (1 + step / inv_gamma) ** -power, capped at --ema-max-decay
    assert [r["ema_decay"] for r in rows] == pytest.approx([0.0] + [1 - (1 + k / 2.0) ** -0.5 for k in (1, 2)],
                                                           abs=1e-9)


class _StepClock:
    """train_teacher's `time`: 60 s per optimizer step done (counted by a hook on the optimizer), however often it is
    read, so step k ends at minute k of training."""

    def __init__(self, monkeypatch):
        self.steps = 0
        real = torch.optim.AdamW

        def counting_adamw(*args, **kwargs):
            optimizer = real(*args, **kwargs)
            optimizer.register_step_post_hook(lambda *_: setattr(self, "steps", self.steps + 1))
            return optimizer

        monkeypatch.setattr(torch.optim, "AdamW", counting_adamw)
        monkeypatch.setattr(train_teacher, "time", self)

    def time(self):
        return 60.0 * self.steps


def test_minute_based_checkpoints_and_stop_follow_the_training_clock(tmp_path, idx_dir, monkeypatch, caplog):
    _StepClock(monkeypatch)
    run = tmp_path / "every"
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(run), "--max-steps", "6",
                        "--checkpoint-every", "100", "--checkpoint-every-minutes", "2",
                        "--keep-checkpoints", "10", *TINY])
    # due once 2 minutes passed since the last checkpoint (steps 2 and 4), and at the end
    assert sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir()) == [2, 4, 6]

    _StepClock(monkeypatch)
    run = tmp_path / "stop"
    with caplog.at_level("INFO", logger="train_teacher"):
        export = train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(run), "--max-steps", "10",
                                     "--checkpoint-every", "100", "--max-minutes", "2", *TINY])
    assert "--max-minutes 2.0 reached at step 2: stopping" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # stopped when 2 minutes were reached, not after
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]
    assert "| optimizer steps | 2 |" in (export / "README.md").read_text()


def test_training_cost_reads_wall_time_machine_and_prior_training_from_a_teacher_readme(tmp_path):
    assert ddpm.training_cost(tmp_path) is None  # no README
    (tmp_path / "README.md").write_text("| machine | 1x H200, 16 cores |\n")
    assert ddpm.training_cost(tmp_path) is None  # no wall time row
    (tmp_path / "README.md").write_text("| wall time | 7.0 min |\n")
    assert ddpm.training_cost(tmp_path) == "7.0 min"
    (tmp_path / "README.md").write_text("| wall time | 7.0 min |\n| machine | 1x H200 (143 GB), 16 CPU cores |\n")
    assert ddpm.training_cost(tmp_path) == "7.0 min on 1x H200 (143 GB)"
    (tmp_path / "README.md").write_text("| wall time | 5.1 min |\n| machine | 1x H200 (device, shared by runs A, B; "
                                        "bf16), 16 cores; torch 2.11 |\n")
    assert ddpm.training_cost(tmp_path) == "5.1 min on 1x H200 (device, shared by runs A, B; bf16)"
    (tmp_path / "README.md").write_text("x | wall time | 1 min |\n| prior training | 7.0 min on 1x H200 |\n"
                                        "| wall time | 95.0 min |\n"
                                        "| machine | 2-core Xeon; torch 2.14.1, 2 threads |\n")
    assert ddpm.training_cost(tmp_path) == "7.0 min on 1x H200, then 95.0 min on 2-core Xeon"


def test_init_from_accepts_a_folder_saved_by_another_diffusers_version(tmp_path, idx_dir):
    teacher = tmp_path / "teacher"
    ddpm.build_unet(32, (8, 8, 16, 16), 1, norm_num_groups=4).save_pretrained(teacher / "unet")
    config = json.loads((teacher / "unet" / "config.json").read_text())
    config["_diffusers_version"] = "0.1.0"  # bookkeeping keys are not the architecture
    del config["num_class_embeds"]  # a key an older version did not write: nothing to compare it with
    (teacher / "unet" / "config.json").write_text(json.dumps(config))
    args = train_teacher.parse_args(["--init-from", str(teacher), *TINY])
    train_teacher.check_init_from(str(teacher), args)  # no error


def test_each_step_draws_fresh_seeded_noise_and_timesteps_and_logs_every_n_steps(tmp_path, idx_dir, monkeypatch):
    drawn = []
    real_loss = train_teacher.denoising_loss

    def spy(unet, scheduler, clean, noise, t):
        drawn.append((noise.clone(), t.clone()))
        return real_loss(unet, scheduler, clean, noise, t)

    monkeypatch.setattr(train_teacher, "denoising_loss", spy)

    def run(name, seed):
        drawn.clear()
        train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / name), "--max-steps", "5",
                            "--checkpoint-every", "100", *TINY, "--seed", seed, "--log-every", "2"])
        return list(drawn)

    first = run("a", "3")
    assert len(first) == 5
    for i in range(5):  # a new draw every step: the same noise or timesteps reused would train on 1 sample of each
        for j in range(i):
            assert not torch.equal(first[i][0], first[j][0]) and not torch.equal(first[i][1], first[j][1])
    assert all(((t >= 0) & (t < 1000)).all() for _, t in first)
    again = run("b", "3")  # seeded: a rerun draws the same
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, again, strict=True))
    other = run("c", "4")
    assert not torch.equal(first[0][0], other[0][0])

    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2nd step, and the last
    readme = (tmp_path / "a" / "export" / "README.md").read_text()
    assert "| images seen | 40 |" in readme and "| batch size (global) | 8 over 1 process(es) |" in readme
    assert "| initialized from | random weights |" in readme and "prior training" not in readme


def test_sample_grid_places_each_image_row_major_and_scales_it(tmp_path):
    from PIL import Image

    images = (np.arange(1, 6, dtype=np.uint8) * 40)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8)
    ddpm.save_grid(images, tmp_path / "g" / "grid.png", scale=2)
    small = np.zeros((2 * 2, 3 * 3), np.uint8)  # 5 images -> 3 columns, 2 rows; the 6th slot stays black
    for i in range(5):
        r, q = divmod(i, 3)
        small[r * 2:(r + 1) * 2, q * 3:(q + 1) * 3] = 40 * (i + 1)
    grid = np.array(Image.open(tmp_path / "g" / "grid.png"))
    assert np.array_equal(grid, np.kron(small, np.ones((2, 2), np.uint8)))
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["grid.png"]  # no temp file left
    rgb = np.repeat(images, 3, axis=-1)
    ddpm.save_grid(rgb, tmp_path / "rgb.png", scale=1)
    assert np.array_equal(np.array(Image.open(tmp_path / "rgb.png")), np.repeat(small[..., None], 3, axis=-1))


def test_samples_are_seeded_uint8_images_and_leave_the_unets_mode_as_it_was():
    unet = ddpm.build_unet(32, (8, 8, 16, 16), 1, norm_num_groups=4)
    scheduler = ddpm.build_scheduler()
    unet.train()
    a = ddpm.sample_images(unet, scheduler, 2, 2, seed=0)
    assert unet.training and a.dtype == np.uint8 and a.shape == (2, 32, 32, 3)
    assert np.array_equal(a, ddpm.sample_images(unet, scheduler, 2, 2, seed=0))
    assert not np.array_equal(a, ddpm.sample_images(unet, scheduler, 2, 2, seed=1))
    unet.eval()
    ddpm.sample_images(unet, scheduler, 1, 1, seed=0)
    assert not unet.training


def test_sample_every_writes_grids_between_checkpoints(tmp_path, idx_dir):
    out = tmp_path / "run"
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(out), "--max-steps", "5",
                        "--checkpoint-every", "100", "--sample-every", "2", *TINY])
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "latest.png", "step_0000002.png", "step_0000004.png", "step_0000005.png"]
    assert (out / "samples" / "latest.png").read_bytes() == (out / "samples" / "step_0000005.png").read_bytes()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_5"]  # only the final one
    assert (out / "export" / "samples.png").read_bytes() == (out / "samples" / "step_0000005.png").read_bytes()


@pytest.mark.parametrize("flag, expected", [([], 5), (["--threads", "3"], 3)])
def test_cpu_runs_default_to_every_core(tmp_path, idx_dir, monkeypatch, flag, expected):
    """`accelerate launch` sets OMP_NUM_THREADS=1 on a CPU machine; the trainer takes every core unless told."""
    calls = []
    monkeypatch.setattr(train_teacher, "cpu_threads_per_process", lambda: 5)  # this machine's cores, as the trainer
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # recorded, not applied: tests stay on one thread
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                        *TINY, *flag])
    assert calls == [expected]


def test_int_list_takes_positive_comma_separated_integers():
    assert train_teacher._int_list("32,64,128") == (32, 64, 128) and train_teacher._int_list("1") == (1,)
    for bad in ("0,8", "8,-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^expected positive integers, got '{bad}'$"):
            train_teacher._int_list(bad)
    for bad in ("a,8", "8,,8", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^expected comma-separated integers, got '{bad}'$"):
            train_teacher._int_list(bad)


def test_export_readme_records_the_launch_loss_precision_and_wall_time(monkeypatch):
    from types import SimpleNamespace

    args = train_teacher.parse_args(["--data-dir", "d", "--hardware-note", "a test box"])
    state = train_teacher.TrainState()
    state.wall_s, state.step = 150.0, 12
    unet = torch.nn.Linear(999, 1000)  # 1.00 M parameters
    readme = train_teacher._readme(args, ["--data-dir", "d"], state, 0.123456, unet, 2e-4)
    assert "| command | `accelerate launch --num_processes 1 training/train_teacher.py --data-dir d` |" in readme
    assert "| last logged loss | 0.1235 |" in readme and "| wall time | 2.5 min |" in readme
    assert "| optimizer steps | 12 |" in readme and "1.00 M parameters" in readme
    assert "| lr | 0.0002 (cosine, 200 warm-up steps), AdamW |" in readme
    assert "Weights are the EMA weights;" in readme  # fp32 unless --fp16-export
    fp16 = SimpleNamespace(**{**vars(args), "fp16_export": True})
    assert "Weights are the EMA weights cast to fp16;" in train_teacher._readme(fp16, [], state, 0.1, unet, 2e-4)
    assert "| last logged loss | n/a |" in train_teacher._readme(args, [], state, None, unet, 2e-4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    readme = train_teacher._readme(args, ["--data-dir", "d"], state, 0.1, unet, 2e-4)
    assert "| command | `accelerate launch --num_processes 2 training/train_teacher.py --data-dir d` |" in readme
    assert f"| batch size (global) | {args.batch_size} over 2 process(es) |" in readme


def test_the_script_logs_at_info(tmp_path, idx_dir, monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", [])  # as a fresh interpreter, where basicConfig takes effect
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "1", *TINY])
    assert logging.root.level == logging.INFO


def test_each_micro_batch_gets_noise_and_timesteps_seeded_by_formula_on_images_in_model_range(
        tmp_path, idx_dir, monkeypatch, caplog, tracker_runs):
    seen, real = [], train_teacher.denoising_loss

    def recording(unet, scheduler, clean, noise, t):
        seen.append((clean, noise, t))
        return real(unet, scheduler, clean, noise, t)

    monkeypatch.setattr(train_teacher, "denoising_loss", recording)
    out = tmp_path / "nested" / "run"  # a folder whose parent does not exist yet
    with caplog.at_level("INFO", logger="train_teacher"):
        export = train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(out), "--max-steps", "2",
                                     "--resolution", "16", *TINY])
    assert len(seen) == 2
    for micro_step, (clean, noise, t) in enumerate(seen):  # seed 3, one process: seeded by (seed, micro-step, rank)
        assert clean.shape == (8, 3, 16, 16) and clean.min() >= -1 and clean.max() <= 1  # --resolution, in [-1, 1]
        generator = torch.Generator().manual_seed(noise_seed(3, micro_step))
        assert torch.equal(noise, torch.randn(clean.shape, generator=generator))
        assert torch.equal(t, torch.randint(0, 1000, (8,), generator=generator))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r.keys() >= {"skipped_images", "epoch"} for r in rows)
    assert "32 images, 4 steps/epoch, global batch 8, 2 steps (0.50 epochs), UNet 0." in caplog.text
    assert f"exported EMA teacher to {export} (2 steps, " in caplog.text
    [(name, config)] = tracker_runs  # TensorBoard's hyperparameters: the flags, tuples as text
    assert name == "train_teacher" and config["block_out_channels"] == "8,8,16,16" and config["resolution"] == 16


def test_command_line_defaults_and_choices():
    args = train_teacher.parse_args(["--data-dir", "d"])
    assert (args.norm_num_groups, args.lr_warmup_steps, args.num_samples, args.seed) == (32, 200, 16, 0)
    assert (args.allow_resume_mismatch, args.mixed_precision, args.resume) == (False, None, None)  # the launcher's
    assert train_teacher.parse_args(["--data-dir", "d", "--allow-resume-mismatch"]).allow_resume_mismatch is True
    for precision in ("fp16", "bf16"):
        args = train_teacher.parse_args(["--data-dir", "d", "--mixed-precision", precision])
        assert args.mixed_precision == precision
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--data-dir", "d", "--mixed-precision", "fp8"])


def test_a_new_lr_on_resume_is_taken_and_a_new_length_refused(tmp_path, idx_dir, caplog):
    common = ["--data-dir", str(idx_dir), "--max-steps", "4", "--checkpoint-every", "2", "--lr-warmup-steps", "0",
              "--num-samples", "4", "--sample-steps", "2", "--log-every", "1", *TINY]
    run = tmp_path / "run"
    train_teacher.main([*common, "--output-dir", str(run), "--lr", "1e-3"])
    (run / "checkpoints" / "step_4").rename(run / "checkpoints" / ".gone")
    with caplog.at_level("INFO", logger="train_teacher"):
        train_teacher.main([*common, "--output-dir", str(run), "--resume", "latest", "--lr", "5e-4"])
    assert "--lr 0.0005: the resumed schedule peaks at it from step 2 on" in caplog.text
    rows = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    # the uninterrupted run logs 1e-3, 7.5e-4, 2.5e-4, 0: after the resume the same cosine at half the peak
    assert [rows[s] for s in (1, 2, 3, 4)] == pytest.approx([1e-3, 7.5e-4, 1.25e-4, 0.0], abs=1e-12)
    assert "| lr | 0.0005 (cosine" in (run / "export" / "README.md").read_text()  # the record says the new peak
    common[common.index("--max-steps") + 1] = "8"
    with pytest.raises(ValueError, match="max_steps: 4 in the checkpoint, 8 now"):
        train_teacher.main([*common, "--output-dir", str(run), "--resume", "latest"])
