"""training/train_teacher.py: a few DDPM steps on tiny IDX data, export, checkpoint rotation, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.test_data import make_fmnist_dir
from training import train_teacher

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
                                 "--checkpoint-every", "2", "--checkpoints-total-limit", "2", "--fp16-export", *TINY])
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
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
    # the export holds the EMA weights, not the raw model weights
    ema = torch.load(out / "checkpoints" / "checkpoint_2" / "custom_checkpoint_0.pkl", weights_only=True)
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
    shutil.copytree(full / "checkpoints" / "checkpoint_0", part / "checkpoints" / "checkpoint_0")
    train_teacher.main(["--data-dir", str(idx_dir), "--output-dir", str(part), "--max-steps", "6",
                        "--checkpoint-every", "2", "--resume", "latest", *TINY])
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    state = torch.load(part / "checkpoints" / "checkpoint_2" / "custom_checkpoint_1.pkl", weights_only=True)
    assert state["step"] == 6 and state["images_seen"] == 6 * 8
    a, b = _unet_weights(full / "export"), _unet_weights(part / "export")
    for k in a:  # same data order, noise and timesteps after the resume as in the uninterrupted run
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert "| optimizer steps | 6 |" in (part / "export" / "README.md").read_text()


def test_bad_arguments_are_rejected(idx_dir, tmp_path):
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--block-out-channels", "32,64,x"])
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--block-out-channels", "8,8", "--norm-num-groups", "32"])
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--resolution", "30"])  # not divisible by 2**3
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
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

    monkeypatch.setattr(train_teacher, "F", NanOnSecondStep())
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2; stopped before the optimizer step.*"
                                                 r"checkpoint_0"):
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
    unet = train_teacher.build_unet(32, (8, 8, 16, 16), 1, norm_num_groups=4)
    sizes = []
    hooks = [blk.resnets[-1].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for blk in unet.up_blocks]
    with torch.no_grad():
        unet(torch.zeros(1, 3, 32, 32), torch.tensor([50]))
    for h in hooks:
        h.remove()
    assert [32 // s for s in sizes] == [8, 4, 2, 1]
    assert not any("attn" in n.lower() for n, _ in unet.named_modules())
    np.testing.assert_equal(len(unet.down_blocks), 4)
