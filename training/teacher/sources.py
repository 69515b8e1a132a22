"""Where a teacher's parts come from: a local diffusers folder or a Hub id, component by component, with an
error that says how to get a missing one."""

from __future__ import annotations

import logging
from pathlib import Path

from dreamteacher_models._timm_registry import hub_offline
from dreamteacher_models.recipes import Recipe

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")  # single-file checkpoints (ADM)


def _is_hub_id(source: str) -> bool:
    if source.endswith(WEIGHT_SUFFIXES) or source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if source.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _how_to_get(kind: str) -> str:
    if kind == "adm":
        return (
            "name it (e.g. adm:256x256_diffusion_uncond: downloaded, checked and converted once), or download "
            "OpenAI's guided-diffusion checkpoint (e.g. 256x256_diffusion_uncond.pt from "
            "github.com/openai/guided-diffusion) and convert it: `python training/convert_adm.py --checkpoint "
            "256x256_diffusion_uncond.pt --out DIR --preset 256x256_diffusion_uncond`, then pass DIR (or pass the .pt "
            "itself to convert it on the fly with the recipe's adm_preset)"
        )
    if kind == "latent":
        return (
            "pass a Stable Diffusion 1.x/2.x pipeline folder (unet/, vae/, scheduler/, and either text_encoder/ + "
            "tokenizer/ or empty_prompt_embedding.safetensors) or its Hub id (e.g. CompVis/stable-diffusion-v1-4; "
            "needs the network or a populated Hugging Face cache)"
        )
    return (
        "pass a diffusers UNet2DModel folder (config.json + weights, or a pipeline folder with unet/) or a Hub id "
        "such as google/ddpm-cifar10-32; train the Fashion-MNIST teacher with `python training/train_teacher.py "
        "--max-steps 3000 --output-dir runs/teacher-fmnist --export-dir teachers/ddpm-fashion-mnist-32` "
        "(see its --help)"
    )


def _missing(kind: str, source: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(f"teacher source {source!r} ({kind}): {why}. To get one: {_how_to_get(kind)}")


def _subfolders(source: str, component: str, kind: str) -> list[str | None]:
    """Where a component's config.json may sit: <source>/<component>/ (pipeline layout) or <source>/ itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = [sub for sub in (component, None) if (path / (sub or "") / "config.json").is_file()]
        if not found:
            raise _missing(kind, source, f"no {component}/config.json or config.json in the folder {path}")
        return found
    if path.exists():
        raise _missing(kind, source, f"{path} is a file, not a diffusers folder")
    if not _is_hub_id(source):
        raise _missing(kind, source, "no such local path, and it is not a valid Hugging Face Hub repo id")
    return [component, None]


def _load_component(cls, source: str, component: str, kind: str, root_ok: bool = True):
    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    candidates = _subfolders(source, component, kind)
    if not root_ok:
        candidates = [c for c in candidates if c is not None] or [component]
    errors = []
    for sub in candidates:
        try:
            config = cls.load_config(where, subfolder=sub)
        except OSError as e:
            errors.append(f"{sub or '.'}: {str(e).splitlines()[0]}")
            continue
        found = config.get("_class_name")
        if found and found != cls.__name__:
            errors.append(f"{sub or '.'}: holds a {found}, not a {cls.__name__}")
            continue
        try:
            return cls.from_pretrained(where, subfolder=sub)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt weights file: one line, not a traceback
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"teacher source {source!r}: its {cls.__name__} ({sub or '.'}) has a config but its "
                             f"weights cannot be read ({type(e).__name__}: {detail}); copy or download the folder "
                             "again") from e
    note = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if hub_offline() and not path.exists() else ""
    raise _missing(kind, source, f"could not load a {cls.__name__}{note}: {'; '.join(errors)}")


def _default_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # betas 1e-4 .. 0.02, as DDPM/ADM


def _load_scheduler(source: str):
    """DDPMScheduler from the folder's scheduler config (scheduler/ or root), else the linear 1000-step default."""
    from diffusers import DDPMScheduler

    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    for sub, fname in (("scheduler", "scheduler_config.json"), (None, "scheduler_config.json")):
        if path.exists() and not (path / (sub or "") / fname).is_file():
            continue
        try:
            config = DDPMScheduler.load_config(where, subfolder=sub)
        except OSError:
            continue
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return DDPMScheduler.from_config(config)
    logger.info("no scheduler config in %s: using the linear 1000-step DDPM schedule", source)
    return _default_scheduler()

def teacher_source(recipe: Recipe) -> str:
    """The recipe's teacher source; a relative folder missing from the working directory is looked up in the repo
    (the committed in-domain teachers live there), so the default runs from any directory."""
    source = Path(recipe.teacher.source)
    in_repo = REPO_ROOT / source
    if not source.is_absolute() and not source.exists() and in_repo.exists():
        return str(in_repo)
    return recipe.teacher.source
