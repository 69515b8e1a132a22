"""Upload an exported folder (hub/export.py) to the Hugging Face Hub. Dry run unless --push.

    python -m hub.publish runs/fmnist/export --repo-id dreamteacher/resnet18.dreamteacher_fmnist          # dry run
    HF_TOKEN=... python -m hub.publish runs/fmnist/export --repo-id dreamteacher/resnet18.dreamteacher_fmnist --push

The token comes from HF_TOKEN, else huggingface_hub's stored login (`hf auth login`); it is never printed, and
never taken on the command line, where other users of the machine could read it in the process list.
Before uploading, every file is checked against the export's SHA256SUMS; a file it does not list, a subfolder
or a pickle stops the upload, and only the checked files are uploaded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from huggingface_hub import HfApi

from dreamteacher_models._timm_registry import WEIGHTS_FILENAME
from training.run.checksums import CHECKSUMS_FILENAME, verify_checksums
from training.run.layout import RESOLVED_RECIPE_FILENAME

REQUIRED_FILES = (WEIGHTS_FILENAME, "config.json", "README.md", CHECKSUMS_FILENAME)


def check_export(folder: Path) -> list[str]:
    """The files that would be uploaded; raises unless the folder is a complete, pickle-free export whose every
    file matches its SHA256SUMS (and nothing else: no unlisted file, no subfolder)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist; make one with `python -m hub.export`")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a complete export: missing {missing} (run `python -m hub.export`)")
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if subfolders:
        raise ValueError(f"{folder} holds subfolders {subfolders}; an export has none: publish checks and uploads "
                         "only the files SHA256SUMS lists")
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    if pickles:
        raise ValueError(f"{folder} holds pickle files {pickles}; only safetensors are published")
    sums = verify_checksums(folder)
    unlisted = [f for f in files if f != CHECKSUMS_FILENAME and f not in sums]
    if unlisted:
        raise ValueError(f"{folder} holds files SHA256SUMS does not list: {unlisted}; remove them or re-export")
    return files


def default_repo_id(folder: Path) -> str | None:
    recipe_file = folder / RESOLVED_RECIPE_FILENAME
    if not recipe_file.is_file():
        return None
    from dreamteacher_models.recipes import recipe_from_dict

    return recipe_from_dict(json.loads(recipe_file.read_text())).hub_id


def publish(folder: str | Path, repo_id: str | None = None, push: bool = False, token: str | None = None,
            private: bool = False, commit_message: str = "Add DreamTeacher weights") -> str | None:
    """Upload `folder` to `repo_id` when `push`, else print what would be uploaded. Returns the commit URL."""
    folder = Path(folder)
    files = check_export(folder)
    repo_id = repo_id or default_repo_id(folder)
    if not repo_id:
        raise ValueError("no --repo-id given and the export has no recipe.json to derive it from")
    print(f"{'uploading' if push else 'dry run: would upload'} {len(files)} files to {repo_id}: {', '.join(files)}")
    if not push:
        print("pass --push to upload")
        return None
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message,
                               allow_patterns=files)
    print(f"uploaded: {commit.commit_url}")
    return commit.commit_url


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="an export folder written by `python -m hub.export`")
    parser.add_argument("--repo-id", help="<org>/<arch>.<tag>; default: the recipe's Hub id")
    parser.add_argument("--push", action="store_true", help="really upload (default: dry run)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    args = parser.parse_args(argv)
    return publish(args.folder, args.repo_id, push=args.push, private=args.private)


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
