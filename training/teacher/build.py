"""`build_teacher`: the frozen teacher a `TeacherConfig` declares, from a diffusers folder, a Hub id, an ADM
checkpoint (converted on the fly or by name through the cache) or a Stable Diffusion pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dreamteacher_models.recipes import TeacherConfig
from training.teacher import adm
from training.teacher.adm_fetch import is_adm_name, resolve_adm_name
from training.teacher.fast_path import PLAIN, FastPath
from training.teacher.frozen import DEFAULT_DDIM_STEPS, FrozenTeacher
from training.teacher.prompt import load_empty_prompt_embedding
from training.teacher.sources import WEIGHT_SUFFIXES, _load_component, _load_scheduler, _missing

_ADM_COSINE_PRESETS = ("64x64_diffusion",)  # trained with the cosine schedule; the 256 models use linear


def _adm_flags(preset: str | None):
    if preset is None or preset not in adm.PRESETS:
        raise ValueError(f"an ADM checkpoint needs adm_preset set to one of {sorted(adm.PRESETS)}, got {preset!r}")
    return adm.PRESETS[preset]


def _convert_adm(source: str, preset: str | None):
    """(UNet2DModel, scheduler) from a guided-diffusion .pt/.safetensors via training/teacher/adm.py."""
    from diffusers import DDPMScheduler

    flags = _adm_flags(preset)
    unet = adm.convert(adm.load_checkpoint(source), flags)
    schedule = "squaredcos_cap_v2" if preset in _ADM_COSINE_PRESETS else "linear"  # = ADM's cosine schedule
    return unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)


def build_teacher(
    config: TeacherConfig,
    mean: Sequence[float],
    std: Sequence[float],
    source: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    *,
    taps: Sequence[str] | None = None,
    ddim_steps: int = DEFAULT_DDIM_STEPS,
    early_stop: bool = True,
    fast_path: FastPath = PLAIN,
) -> FrozenTeacher:
    """The frozen teacher a `TeacherConfig` declares. `source` overrides config.source, `taps` config.taps.

    kind "unet": a diffusers UNet2DModel folder (root or unet/) or Hub id; "adm": the same for a folder written by
    training/convert_adm.py, or a guided-diffusion .pt converted on the fly with config.adm_preset; "latent": a
    Stable Diffusion 1.x/2.x pipeline (UNet2DConditionModel + AutoencoderKL + empty-prompt embedding).
    Missing sources raise FileNotFoundError saying how to get one. `fast_path`: the GPU speed switches
    (training/teacher/fast_path.py).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    src = str(source if source is not None else config.source)
    kind = config.kind
    if is_adm_name(src):  # OpenAI's checkpoint by name: fetched, checked and converted once into the cache
        src, kind = resolve_adm_name(src), "adm"
    vae = prompt = None
    if kind in ("unet", "adm"):
        if kind == "adm" and src.endswith(WEIGHT_SUFFIXES):
            if not Path(src).expanduser().is_file():
                raise _missing(kind, src, "no such checkpoint file")
            unet, scheduler = _convert_adm(str(Path(src).expanduser()), config.adm_preset)
        else:
            unet = _load_component(UNet2DModel, src, "unet", kind)
            scheduler = _load_scheduler(src)
    elif kind == "latent":
        unet = _load_component(UNet2DConditionModel, src, "unet", kind, root_ok=False)
        vae = _load_component(AutoencoderKL, src, "vae", kind, root_ok=False)
        prompt = load_empty_prompt_embedding(src)
        scheduler = _load_scheduler(src)
    else:
        raise ValueError(f"unknown teacher kind {kind!r}; choose one of 'unet', 'adm', 'latent'")
    return FrozenTeacher(
        unet,
        scheduler,
        config.timestep,
        mean,
        std,
        taps=config.taps if taps is None else taps,
        vae=vae,
        prompt_embedding=prompt,
        encoding=config.encoding,
        ddim_steps=ddim_steps,
        resolution=config.resolution,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        early_stop=early_stop,
        fast_path=fast_path,
        kind=kind,
        source=src,
    )
