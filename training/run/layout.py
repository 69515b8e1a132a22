"""A training run's folder: where checkpoints, the resolved recipe and metrics live, and how they are written.

Shared by the trainers (`pretrain.py`, `train_teacher.py`, `train_interpreter.py`), export (`hub/export.py`) and
evaluation:

    <run>/recipe.json                 the resolved recipe (pretrain.py)
    <run>/args.json                   the command-line arguments
    <run>/metrics.jsonl               one JSON line per logged step; cut back to the resumed step on --resume
    <run>/checkpoints/step_N/         `accelerator.save_state` + run.json (what a resume must match)
    <run>/checkpoints/.tmp_step_N/    a save in progress: renamed to step_N only when complete
    <run>/checkpoints/.deleting_step_N/  a rotated-out checkpoint being deleted
    <run>/checkpoints/.step_N.old/    a step_N being replaced by a new save of the same step (put back if killed)

Nothing half-written ever takes a final name: checkpoints are saved under a temporary name and renamed when
complete (the older ones are rotated out only after that), and files are replaced with an atomic rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dreamteacher_models._timm_registry import WEIGHTS_FILENAME
from dreamteacher_models.recipes import Recipe, recipe_from_dict
from training.run.disk_full import reporting_full_disk

logger = logging.getLogger(__name__)

RESOLVED_RECIPE_FILENAME = "recipe.json"
METRICS_FILENAME = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
RUN_FACTS_FILENAME = "run.json"  # in each checkpoint: the data, batch, processes and seed it was trained with


# ---------------------------------------------------------------------------------------------------------------
# Finding things in a run


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (incomplete ones are never renamed to step_N)."""
    steps = [p for p in (Path(run_dir) / CHECKPOINTS_DIR).glob("step_*") if _step_of(p) >= 0 and p.is_dir()]
    return sorted(steps, key=_step_of)


def _step_of(checkpoint: Path) -> int:
    """N of a step_N folder, -1 for any other name."""
    name = Path(checkpoint).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a training run, or None."""
    steps = checkpoint_dirs(run_dir)
    return steps[-1] if steps else None


def find_run_checkpoint(path: Path) -> Path:
    """The weights file inside a training run: `path` itself, its model file, or its latest checkpoint's."""
    if path.is_file():
        return path
    if (path / WEIGHTS_FILENAME).is_file():
        return path / WEIGHTS_FILENAME
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None and (checkpoint / WEIGHTS_FILENAME).is_file():
        return checkpoint / WEIGHTS_FILENAME
    raise FileNotFoundError(
        f"no weights found at {path}: expected a .safetensors file, a folder with {WEIGHTS_FILENAME}, "
        f"or a training run with {CHECKPOINTS_DIR}/step_N/{WEIGHTS_FILENAME}"
    )


def find_run_recipe(path: Path) -> Recipe | None:
    """The resolved recipe a training run wrote, looked for beside the checkpoint and up to the run dir."""
    for folder in [path if path.is_dir() else path.parent, *path.parents][:4]:
        if (folder / RESOLVED_RECIPE_FILENAME).is_file():
            return recipe_from_dict(json.loads((folder / RESOLVED_RECIPE_FILENAME).read_text()))
    return None


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """--resume: 'latest' (None, with a warning, when the run has no checkpoint yet) or a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            logger.warning("--resume latest: no checkpoint in %s/%s; starting from scratch", run_dir, CHECKPOINTS_DIR)
        return found
    path = Path(resume)
    if not (path / WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (expected {path}/{WEIGHTS_FILENAME})")
    return path


def refuse_fresh_run_over_checkpoints(run_dir: Path) -> None:
    """A fresh run into a folder with another run's checkpoints would mix with them (and lose to their
    `--resume latest`): refuse it."""
    found = latest_checkpoint(run_dir)
    if found is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints of an earlier run (latest {found.name}); continue it with "
            "--resume latest, or choose a new --output-dir (nothing was changed)")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first: what a rename is about to publish is on
    the disk before it has its public name (a crash or power loss never leaves a complete-looking empty file)."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        else:
            fsync_path(path)
    for sub in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(sub)


def moved_aside(target: Path) -> Path:
    """Where `replace_dir` keeps the folder it replaces until the new one has taken its name."""
    return target.with_name(f".{target.name}.old")


def restore_moved_aside(target: Path) -> None:
    """Put back a folder that a killed `replace_dir` had moved aside before its replacement took the name."""
    old = moved_aside(target)
    if old.is_dir() and not target.exists():
        old.rename(target)
        logger.warning("restored %s: a killed writer had moved it aside to replace it", target)


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing an existing folder; `new` is synced to the disk before the rename and the
    rename itself after it. Between the two renames the old folder is at `moved_aside(target)`: a kill there is
    undone by the next `replace_dir` of the same target or `remove_leftovers` (`restore_moved_aside`)."""
    fsync_tree(new)
    restore_moved_aside(target)
    old = moved_aside(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def replaceable_folder(target: str | Path) -> Path:
    """Where a folder that is replaced whole (an export, a teacher) may be written: never the current folder or
    one holding it (the replacement would move it away from under the user); a symlinked folder is written where
    the link points, so the link stays."""
    target = Path(target).expanduser()
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{target} is the current folder or holds it, and an export replaces its folder whole: name "
                         f"a folder of its own, e.g. {target / 'export'}")
    return resolved if target.is_symlink() else target


