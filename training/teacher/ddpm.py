"""The in-domain DDPM teacher that training/train_teacher.py trains: its UNet and noise schedule, the denoising loss,
DDIM sample grids, the exported diffusers folder, and what an export's README says it cost."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.run.disk_full import reporting_full_disk
from training.run.layout import (
    atomic_file,
    fresh_staging_dir,
    give_files_umask_modes,
    refuse_foreign_folder,
    replace_dir,
    replaceable_folder,
)

TEACHER_EXPORT_FILES = {"model_index.json", "unet", "scheduler", "samples.png", "README.md"}


def build_unet(resolution: int, block_out_channels, layers_per_block: int, channels: int = 3,
               norm_num_groups: int = 32):
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * n,  # attention-free: fast on CPU, decoder levels at strides 2^(n-1)..1
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=norm_num_groups,
    )


def _first_clause(text: str) -> str:
    """`text` up to its first ',' or ';' outside parentheses: '1x H200 (device machine, shared), 16 cores' keeps its
    parenthesis whole."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch in ",;":
            return text[:i].strip()
    return text.strip()


def training_cost(folder: str | os.PathLike) -> str | None:
    """'<wall time> on <machine>' from a teacher folder's README (written by this script), its prior training first
    ('<prior>, then <this>') for a teacher continued with --init-from; None where the folder has no such README."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    rows = dict(re.findall(r"^\| (wall time|machine|prior training) \| (.+?) \|$", readme.read_text(), flags=re.M))
    if "wall time" not in rows:
        return None
    machine = _first_clause(rows.get("machine", ""))
    this = f"{rows['wall time']} on {machine}" if machine else rows["wall time"]
    return f"{rows['prior training']}, then {this}" if "prior training" in rows else this


def build_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", prediction_type="epsilon")


def denoising_loss(unet, noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The DDPM objective: MSE between the UNet's output on the noised images and the scheduler's training target
    (the noise for `epsilon`, as diffusers' train_unconditional.py; the clean images for `sample`; the velocity for
    `v_prediction`), so the teacher is trained for what its exported scheduler will assume when sampling."""
    noisy = noise_scheduler.add_noise(clean, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "sample":
        target = clean
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, t)
    else:
        raise ValueError(f"unknown prediction_type {kind!r}; allowed: epsilon, sample, v_prediction")
    pred = unet(noisy, t, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())



@torch.no_grad()
def sample_images(unet, noise_scheduler, num: int, steps: int, seed: int) -> np.ndarray:
    """DDIM samples from `unet` as uint8 (N, H, W, C)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = unet.training
    unet.eval()
    images = pipe(batch_size=num, generator=gen, num_inference_steps=steps, output_type="np").images
    unet.train(was_training)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def save_grid(images: np.ndarray, path: Path, scale: int = 2) -> None:
    from PIL import Image

    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    im = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        im.save(tmp, format="PNG")


def export_teacher(unet, ema, noise_scheduler, export_dir: Path, fp16: bool, grid: Path | None, readme: str) -> Path:
    """Write the EMA weights as a diffusers DDPMPipeline folder, atomically (temp dir, then rename)."""
    from diffusers import DDPMPipeline, UNet2DModel

    export_dir = replaceable_folder(export_dir)
    refuse_foreign_folder(export_dir, TEACHER_EXPORT_FILES, "a previous teacher export (train_teacher.py)")
    # from_pretrained (--init-from) records the folder it read as `_name_or_path`: a local path, not for an export
    model = UNet2DModel.from_config({k: v for k, v in unet.config.items() if k != "_name_or_path"})
    ema.copy_to(model.parameters())
    if fp16:
        model = model.to(torch.float16)
    tmp = fresh_staging_dir(export_dir)
    try:
        with reporting_full_disk(tmp.parent, "the teacher export"):
            DDPMPipeline(unet=model, scheduler=noise_scheduler).save_pretrained(tmp, safe_serialization=True)
            if grid is not None and grid.is_file():
                shutil.copyfile(grid, tmp / "samples.png")
            (tmp / "README.md").write_text(readme)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    give_files_umask_modes(tmp)
    replace_dir(tmp, export_dir)
    return export_dir
