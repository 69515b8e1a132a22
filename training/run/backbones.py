"""Every headless timm backbone the project builds or loads, from one place: a recipe's student at its init, a
backbone with a run's or an export's weights, or anything `timm.create_model` takes by name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from dreamteacher_models._timm_registry import pretrained_cfg_for
from dreamteacher_models.recipes import DEFAULT_RECIPE, Recipe, UnknownRecipeError, get_recipe
from training.run.checksums import CHECKSUMS_FILENAME, read_safetensors, verify_checksums
from training.run.layout import find_run_checkpoint, find_run_recipe

STUDENT_PREFIX = "student."  # the trainer's module holds the backbone as `.student`, the regressor beside it
LOCAL_DIR_PREFIX = "local-dir:"


def build_backbone(spec: Recipe | str, **kwargs) -> nn.Module:
    """A headless (num_classes=0) timm model with random weights: a recipe's student at the recipe's init (timm's,
    with its `zero_init_last` where it sets one) carrying the recipe's pretrained_cfg, or a plain architecture.
    Its state dict keeps timm's own key names, so an exported backbone needs no key mapping."""
    if isinstance(spec, Recipe):
        if spec.zero_init_last is not None:
            kwargs.setdefault("zero_init_last", spec.zero_init_last)
        kwargs.setdefault("pretrained_cfg", pretrained_cfg_for(spec))
        spec = spec.arch
    return timm.create_model(spec, pretrained=False, num_classes=0, **kwargs)


def student_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors only: `student.`-prefixed keys when present (regressor/teacher dropped), DDP prefix removed."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith(STUDENT_PREFIX) for k in state):
        state = {k.removeprefix(STUDENT_PREFIX): v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    return state


def load_student(recipe: Recipe, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The recipe's backbone with `state_dict` loaded strictly, in eval mode; mismatches are reported by name."""
    model = build_backbone(recipe)
    state = student_state_dict(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"the checkpoint does not match {recipe.arch} (num_classes=0): missing {_head(missing)}, "
            f"unexpected {_head(unexpected)}, wrong shapes {_head(wrong_shape)}"
        )
    model.load_state_dict(state)
    return model.eval()


def _head(names: list[str], n: int = 6) -> str:
    return f"{names[:n]}{' ...' if len(names) > n else ''} ({len(names)})"


def recipe_for_model(model_spec: str | None, recipe: Recipe | str | None = None,
                     checkpoint: str | os.PathLike | None = None) -> tuple[Recipe, str]:
    """(the recipe a backbone was trained with, where it came from): `recipe` when given, else the recipe.json of a
    run or export folder, else the model name's own recipe, else the default. Its data config is the eval transform."""
    if recipe is not None:
        return (get_recipe(recipe) if isinstance(recipe, str) else recipe), "--recipe"
    if checkpoint is not None:
        found = find_run_recipe(Path(checkpoint))
        if found is not None:
            return found, f"recipe.json of {checkpoint}"
    if model_spec and model_spec.startswith(LOCAL_DIR_PREFIX):
        found = find_run_recipe(Path(model_spec.removeprefix(LOCAL_DIR_PREFIX)))
        if found is not None:
            return found, f"recipe.json of {model_spec}"
    if model_spec:
        try:
            return get_recipe(model_spec), "model name"
        except UnknownRecipeError:
            pass
    return get_recipe(DEFAULT_RECIPE), "default"


def load_backbone(
    model_spec: str | None,
    *,
    random_init: bool = False,
    checkpoint: str | os.PathLike | None = None,
    recipe: Recipe | None = None,
) -> nn.Module:
    """A headless (num_classes=0) timm backbone in eval mode.

    `checkpoint`: a training run / checkpoint folder / .safetensors file; its student weights are loaded into
    `recipe`'s architecture (or `model_spec`'s, when given). Otherwise `model_spec` is anything
    `timm.create_model` takes: a registered name (DreamTeacher tags included), ``local-dir:PATH``, ``hf-hub:ID``,
    or a plain architecture (with `random_init`).
    """
    import dreamteacher_models  # noqa: F401 - registers the DreamTeacher tags with timm

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        weights = read_safetensors(find_run_checkpoint(path))
        if recipe is None:
            raise ValueError(f"no recipe found for checkpoint {path}: pass --recipe NAME")
        if model_spec and model_spec.split(".")[0] != recipe.arch:
            raise ValueError(f"--model {model_spec} does not match the checkpoint recipe's architecture {recipe.arch}")
        return load_student(recipe, weights).eval()
    if not model_spec:
        raise ValueError("nothing to evaluate: pass --model NAME (or --checkpoint RUN_DIR)")
    if model_spec.startswith(LOCAL_DIR_PREFIX):  # an export: its files must match SHA256SUMS before they are trusted
        folder = Path(model_spec.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
        if (folder / CHECKSUMS_FILENAME).is_file():
            verify_checksums(folder)
    model = timm.create_model(model_spec, pretrained=not random_init, num_classes=0)
    return model.eval()
