"""A training run's folder (training/run/layout.py), tested directly: checkpoint listing and resume lookup, the
refusals that protect an earlier run or a user's files, atomic writes, checkpoint saves with rotation, the facts a
resume must match, and metrics.jsonl cut back to the resumed step.

The trainers' own tests (test_pretrain.py, test_train_teacher.py) exercise the same code through whole runs."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from tests.tiny import FakeAccelerator
from training.run import layout
from training.run.layout import (
    CHECKPOINTS_DIR,
    METRICS_FILENAME,
    RUN_FACTS_FILENAME,
    append_metrics,
    atomic_file,
    check_resume_facts,
    checkpoint_dirs,
    cut_metrics_to_step,
    find_resume_checkpoint,
    latest_checkpoint,
    refuse_foreign_folder,
    refuse_fresh_run_over_checkpoints,
    remove_leftovers,
    replace_dir,
    save_checkpoint,
    write_text_atomic,
)

WEIGHTS = "model.safetensors"  # what marks a checkpoint folder (dreamteacher_models._timm_registry.WEIGHTS_FILENAME)


def _checkpoint(run: Path, step: int | str, weights: bool = True) -> Path:
    folder = run / CHECKPOINTS_DIR / f"step_{step}"
    folder.mkdir(parents=True)
    if weights:
        (folder / WEIGHTS).write_bytes(b"weights")
    return folder


# ------------------------------------------------------------------------------------------------ finding checkpoints


def test_checkpoint_dirs_are_complete_step_folders_in_step_order(tmp_path):
    assert checkpoint_dirs(tmp_path) == [] and latest_checkpoint(tmp_path) is None  # no checkpoints/ at all
    for step in (10, 2, 1):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, "x")  # not a step number
    (tmp_path / CHECKPOINTS_DIR / ".tmp_step_11").mkdir()  # a save in progress
    (tmp_path / CHECKPOINTS_DIR / ".deleting_step_0").mkdir()  # a rotation in progress
    (tmp_path / CHECKPOINTS_DIR / "step_12").write_text("a file, not a folder")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_1", "step_2", "step_10"]  # by number, not by name
    assert latest_checkpoint(tmp_path) == tmp_path / CHECKPOINTS_DIR / "step_10"


def test_resume_latest_without_a_checkpoint_starts_from_scratch_with_a_warning(tmp_path, caplog):
    assert find_resume_checkpoint(None, tmp_path) is None and find_resume_checkpoint("", tmp_path) is None
    with caplog.at_level(logging.WARNING, logger=layout.logger.name):
        assert find_resume_checkpoint("latest", tmp_path) is None
    assert caplog.messages == [f"--resume latest: no checkpoint in {tmp_path}/checkpoints; starting from scratch"]
    _checkpoint(tmp_path, 3)
    _checkpoint(tmp_path, 20)
    assert find_resume_checkpoint("latest", tmp_path) == tmp_path / CHECKPOINTS_DIR / "step_20"


def test_resume_from_a_path_must_be_a_checkpoint_folder(tmp_path):
    elsewhere = _checkpoint(tmp_path / "other-run", 5)
    assert find_resume_checkpoint(str(elsewhere), tmp_path / "run") == elsewhere  # any run's checkpoint
    empty = _checkpoint(tmp_path / "run", 6, weights=False)
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match=rf"^--resume {re.escape(str(bad))}: not a checkpoint folder "
                                                    rf"\(expected {re.escape(str(bad / WEIGHTS))}\)$"):
            find_resume_checkpoint(str(bad), tmp_path / "run")


# ------------------------------------------------------------------------------------------------ refusals


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused(tmp_path):
    refuse_fresh_run_over_checkpoints(tmp_path / "new")  # no folder yet
    (tmp_path / CHECKPOINTS_DIR / ".tmp_step_4").mkdir(parents=True)  # only an incomplete save: nothing to lose
    refuse_fresh_run_over_checkpoints(tmp_path)
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 9)
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(tmp_path))} already holds checkpoints of an earlier "
                                              r"run \(latest step_9\); continue it with --resume latest, or choose a "
                                              r"new --output-dir \(nothing was changed\)$"):
        refuse_fresh_run_over_checkpoints(tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_2", "step_9"]


def test_a_folder_holding_anything_but_its_own_files_is_refused(tmp_path):
    own = {"model.safetensors", "config.json"}
    refuse_foreign_folder(tmp_path / "missing", own, "an export")  # nothing there: nothing to protect
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(tmp_path / 'file'))} exists and is not a folder; "
                                              r"choose another output folder$"):
        refuse_foreign_folder(tmp_path / "file", own, "an export")
    out = tmp_path / "out"
    out.mkdir()
    for name in own:
        (out / name).write_text("x")
    refuse_foreign_folder(out, own, "an export")  # only what an export writes
    (out / "notes.txt").write_text("mine")
    (out / "b").mkdir()
    with pytest.raises(FileExistsError, match=rf"^refusing to replace {re.escape(str(out))}: it is not an export and "
                                              r"holds b, notes\.txt; choose an empty or new output folder \(nothing "
                                              r"was changed\)$"):
        refuse_foreign_folder(out, own, "an export")
    for i in range(7):
        (out / f"z{i}").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds b, notes\.txt, z0, z1, z2, z3, z4, z5 \.\.\.; choose"):
        refuse_foreign_folder(out, own, "an export")  # 9 foreign names: the first 8, sorted
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ atomic writes


def test_write_text_atomic_replaces_whole_and_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "recipe.json"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["recipe.json"]  # no temporary file left
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "half \ud800")  # fails while writing the temporary file
    assert path.read_text() == "new\n"  # the old content, whole
    assert os.listdir(tmp_path) == ["recipe.json"]  # and the half-written temporary file removed
    write_text_atomic(tmp_path / "new" / "folders" / "report.md", "made\n")  # its folder is made
    assert (tmp_path / "new" / "folders" / "report.md").read_text() == "made\n"


def test_atomic_file_renames_what_the_block_wrote_or_removes_it_when_the_block_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".model.safetensors.tmp-{os.getpid()}"
        tmp.write_bytes(b"ha")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.safetensors"]
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # nothing under the final name until the block ends
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.safetensors"]


def test_replace_dir_swaps_a_folder_whole(tmp_path):
    target, new = tmp_path / "export", tmp_path / ".export.tmp-1"
    new.mkdir()
    (new / "a").write_text("first")
    replace_dir(new, target)  # no target yet: a plain rename
    assert sorted(os.listdir(tmp_path)) == ["export"] and (target / "a").read_text() == "first"

    (tmp_path / ".export.old").mkdir()  # what a swap killed half-way left
    (tmp_path / ".export.old" / "stale").write_text("x")
    new.mkdir()
    (new / "b").write_text("second")
    replace_dir(new, target)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no staging folder, no old copy
    assert os.listdir(target) == ["b"] and (target / "b").read_text() == "second"  # the old files did not survive


def test_a_checkpoint_moved_aside_by_a_killed_replacement_is_put_back(tmp_path):
    """A kill between moving step_N aside and renaming its new save in leaves no step_N: the next start restores
    the moved-aside one instead of resuming from an older checkpoint (or, with --keep-checkpoints 1, from none)."""
    folder = tmp_path / CHECKPOINTS_DIR
    (folder / ".step_6.old").mkdir(parents=True)
    (folder / ".step_6.old" / WEIGHTS).write_text("step 6")
    (folder / ".step_5.old").mkdir()  # moved aside, but its replacement took the name: stale
    (folder / "step_5").mkdir()
    (folder / "step_5" / WEIGHTS).write_text("new step 5")
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(folder)) == ["step_5", "step_6"]
    assert (folder / "step_6" / WEIGHTS).read_text() == "step 6" and (folder / "step_5" / WEIGHTS).read_text() == (
        "new step 5")


# ------------------------------------------------------------------------------------------------ checkpoints


def test_save_checkpoint_stages_renames_writes_its_facts_and_rotates(tmp_path):
    accelerator = FakeAccelerator()
    leftover = tmp_path / CHECKPOINTS_DIR / ".tmp_step_99"  # a save killed half-way
    leftover.mkdir(parents=True)
    (tmp_path / CHECKPOINTS_DIR / ".deleting_step_1").mkdir()  # a rotation killed half-way
    for step in (1, 2, 3):
        final = save_checkpoint(accelerator, tmp_path, step, keep=2, facts={"seed": step, "batch": (8, 4)})
        assert final == tmp_path / CHECKPOINTS_DIR / f"step_{step}"
    assert accelerator.saved == [".tmp_step_1", ".tmp_step_2", ".tmp_step_3"]  # saved under a temporary name
    assert accelerator.waits == [True] * 9  # three barriers a save, as every other process meets them
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["step_2", "step_3"]  # leftovers and step_1 gone
    assert (final / WEIGHTS).read_text() == "weights of .tmp_step_3"
    assert json.loads((final / RUN_FACTS_FILENAME).read_text()) == {"batch": [8, 4], "seed": 3}

    save_checkpoint(accelerator, tmp_path, 3, keep=0, facts={"seed": 4})  # the same step again, nothing rotated
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["step_2", "step_3"]
    assert json.loads((final / RUN_FACTS_FILENAME).read_text()) == {"seed": 4}


def test_a_process_other_than_the_main_one_writes_nothing_itself(tmp_path):
    accelerator = FakeAccelerator(main=False)
    save_checkpoint(accelerator, tmp_path, 1, keep=1, facts={"seed": 0})
    assert os.listdir(tmp_path / CHECKPOINTS_DIR) == [".tmp_step_1"]  # its share of save_state, never renamed
    assert not (tmp_path / CHECKPOINTS_DIR / ".tmp_step_1" / RUN_FACTS_FILENAME).exists()
    assert accelerator.waits == [False] * 3  # yet it meets the main process at every barrier


def test_remove_leftovers_deletes_only_what_killed_saves_and_rotations_left(tmp_path):
    remove_leftovers(tmp_path)  # no checkpoints/ yet
    _checkpoint(tmp_path, 4)
    for name in (".tmp_step_5", ".deleting_step_3", "notes"):
        (tmp_path / CHECKPOINTS_DIR / name).mkdir()
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["notes", "step_4"]


# ------------------------------------------------------------------------------------------------ resume facts


def _facts_checkpoint(tmp_path, facts) -> Path:
    checkpoint = _checkpoint(tmp_path, 4)
    (checkpoint / RUN_FACTS_FILENAME).write_text(json.dumps(facts))
    return checkpoint


def test_resume_facts_that_match_pass_after_a_json_round_trip(tmp_path, caplog):
    checkpoint = _facts_checkpoint(tmp_path, {"data": "fmnist", "batch": [8, 4], "seed": 0})
    with caplog.at_level(logging.WARNING, logger=layout.logger.name):
        check_resume_facts(checkpoint, {"seed": 0, "batch": (8, 4), "data": "fmnist"})  # a tuple reads as the list
    assert caplog.messages == []


def test_a_resume_with_other_facts_is_refused_naming_each_difference(tmp_path):
    checkpoint = _facts_checkpoint(tmp_path, {"data": "fmnist", "batch": [8, 4], "seed": 0, "processes": 2})
    now = {"data": "fmnist", "batch": (8, 2), "seed": 1, "streaming": True}
    message = (rf"resuming {re.escape(str(checkpoint))} with other settings than it was trained with \("
               r"batch: \[8, 4\] in the checkpoint, \[8, 2\] now; processes: 2 in the checkpoint, None now; "
               r"seed: 0 in the checkpoint, 1 now; streaming: None in the checkpoint, True now\)")
    with pytest.raises(ValueError, match=rf"^{message}; resume with the same settings, or pass "
                                         r"--allow-resume-mismatch to continue anyway$"):
        check_resume_facts(checkpoint, now)
    with pytest.raises(ValueError, match=r"\(seed: 0 in the checkpoint, 1 now\)"):  # only the fact that differs
        check_resume_facts(checkpoint, {"data": "fmnist", "batch": [8, 4], "seed": 1, "processes": 2})


def test_allow_mismatch_warns_and_goes_on(tmp_path, caplog):
    checkpoint = _facts_checkpoint(tmp_path, {"seed": 0})
    with caplog.at_level(logging.WARNING, logger=layout.logger.name):
        check_resume_facts(checkpoint, {"seed": 1}, allow_mismatch=True)
    assert caplog.messages == [f"resuming {checkpoint} with other settings than it was trained with (seed: 0 in the "
                               "checkpoint, 1 now); continuing as --allow-resume-mismatch says"]


def test_a_checkpoint_without_facts_is_resumed_with_a_warning(tmp_path, caplog):
    checkpoint = _checkpoint(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger=layout.logger.name):
        check_resume_facts(checkpoint, {"seed": 1})
    assert caplog.messages == [f"{checkpoint} has no run.json: the resume cannot be checked against its data, batch "
                               "and seed"]


# ------------------------------------------------------------------------------------------------ metrics.jsonl


def test_metrics_are_cut_back_to_the_resumed_step_and_a_torn_last_line_dropped(tmp_path):
    assert cut_metrics_to_step(tmp_path, 3) == 0  # no metrics.jsonl yet
    for step in (1, 2, 3, 4, 5):
        append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    path = tmp_path / METRICS_FILENAME
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a kill mid-write
    assert cut_metrics_to_step(tmp_path, 3) == 3  # steps 4 and 5, and the torn line
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1.0 / 3}]
    assert path.read_text().endswith("}\n") and os.listdir(tmp_path) == [METRICS_FILENAME]  # rewritten atomically


def test_metrics_with_nothing_to_cut_are_left_alone(tmp_path):
    path = tmp_path / METRICS_FILENAME
    path.write_text('{"step": 1}\n{"note": "no step: counts as step 0"}\n{"step": 2}\n')
    before = path.stat().st_mtime_ns
    assert cut_metrics_to_step(tmp_path, 2) == 0
    assert path.stat().st_mtime_ns == before  # not rewritten
    assert cut_metrics_to_step(tmp_path, 0) == 2
    assert path.read_text() == '{"note": "no step: counts as step 0"}\n'


class _TwoRanks:
    """An accelerator of 2 processes whose gather stacks this rank's value with the other rank's `other`."""

    num_processes = 2

    def __init__(self, other: int):
        import torch

        self.device, self.other = torch.device("cpu"), other

    def gather(self, t):
        import torch

        return torch.cat([t, torch.tensor([self.other])])


def test_a_micro_batch_empty_on_one_rank_is_skipped_by_every_rank():
    from tests.tiny import FakeAccelerator
    from training.run.guards import every_rank_has_images

    assert every_rank_has_images(FakeAccelerator(), 3) and not every_rank_has_images(FakeAccelerator(), 0)
    assert not every_rank_has_images(_TwoRanks(other=0), 4)  # this rank has images, the other none: both skip
    assert not every_rank_has_images(_TwoRanks(other=4), 0)
    assert every_rank_has_images(_TwoRanks(other=1), 4)


def test_a_second_job_in_a_run_folder_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path,
                                                                                                          caplog):
    import json
    import logging
    import os
    import socket

    from training.run.layout import LOCK_FILENAME, lock_run_folder

    log = logging.getLogger("dreamteacher.test")
    lock = tmp_path / LOCK_FILENAME
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))  # pid 1 is alive
    with pytest.raises(FileExistsError, match=rf"in use by pid 1 on host .*remove {lock}"):
        lock_run_folder(tmp_path, log)
    lock.write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(FileExistsError, match="pid 1 on host another-node"):
        lock_run_folder(tmp_path, log)
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # no such process
    with caplog.at_level(logging.WARNING, logger="dreamteacher.test"):
        lock_run_folder(tmp_path, log)
    assert "taking over the lock" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock_run_folder(tmp_path, log)  # held by this process already: fine
