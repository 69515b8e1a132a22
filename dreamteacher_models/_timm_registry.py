"""The only module that touches timm's private registry.

timm has no public hook to add a pretrained tag to an architecture it already registered (re-registering
`resnet50` would wipe its own tags), so `register_recipes` fills the same private structures that
`timm.models.register_model` fills, appending our tags after timm's own so no default changes. It also wraps
the architecture's entrypoint so that `pretrained=True` on a DreamTeacher tag whose weights cannot be had
fails with a message a user can act on, instead of a bare 404: offline at once, online after the Hub says so (the
Hub is asked even for weights this release calls unpublished, so they load the day they appear).
tests/test_timm_registry.py pins this contract; the timm range it holds for is pinned in pyproject.toml.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import timm
from timm.models import _factory, _registry
from timm.models._pretrained import DefaultCfg, PretrainedCfg

from .recipes import CODE_URL, PAPER_ID, Recipe, UnknownRecipeError, list_recipes

WEIGHTS_FILENAME = "model.safetensors"  # safetensors only: never fall back to a pickle

_REQUIRED = ("_model_entrypoints", "_model_pretrained_cfgs", "_model_has_pretrained", "_model_with_tags",
             "_model_default_cfgs")


class TimmRegistryChanged(RuntimeError):
    """timm's private registry no longer looks like the one this package was written against."""


class WeightsNotAvailableError(RuntimeError):
    """A DreamTeacher checkpoint was asked for with pretrained=True but its weights cannot be loaded."""


def pretrained_cfg_for(recipe: Recipe) -> PretrainedCfg:
    """timm's description of a DreamTeacher checkpoint: headless weights on the Hub, the recipe's data config."""
    data = recipe.data
    arch_cfg = _registry._model_default_cfgs.get(recipe.arch)
    base = arch_cfg.cfgs[arch_cfg.tags[0]] if arch_cfg else PretrainedCfg()
    # architecture facts (first_conv, classifier, pool_size, ...) come from timm's own default; the rest is ours
    return replace(
        base,
        url=None,
        file=None,
        state_dict=None,
        source=None,
        test_input_size=None,
        test_crop_pct=None,
        label_offset=None,
        label_names=None,
        label_descriptions=None,
        hf_hub_id=recipe.hub_id,
        hf_hub_filename=WEIGHTS_FILENAME,
        architecture=recipe.arch,
        tag=recipe.tag,
        input_size=data.input_size,
        interpolation=data.interpolation,
        crop_pct=data.crop_pct,
        mean=data.mean,
        std=data.std,
        num_classes=0,  # headless: any num_classes=N then gets a fresh head
        license=recipe.license,
        description=f"DreamTeacher-distilled {recipe.arch} ({data.name}, no labels)",
        origin_url=CODE_URL,
        paper_name="DreamTeacher: Pretraining Image Backbones with Deep Generative Models",
        paper_ids=PAPER_ID,
    )


def _check_timm_internals() -> None:
    missing = [name for name in _REQUIRED if not hasattr(_registry, name)]
    if missing:
        raise TimmRegistryChanged(
            f"timm {timm.__version__} no longer has {', '.join(missing)} in timm.models._registry; "
            "dreamteacher_models supports the timm range pinned in its pyproject.toml. "
            "Install a supported timm (e.g. `pip install 'timm>=1.0.15,<1.1'`) or upgrade dreamteacher-models."
        )
    if not callable(getattr(_factory, "load_model_config_from_hf", None)):
        raise TimmRegistryChanged(
            f"timm {timm.__version__}: timm.models._factory.load_model_config_from_hf (how `hf-hub:` names are "
            "read) is gone; install a timm in the range pinned by dreamteacher-models."
        )
    default_cfg = _registry._model_default_cfgs.get("resnet50")
    if not isinstance(default_cfg, DefaultCfg) or not hasattr(default_cfg, "tags") or not hasattr(default_cfg, "cfgs"):
        raise TimmRegistryChanged(
            f"timm {timm.__version__}: the per-architecture DefaultCfg (tags, cfgs) changed shape; "
            "install a timm in the range pinned by dreamteacher-models."
        )


