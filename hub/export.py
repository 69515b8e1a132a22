"""Export a trained student as a timm-native Hub folder: model.safetensors, config.json, README.md, SHA256SUMS.

    python -m hub.export --checkpoint runs/fmnist --out runs/fmnist/export
    python -m hub.export --checkpoint student.safetensors --recipe resnet50.dreamteacher_in1k --out export/

The input is a student state dict (timm key names), a `.safetensors` file holding one, or a training run
(its output dir or one checkpoint dir: keys `student.*` are kept, the regressor is dropped). The folder loads
with `timm.create_model("local-dir:<out>", pretrained=True)` and, once uploaded, with `hf-hub:` and no
dreamteacher import at all. Writing is atomic: a crash leaves either the old folder or the new one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import timm
import torch

from dreamteacher_models._timm_registry import WEIGHTS_FILENAME
from dreamteacher_models.recipes import Recipe, get_recipe
from training.run.backbones import load_student
from training.run.checksums import read_safetensors, sha256_file, write_checksums
from training.run.disk_full import reporting_full_disk
from training.run.layout import (
    RESOLVED_RECIPE_FILENAME,
    find_run_checkpoint,
    find_run_recipe,
    fresh_staging_dir,
    give_files_umask_modes,
    refuse_foreign_folder,
    replace_dir,
    replaceable_folder,
)

from .model_card import Results, render_model_card

EXPORT_FILES = {WEIGHTS_FILENAME, "config.json", "README.md", "SHA256SUMS", RESOLVED_RECIPE_FILENAME}


def export_for_hub(
    weights: Mapping[str, torch.Tensor] | str | Path,
    out_dir: str | Path,
    recipe: Recipe | str | None = None,
    results: Results | None = None,
    results_note: str = "",
) -> Path:
    """Write the timm-native folder for a trained student; returns `out_dir`.

    weights: a state dict, a .safetensors file, or a training run / checkpoint folder.
    recipe: a Recipe or its name; defaults to the resolved recipe the training run wrote.
    """
    if not isinstance(weights, Mapping):
        source = Path(weights)
        if not source.exists():
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        recipe = recipe or find_run_recipe(source)
        weights = read_safetensors(find_run_checkpoint(source))
    if recipe is None:
        raise ValueError("no recipe given and none found beside the checkpoint: pass --recipe NAME")
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    model = load_student(recipe, weights)

    out_dir = replaceable_folder(out_dir)
    refuse_foreign_folder(out_dir, EXPORT_FILES, "a previous export (hub/export.py)")
    staging = fresh_staging_dir(out_dir)
    try:
        with reporting_full_disk(staging.parent, "the export"):
            timm.models.save_for_hf(model, staging, safe_serialization=True)
            _check_no_pickles(staging)
            digest = sha256_file(staging / WEIGHTS_FILENAME)
            params_m = sum(p.numel() for p in model.parameters()) / 1e6
            card = render_model_card(recipe, params_m=params_m, sha256=digest, results=results,
                                     results_note=results_note)
            card.save(staging / "README.md")
            (staging / RESOLVED_RECIPE_FILENAME).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
            write_checksums(staging)
        give_files_umask_modes(staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_no_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pth", ".pt", ".pkl"}]
    if pickles:
        raise RuntimeError(f"export produced pickle files {pickles}; only safetensors may be shipped")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training run dir, checkpoint dir or .safetensors file")
    parser.add_argument("--out", required=True,
                        help="folder to write (a previous export there is replaced atomically; any other content "
                             "makes the export refuse)")
    parser.add_argument("--recipe", help="recipe name; default: the resolved recipe saved by the training run")
    parser.add_argument("--results", help="JSON {protocol: {metric: value}} (e.g. training/evaluate.py output)")
    parser.add_argument("--results-note", default="", help="one line under the results table: command, machine")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text()) if args.results else None
    if isinstance(results, dict) and "results" in results:  # evaluate.py's JSON: results plus run metadata
        results = results["results"]
    out = export_for_hub(args.checkpoint, args.out, recipe=args.recipe, results=results, results_note=args.results_note)
    print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
