"""A run folder or feature cache that not every process sees (node-local disks) stops the run with one line."""

import pytest
import torch

from tests.tiny import FakeAccelerator
from training.run.shared_disk import SHARED_MARKER, check_shared_folder


class TwoRanks(FakeAccelerator):
    """One process of two: `gather` returns rank 0's flag (it always sees its own marker) and this rank's."""

    num_processes = 2

    def gather(self, flags):
        return torch.cat([torch.ones_like(flags), flags]) if not self.is_main_process else torch.cat([flags, flags])


@pytest.fixture
def rank0_token(monkeypatch):
    """broadcast_object_list as rank 0 would fill it: the token it wrote."""
    def broadcast(objects):
        objects[0] = objects[0] or "token-of-rank-0"

    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)


def test_a_rank_that_does_not_see_rank_0s_marker_stops_the_run_naming_itself(tmp_path, rank0_token):
    with pytest.raises(ValueError, match=rf"^the run folder \(--output-dir\) {tmp_path} is not shared between the "
                                         r"processes: rank\(s\) \[1\] of 2 do not see what rank 0 wrote there "
                                         r"\(a node-local disk\?\); put it on a disk every node mounts"):
        check_shared_folder(TwoRanks(main=False), tmp_path, "the run folder (--output-dir)")
    (tmp_path / SHARED_MARKER).write_text("an older run's token")  # a stale marker on a local disk is no proof
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] of 2"):
        check_shared_folder(TwoRanks(main=False), tmp_path, "the run folder (--output-dir)")


def test_ranks_that_see_the_marker_go_on_and_rank_0_removes_it(tmp_path, rank0_token):
    (tmp_path / SHARED_MARKER).write_text("token-of-rank-0")
    check_shared_folder(TwoRanks(main=False), tmp_path, "the run folder")
    assert (tmp_path / SHARED_MARKER).read_text() == "token-of-rank-0"  # another rank leaves it to rank 0
    main = TwoRanks(main=True)
    check_shared_folder(main, tmp_path / "new", "the run folder")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / SHARED_MARKER).exists()
    assert main.waits == [True]  # the marker goes only after every rank read it


def test_one_process_needs_no_check(tmp_path):
    check_shared_folder(FakeAccelerator(), tmp_path / "run", "the run folder")
    assert not (tmp_path / "run").exists()