def fresh_staging_dir(target: Path) -> Path:
    """An empty `.<name>.tmp-<pid>` folder beside `target` to build its replacement in (created with the umask's
    modes, so the result is as readable as a normally made folder), after removing the staging folders that
    killed writers left there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    staging.mkdir()
    return staging


def give_files_umask_modes(folder: Path) -> None:
    """Files some writers create private (safetensors: 600) get the modes the umask gives a new file, so an
    export on a shared machine is as readable as any file its owner makes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; synced to the disk and renamed onto `path` when the
    block ends without an error (the rename synced too), removed when it raises: a reader sees the old or the new
    file, never half of one, after a kill, a crash or a power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with reporting_full_disk(path.parent, path.name):
            yield tmp
            fsync_path(tmp)
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` (its folder made) through a temporary file and a rename: a reader sees the old or the new
    content, never half."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """A command's JSON report (`--out`), its folder made, written atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path


def refuse_foreign_folder(folder: Path, own_names: set[str], what: str) -> None:
    """An export replaces its target folder whole: refuse one that holds anything an export does not write, so a
    user's files are never deleted."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose another output folder")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in own_names)
    if foreign:
        raise FileExistsError(
            f"refusing to replace {folder}: it is not {what} and holds {', '.join(foreign[:8])}"
            f"{' ...' if len(foreign) > 8 else ''}; choose an empty or new output folder (nothing was changed)"
        )


def remove_leftovers(run_dir: Path) -> None:
    """Undo what killed checkpoint saves and rotations left: a step_N moved aside to be replaced is put back, a
    partial .tmp_step_N or half-deleted .deleting_step_N removed; the main process calls it when a run starts and
    before each save."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    for old in folder.glob(".step_*.old"):
        restore_moved_aside(folder / old.name[1:-len(".old")])
    for leftover in [*folder.glob(".tmp_step_*"), *folder.glob(".deleting_step_*"), *folder.glob(".step_*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, facts: Mapping[str, Any]) -> Path:
    """`accelerator.save_state` into checkpoints/.tmp_step_N plus run.json (`facts`), renamed to step_N when
    complete; only then are checkpoints beyond the newest `keep` deleted (each renamed away first). A kill at any
    moment leaves every step_N complete and the newest complete one in place."""
    final = run_dir / CHECKPOINTS_DIR / f"step_{step}"
    staging = run_dir / CHECKPOINTS_DIR / f".tmp_step_{step}"
    if accelerator.is_main_process:
        remove_leftovers(run_dir)
    accelerator.wait_for_everyone()
    try:
        with reporting_full_disk(staging.parent, f"checkpoint step_{step}"):
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (staging / RUN_FACTS_FILENAME).write_text(json.dumps(dict(facts), indent=2, sort_keys=True) + "\n")
    except Exception:
        if accelerator.is_main_process:  # the space a failed save took goes back at once
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        replace_dir(staging, final)  # an existing step_N stays complete until the new one takes its name
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            trash = old.with_name(f".deleting_{old.name}")  # renamed first: never a half-deleted step_N
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_resume_facts(checkpoint: Path, facts: Mapping[str, Any], allow_mismatch: bool = False) -> None:
    """Refuse a resume whose data, batch, process layout or seed differ from those the checkpoint was trained
    with (its run.json), naming each difference; with `allow_mismatch`, warn and go on."""
    saved_file = checkpoint / RUN_FACTS_FILENAME
    if not saved_file.is_file():
        logger.warning("%s has no %s: the resume cannot be checked against its data, batch and seed", checkpoint,
                       RUN_FACTS_FILENAME)
        return
    saved = json.loads(saved_file.read_text())
    now = json.loads(json.dumps(dict(facts)))
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if not diffs:
        return
    message = f"resuming {checkpoint} with other settings than it was trained with ({'; '.join(diffs)})"
    if allow_mismatch:
        logger.warning("%s; continuing as --allow-resume-mismatch says", message)
        return
    raise ValueError(f"{message}; resume with the same settings, or pass --allow-resume-mismatch to continue anyway")


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl


PICKLED_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


def check_checkpoint_holds_only_data(checkpoint: Path) -> None:
    """Refuse a checkpoint any of whose pickles (Accelerate's optimizer, sampler, RNG and registered-object files)
    would do more than rebuild tensors, numbers, strings and numpy arrays: each is first read with torch's
    restricted unpickler (`weights_only=True`), so the unrestricted load Accelerate then makes of the same files
    runs no code from a run folder someone else wrote."""
    import numpy as np
    import torch

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    numpy_state = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]
    for path in sorted(Path(checkpoint).iterdir()):
        if path.suffix not in PICKLED_SUFFIXES:
            continue
        try:
            with torch.serialization.safe_globals(numpy_state):
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # a global outside the allowlist (an unreadable file: load_state says)
            raise ValueError(f"refusing to resume from {checkpoint}: {path.name} is a pickle that does more than "
                             f"hold data and could run code ({' '.join(str(e).split())[:300]}); resume only from "
                             "checkpoints you trust, written by this trainer") from e
        except Exception:  # noqa: BLE001, S110 - truncated or empty: left to load_state, whose failure falls back
            pass


def resume_checkpoint(accelerator, checkpoint: Path, facts: Mapping[str, Any], allow_mismatch: bool, run_dir: Path,
                      state, log: logging.Logger) -> None:
    """Load `checkpoint` (weights, optimizer, schedule and every registered object, `state` included) after checking
    it was made with the same `facts`; metrics.jsonl is cut back to the resumed step. A checkpoint of this run
    folder that fails to load (a truncated or empty file after a crash) is reported and the one before it is
    loaded instead; an explicit checkpoint elsewhere has no fallback."""
    older = [c for c in checkpoint_dirs(run_dir) if _step_of(c) < _step_of(checkpoint)]
    own = Path(checkpoint).resolve().parent == (Path(run_dir) / CHECKPOINTS_DIR).resolve()
    candidates = [Path(checkpoint), *reversed(older)] if own else [Path(checkpoint)]
    for i, candidate in enumerate(candidates):
        check_resume_facts(candidate, facts, allow_mismatch)
        check_checkpoint_holds_only_data(candidate)
        try:
            accelerator.load_state(str(candidate))
            break
        except Exception as e:  # noqa: BLE001 - any unreadable file of the checkpoint
            detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if i + 1 == len(candidates):
                raise ValueError(f"cannot resume: checkpoint {candidate} does not load ({detail}) and no earlier "
                                 "checkpoint of this run folder does either; start afresh without --resume") from e
            log.error("checkpoint %s does not load (%s): it is damaged; resuming from %s instead", candidate, detail,
                      candidates[i + 1])
    log.info("resumed from %s at step %d (epoch %d, batch %d)", candidate, state.step, state.epoch,
             state.batch_in_epoch)
    if accelerator.is_main_process and cut_metrics_to_step(run_dir, state.step):
        log.info("metrics.jsonl cut back to step %d (lines after it, or torn by the kill, dropped)", state.step)


def start_run_folder(accelerator, run_dir: Path, fresh: bool, log: logging.Logger) -> None:
    """Where every process sees the run folder, the main process makes it and removes what killed saves left; a
    fresh run also drops the metrics.jsonl of a killed run that left no checkpoint (torn line included)."""
    from training.run.shared_disk import check_shared_folder

    check_shared_folder(accelerator, run_dir, "the run folder (--output-dir)")
    if not accelerator.is_main_process:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_folder(run_dir, log)
    remove_leftovers(run_dir)
    if fresh and cut_metrics_to_step(run_dir, 0):
        log.info("metrics.jsonl of an earlier run that left no checkpoint dropped: this run logs from step 1")


LOCK_FILENAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lock_run_folder(run_dir: Path, log: logging.Logger) -> None:
    """Hold `run_dir/.lock` (pid and host) until this process exits: a second job started in the same run folder
    is refused, naming the holder, instead of deleting the first one's temporary checkpoints. A lock left by a
    killed job of this host (its pid is gone) is taken over; one of another host is refused with how to clear it."""
    import atexit
    import socket

    path = Path(run_dir) / LOCK_FILENAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                return  # this process holds it already (a second run of main() in one process)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.warning("run folder %s: taking over the lock of pid %d, which is gone (a killed job)", run_dir,
                            holder["pid"])
                path.unlink(missing_ok=True)
                continue
            raise FileExistsError(f"run folder {run_dir} is in use by pid {holder.get('pid', '?')} on host "
                                  f"{holder.get('host', '?')}; wait for that job, or if it is gone remove {path}"
                                  ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(lambda: _release(path, me))
        return


def _release(path: Path, me: dict) -> None:
    try:
        if json.loads(path.read_text()) == me:
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass


def append_metrics(run_dir: Path, row: Mapping[str, Any]) -> None:
    """One JSON line per logged step, written whole and flushed (main process only); a line torn by a kill or a full
    disk is dropped on resume (`cut_metrics_to_step`)."""
    with reporting_full_disk(run_dir, METRICS_FILENAME), open(run_dir / METRICS_FILENAME, "a") as f:
        f.write(json.dumps(dict(row)) + "\n")
        f.flush()


def cut_metrics_to_step(run_dir: Path, step: int) -> int:
    """On resume from `step`: keep the lines of steps <= `step`, drop a torn last line (a kill mid-write) and the
    steps the resumed run will log again. Rewritten atomically; returns how many lines were dropped."""
    path = run_dir / METRICS_FILENAME
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped
