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
import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import timm
import torch

from dreamteacher_models._timm_registry import WEIGHTS_FILENAME, pretrained_cfg_for
from dreamteacher_models.recipes import Recipe, get_recipe
from training.run_layout import (
    RESOLVED_RECIPE_FILENAME,
    find_run_checkpoint,
    find_run_recipe,
    fresh_staging_dir,
    give_files_umask_modes,
    refuse_foreign_folder,
    replace_dir,
)

from .model_card import Results, render_model_card

EXPORT_FILES = {WEIGHTS_FILENAME, "config.json", "README.md", "SHA256SUMS", RESOLVED_RECIPE_FILENAME}
STUDENT_PREFIX = "student."  # the trainer's module holds the backbone as `.student`, the regressor beside it


def build_backbone(recipe: Recipe) -> torch.nn.Module:
    """The headless timm model a recipe describes, carrying the recipe's pretrained_cfg (random weights)."""
    return timm.create_model(recipe.arch, pretrained=False, num_classes=0, pretrained_cfg=pretrained_cfg_for(recipe))


def student_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors only: `student.`-prefixed keys when present (regressor/teacher dropped), DDP prefix removed."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith(STUDENT_PREFIX) for k in state):
        state = {k.removeprefix(STUDENT_PREFIX): v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    return state


def load_student(recipe: Recipe, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The recipe's backbone with `state_dict` loaded strictly; mismatches are reported by name."""
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        weights = safetensors.torch.load_file(find_run_checkpoint(source))
    if recipe is None:
        raise ValueError("no recipe given and none found beside the checkpoint: pass --recipe NAME")
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    model = load_student(recipe, weights)

    out_dir = Path(out_dir)
    refuse_foreign_folder(out_dir, EXPORT_FILES, "a previous export (hub/export.py)")
    staging = fresh_staging_dir(out_dir)
    try:
        timm.models.save_for_hf(model, staging, safe_serialization=True)
        _check_no_pickles(staging)
        digest = sha256_of(staging / WEIGHTS_FILENAME)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        card = render_model_card(recipe, params_m=params_m, sha256=digest, results=results, results_note=results_note)
        card.save(staging / "README.md")
        (staging / RESOLVED_RECIPE_FILENAME).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        write_checksums(staging)
        give_files_umask_modes(staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


CHECKSUMS_FILENAME = "SHA256SUMS"


def write_checksums(folder: Path) -> None:
    """SHA256SUMS (`sha256sum` format) of every other file of an export: what publish verifies before uploading."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS_FILENAME)
    (folder / CHECKSUMS_FILENAME).write_text("".join(f"{sha256_of(folder / name)}  {name}\n" for name in files))


def read_checksums(folder: Path) -> dict[str, str]:
    """{file name: SHA-256} from an export's SHA256SUMS; a clear error when it is empty or malformed."""
    path = folder / CHECKSUMS_FILENAME
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path} line {number} is not '<sha256>  <file>': {line[:80]!r}; re-export the folder")
        sums[parts[1].lstrip("*")] = parts[0]
    if not sums:
        raise ValueError(f"{path} is empty; re-export the folder with `python -m hub.export`")
    return sums


def verify_checksums(folder: Path) -> dict[str, str]:
    """Check every file SHA256SUMS lists against its digest; raises naming the first that differs or is missing."""
    sums = read_checksums(folder)
    for name, digest in sums.items():
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name} is listed in SHA256SUMS but missing: re-export the folder")
        if sha256_of(folder / name) != digest:
            raise ValueError(f"{folder / name} does not match its SHA256SUMS: re-export it")
    return sums


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
    from training.cli import run

    run(main)
