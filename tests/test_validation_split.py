"""Choosing on validation: a fixed, class-balanced carve of train that scores a choice without reading test."""

import numpy as np
import pytest

from tests.tiny import write_idx
from training.protocols.evaluation import EvalConfig, evaluate
from training.protocols.splits import carve_validation_split, check_split

FAST = dict(ft_epochs=1, ft_batch_size=8, probe_weight_decays=(1e-3,), probe_max_iter=20, progress=False)


def test_the_carve_is_class_balanced_disjoint_and_fixed():
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(10), 60))
    fit, val = carve_validation_split(labels)
    assert len(val) == 100 and np.bincount(labels[val]).tolist() == [10] * 10
    assert not set(fit) & set(val) and sorted(set(fit) | set(val)) == list(range(600))
    assert np.all(np.diff(val) > 0) and np.all(np.diff(fit) > 0)
    again_fit, again_val = carve_validation_split(labels.copy())
    assert np.array_equal(val, again_val) and np.array_equal(fit, again_fit)
    _, other = carve_validation_split(labels, seed=1)
    assert not np.array_equal(val, other)


def test_a_class_too_small_to_hold_out_and_an_unknown_split_are_refused():
    with pytest.raises(ValueError, match="class 1 has 2 image"):
        carve_validation_split(np.array([0] * 12 + [1, 1]), fraction=0.9)
    with pytest.raises(ValueError, match="unknown evaluation split 'val'; allowed: test, validation"):
        check_split("val")


def dark_or_bright_train_only(folder, n=48):
    """Train IDX files only (no t10k): two classes a random network separates, dark or bright images."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = np.clip(40 + 170 * labels[:, None, None] + rng.normal(0, 15, (n, 28, 28)), 0, 255)
    write_idx(folder / "train-images-idx3-ubyte.gz", images.astype(np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder


def test_validation_scoring_never_reads_the_test_split(tmp_path):
    folder = dark_or_bright_train_only(tmp_path)
    config = EvalConfig(data_dir=str(folder), protocols="linear,knn", split="validation", **FAST)
    report = evaluate("resnet18", config, random_init=True)
    assert report["settings"]["split"] == "validation"
    assert report["settings"]["train_images"] == 40 and report["settings"]["test_images"] == 8  # 4 of each class
    # the validation images are scored against their own labels: dark vs bright is perfect
    assert report["results"]["linear probe"]["top1"] == 100.0 and report["results"]["kNN k=20"]["top1"] == 100.0
    with pytest.raises(FileNotFoundError, match="'test' split"):
        evaluate("resnet18", EvalConfig(data_dir=str(folder), protocols="knn", **FAST), random_init=True)


def test_the_teacher_probe_chooses_on_validation_by_default():
    from training.probe_teacher import parse_args

    assert parse_args([]).split == "validation"
    assert parse_args(["--split", "test"]).split == "test"
