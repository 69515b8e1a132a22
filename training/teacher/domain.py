"""Is the teacher made for the data? A frozen teacher's features describe the images it was trained on; distilling
or interpreting them on another domain (the 32-px Fashion-MNIST DDPM on FFHQ faces) trains on noise.

A recipe's own teacher (its `teacher.source`, not replaced by --teacher) was trained on the recipe's data
(`data.name`). A data folder says its domain in a card.json ("domain", as training/make_scenes.py writes) or by
being one of the DDPM-seg benchmark folders. When both are known and differ, the trainers stop and say which
teacher to pass; when the folder's domain is unknown, they log which data the teacher knows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dreamteacher_models.recipes import Recipe, UnknownRecipeError, get_recipe

logger = logging.getLogger(__name__)

BENCHMARK_DOMAINS = {"ffhq_34": "ffhq", "celeba_19": "celeba-hq", "bedroom_28": "lsun-bedroom", "cat_15": "lsun-cat",
                     "horse_21": "lsun-horse"}
DDPM_SEG_TEACHERS = ("the DDPM-seg ADM checkpoints (github.com/yandex-research/ddpm-segmentation), converted with "
                     "training/convert_adm.py, with --set data.input_size=(3,256,256)")


def data_domain(data_dir: str | Path) -> str | None:
    """The domain a data folder declares (card.json "domain"), or a DDPM-seg benchmark folder's, else None."""
    folder = Path(data_dir)
    card = folder / "card.json"
    if card.is_file():
        domain = json.loads(card.read_text()).get("domain")
        if domain:
            return str(domain)
    return BENCHMARK_DOMAINS.get(folder.resolve().name)


def own_teacher_domain(recipe: Recipe) -> str | None:
    """The data the recipe's teacher was trained on, when the teacher is the registered recipe's own; None for a
    teacher the user chose (--teacher / --set teacher.source) or an unregistered recipe."""
    try:
        registered = get_recipe(recipe.name)
    except UnknownRecipeError:
        return None
    return recipe.data.name if recipe.teacher.source == registered.teacher.source else None


def check_teacher_domain(recipe: Recipe, data_dir: str | Path | None) -> None:
    """Raise a ValueError when `data_dir` holds another domain than the recipe's own teacher was trained on."""
    if data_dir is None:
        return
    teacher_domain = own_teacher_domain(recipe)
    if teacher_domain is None:
        return
    domain = data_domain(data_dir)
    if domain is None:
        logger.info("the teacher %s is recipe %s's own, trained on %s; %s does not say its domain (no card.json): "
                    "if it holds other images, pass --teacher a diffusion model trained on them", recipe.teacher.source,
                    recipe.name, teacher_domain, data_dir)
        return
    if domain != teacher_domain:
        hint = DDPM_SEG_TEACHERS if Path(data_dir).resolve().name in BENCHMARK_DOMAINS else "one trained on them"
        raise ValueError(f"{data_dir} holds {domain} images, but the teacher {recipe.teacher.source} is recipe "
                         f"{recipe.name}'s own, trained on {teacher_domain}: its features do not describe these "
                         f"images. Pass --teacher a diffusion model trained on {domain}: {hint} (train_teacher.py "
                         "trains one on your images)")