def register_recipes(recipes: Iterable[Recipe]) -> None:
    """Add each recipe's `<arch>.<tag>` to timm. Idempotent; never changes timm's own tags or defaults."""
    _check_timm_internals()
    by_arch: dict[str, list[Recipe]] = {}
    for recipe in recipes:
        if recipe.arch not in _registry._model_entrypoints:
            raise TimmRegistryChanged(f"timm {timm.__version__} has no architecture {recipe.arch!r}")
        by_arch.setdefault(recipe.arch, []).append(recipe)

    for arch, arch_recipes in by_arch.items():
        default_cfg = _registry._model_default_cfgs[arch]
        for recipe in arch_recipes:
            cfg = pretrained_cfg_for(recipe)
            if recipe.tag not in default_cfg.tags:
                default_cfg.tags.append(recipe.tag)  # appended: timm's first tag stays the default
            default_cfg.cfgs[recipe.tag] = cfg
            _registry._model_pretrained_cfgs[recipe.name] = cfg
            _registry._model_has_pretrained.add(recipe.name)
            if recipe.name not in _registry._model_with_tags[arch]:
                _registry._model_with_tags[arch].append(recipe.name)
        _BY_HUB_ID.update({r.hub_id: r for r in arch_recipes})
        entrypoint = _registry._model_entrypoints[arch]
        if not getattr(entrypoint, "_dreamteacher_guarded", False):
            _registry._model_entrypoints[arch] = _guard_entrypoint(entrypoint)
        _registry._model_entrypoints[arch]._dreamteacher_recipes.update({r.tag: r for r in arch_recipes})
    if not getattr(_factory.load_model_config_from_hf, "_dreamteacher_guarded", False):
        _factory.load_model_config_from_hf = _guard_hub_config(_factory.load_model_config_from_hf)


_BY_HUB_ID: dict[str, Recipe] = {}  # hub repo id -> recipe, for `hf-hub:` names


def _guard_hub_config(load: Callable) -> Callable:
    """`hf-hub:<one of our repos>`: timm reads the repo's config.json before any entrypoint runs; a repo that does
    not hold it (yet) gets our message instead of huggingface_hub's. Every other repo passes straight through."""
    from huggingface_hub.errors import EntryNotFoundError

    @functools.wraps(load)
    def guarded(model_id: str, *args, **kwargs):
        recipe = _BY_HUB_ID.get(model_id.split("@")[0])
        if recipe is None:
            return load(model_id, *args, **kwargs)
        try:
            return load(model_id, *args, **kwargs)
        except (OSError, EntryNotFoundError) as error:
            raise WeightsNotAvailableError(f"{weights_not_available_message(recipe)}\nCause: {error}") from error

    guarded._dreamteacher_guarded = True
    return guarded


def _guard_entrypoint(entrypoint: Callable) -> Callable:
    """Wrap timm's entrypoint so our tags give actionable errors; every other call passes straight through."""
    recipes: dict[str, Recipe] = {}

    @functools.wraps(entrypoint)
    def guarded(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        recipe = recipes.get(pretrained_cfg) if isinstance(pretrained_cfg, str) else None
        if recipe is None and isinstance(pretrained_cfg, str) and pretrained_cfg.startswith("dreamteacher"):
            raise UnknownRecipeError(
                f"unknown DreamTeacher tag {pretrained_cfg!r} for {entrypoint.__name__}; "
                f"known DreamTeacher checkpoints: {', '.join(list_recipes())}"
            )
        overlay = pretrained_cfg_overlay or {}
        if recipe is None or not pretrained or overlay.get("file") or overlay.get("state_dict"):
            return entrypoint(pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                              pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
        if hub_offline() and not _is_cached(recipe, kwargs.get("cache_dir")):  # the answer, at once
            raise WeightsNotAvailableError(weights_not_available_message(recipe))
        # online the Hub is asked even for weights this release calls unpublished: they load the day they appear
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return entrypoint(pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                              pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
        except (OSError, EntryNotFoundError) as error:  # huggingface_hub's HTTP, not-found and offline errors
            raise WeightsNotAvailableError(f"{weights_not_available_message(recipe)}\nCause: {error}") from error

    guarded._dreamteacher_guarded = True
    guarded._dreamteacher_recipes = recipes
    return guarded


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import), with huggingface_hub's truthy values."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def _is_cached(recipe: Recipe, cache_dir=None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(recipe.hub_id, WEIGHTS_FILENAME, cache_dir=cache_dir), str)


def weights_not_available_message(recipe: Recipe) -> str:
    if recipe.status == "published":
        why = f"The weights are published at https://huggingface.co/{recipe.hub_id} but could not be loaded "
        why += "(offline with no cached copy, or the Hub could not be reached)."
    else:
        why = f"Weights for {recipe.name} are not published yet (Hub repo {recipe.hub_id} does not hold them)."
    export = Path("runs") / recipe.name / "export"
    if (export / WEIGHTS_FILENAME).is_file():  # what training/pretrain.py wrote here for this recipe
        why += (f"\nAn export of {recipe.name} trained here exists; load it with\n"
                f"  timm.create_model('local-dir:{export}', pretrained=True)")
    return (
        f"{why}\n"
        f"Train and export them yourself:\n"
        f"  accelerate launch training/pretrain.py --recipe {recipe.name} --output-dir runs/{recipe.name}\n"
        f"then load the export with\n"
        f"  timm.create_model('local-dir:runs/{recipe.name}/export', pretrained=True)\n"
        f"or use pretrained=False for random initialisation."
    )
