"""DreamTeacher backbones for timm.

Importing this package registers every DreamTeacher checkpoint with timm:

    import timm, dreamteacher_models
    model = timm.create_model("resnet50.dreamteacher_in1k", pretrained=True)

Only torch, timm, safetensors and huggingface_hub are imported here; the trainer's heavy dependencies
(diffusers, accelerate, datasets) live in the repository's `training/` package.
"""

from ._timm_registry import WeightsNotAvailableError, register_recipes
from .recipes import (
    DEFAULT_RECIPE,
    HUB_ORG,
    RECIPES,
    DataConfig,
    LossConfig,
    OptimConfig,
    Recipe,
    TeacherConfig,
    UnknownRecipeError,
    get_recipe,
    list_recipes,
)

__version__ = "0.1.0"

register_recipes(RECIPES.values())

__all__ = [
    "DEFAULT_RECIPE",
    "HUB_ORG",
    "RECIPES",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "Recipe",
    "TeacherConfig",
    "UnknownRecipeError",
    "WeightsNotAvailableError",
    "get_recipe",
    "list_recipes",
]
