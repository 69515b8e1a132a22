"""The teacher probe: noise fraction, per-tap probes, and the CLI on a tiny teacher and generated labelled data."""

import json

import numpy as np
import pytest
import torch

from tests.tiny import make_tiny_teacher, write_idx
from training import probe_teacher
from training.probe_teacher import noise_correlation, probe_rows


def _loader(images, labels, batch=16):
    items = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels, strict=True)]

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.stack([r["labels"] for r in rows])}

    return torch.utils.data.DataLoader(items, batch_size=batch, collate_fn=collate)


def _labelled(n, seed):
    """Two classes told apart by their mean brightness."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, 8, 8, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float() * 2 - 1
    return images, labels


def encoder(images, generator):
    """Tap "image" ignores the noise; tap "noise" is nothing but the noise draw."""
    noise = torch.randn(images.shape, generator=generator)
    return {"image": images * 3 + 1, "noise": noise}


def test_noise_fraction_is_zero_for_a_clean_tap_and_one_for_pure_noise():
    train, test = _loader(*_labelled(64, 0)), _loader(*_labelled(64, 1))
    rows = probe_rows(encoder, train, test)
    assert rows["image"]["noise_fraction"] == pytest.approx(0.0, abs=1e-5)
    assert rows["noise"]["noise_fraction"] == pytest.approx(1.0, abs=0.1)
    assert rows["image"]["linear"] == 100.0 and rows["image"]["knn"] == 100.0
    assert rows["noise"]["linear"] < 80  # chance is 50


def test_noise_correlation_is_per_sample_and_scale_free():
    a = torch.randn(3, 4, 5, 5)
    assert torch.allclose(noise_correlation(a, a * 7 + 2), torch.ones(3), atol=1e-4)
    assert torch.allclose(noise_correlation(a, -a), -torch.ones(3), atol=1e-4)


@pytest.mark.slow
def test_cli_probes_every_decoder_level_and_writes_json(tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / "data" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / "data" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    out = tmp_path / "probe.json"
    rows = probe_teacher.main(["--teacher", str(teacher), "--data-dir", str(tmp_path / "data"), "--timesteps",
                               "10,500", "--train-images", "30", "--test-images", "20", "--batch-size", "10",
                               "--threads", "1", "--out", str(out)])
    assert [(r["timestep"], r["stride"]) for r in rows] == [(t, s) for t in (10, 500) for s in (1, 2, 4, 8)]
    report = json.loads(out.read_text())
    assert report["rows"] == rows and report["machine"]["threads"] == 1
    assert all(0 <= r["linear"] <= 100 and -0.1 < r["noise_fraction"] < 1.5 for r in rows)
    # more noise at t=500 than at t=10, at every level
    by = {(r["timestep"], r["stride"]): r["noise_fraction"] for r in rows}
    assert all(by[(500, s)] > by[(10, s)] for s in (1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"--timesteps \[1000\] outside the teacher's range \[0, 999\]"):
        probe_teacher.main(["--teacher", str(teacher), "--data-dir", str(tmp_path / "data"), "--timesteps", "1000"])
