"""Print a frozen teacher's feature-tap layout and, with a student, which tap feeds which level.

    python training/inspect_teacher.py --kind unet --source teachers/ddpm-fashion-mnist-32 --image-size 32
    python training/inspect_teacher.py --recipe resnet50.dreamteacher_in1k
    python training/inspect_teacher.py --store-empty-prompt-embedding DIR   # latent teachers, needs transformers
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python training/inspect_teacher.py` puts training/, not the repo, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from dreamteacher_models.recipes import TeacherConfig, get_recipe
from training.distill.pairing import describe_pairs, pair_levels
from training.distill.regressor import student_levels
from training.run.backbones import build_backbone
from training.teacher.build import build_teacher
from training.teacher.prompt import store_empty_prompt_embedding
from training.teacher.taps import describe_taps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print a frozen teacher's feature-tap layout and, with a student, which tap feeds which level.")
    parser.add_argument("--recipe", help="take the teacher config from this recipe (flags below override it)")
    parser.add_argument("--kind", choices=("unet", "adm", "latent"))
    parser.add_argument("--source", help="diffusers folder, Hub id, or (adm) guided-diffusion .pt")
    parser.add_argument("--timestep", type=int)
    parser.add_argument("--taps", nargs="*", help="module names (default: decoder levels before their upsamplers)")
    parser.add_argument("--adm-preset")
    parser.add_argument("--encoding", choices=("noise", "ddim"))
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--image-size", type=int, help="image size to report shapes for (default: the recipe's)")
    parser.add_argument("--student", help="timm architecture to pair the taps with (default: the recipe's arch)")
    parser.add_argument(
        "--store-empty-prompt-embedding", metavar="DIR",
        help="compute the empty-prompt embedding of the SD pipeline in DIR and store it there, then exit",
    )
    args = parser.parse_args(argv)

    if args.store_empty_prompt_embedding:
        print(store_empty_prompt_embedding(args.store_empty_prompt_embedding))
        return 0
    base, image_size, pairs = None, args.image_size, ()
    if args.recipe:
        recipe = get_recipe(args.recipe)
        base, image_size, pairs = recipe.teacher, image_size or recipe.data.input_size[-1], recipe.pairs
    student = args.student or (recipe.arch if args.recipe else None)
    if base is None and (args.kind is None or args.source is None):
        parser.error("give --recipe, or --kind and --source")
    overrides = {
        k: v
        for k, v in dict(
            kind=args.kind, source=args.source, timestep=args.timestep, adm_preset=args.adm_preset,
            encoding=args.encoding, resolution=args.resolution, taps=tuple(args.taps) if args.taps else None,
        ).items()
        if v is not None
    }
    config = TeacherConfig(**{"timestep": 50, **overrides}) if base is None else dataclasses.replace(base, **overrides)
    try:
        teacher = build_teacher(config, mean=(0.5,) * 3, std=(0.5,) * 3)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image_size = image_size or teacher.size_multiple * 4
    print(describe_taps(teacher, image_size))
    if student:
        levels = student_levels(build_backbone(student), student)
        paired, notes = pair_levels(levels, dict(zip(teacher.strides, teacher.channels, strict=True)), pairs)
        print(f"\nstudent {student} (levels at strides {sorted(levels)}) <- teacher taps, by stride "
              f"({'the recipe' if pairs else 'automatic'} pairing):\n")
        print("\n".join([describe_pairs(paired, image_size), *notes]))
    return 0


if __name__ == "__main__":
    from training.run.cli import run

    sys.exit(run(main))
