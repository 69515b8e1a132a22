"""training/train_interpreter.py on tiny data: both tasks train, validate, export, checkpoint and resume."""

from __future__ import annotations

import json

import pytest
import safetensors.torch

from tests.tiny import make_tiny_teacher, write_fashion_mnist
from training import train_interpreter
from training.labels.interpreter import DenseInterpreter, PooledInterpreter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    data = write_fashion_mnist(root / "data", n=40)
    write_fashion_mnist(data, n=16, seed=1, split="test")
    return make_tiny_teacher(root / "teacher"), data


def _run(out, setup, *extra):
    teacher, data = setup
    return train_interpreter.main(["--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(out),
                                   "--epochs", "2", "--batch-size", "4", "--threads", "1", "--width", "32", *extra])


@pytest.mark.parametrize("task, kind", [("classes", PooledInterpreter), ("fmnist-masks", DenseInterpreter)])
def test_both_tasks_train_validate_and_export(tmp_path, setup, task, kind):
    from training.protocols.classification import balanced_subset
    from training.protocols.evaluation import dataset_labels
    from training.run.data import load_idx_dataset

    labeled = len(balanced_subset(dataset_labels(load_idx_dataset(setup[1])), 0.5)) if task == "classes" else 8
    extra = ["--labels-fraction", "0.5"] if task == "classes" else ["--labels", "8"]
    out = _run(tmp_path / "run", setup, "--task", task, *extra, "--report-memory")
    info = json.loads((out / "interpreter.json").read_text())
    assert info["task"] == task and info["labeled_images"] == labeled and info["validation"]["images"] == 16
    assert info["taps"] == {"4": 16, "8": 16} and info["timestep"] == 50 and info["peak_rss_mb"] > 0
    weights = safetensors.torch.load_file(out / "interpreter.safetensors")
    model = kind({4: 16, 8: 16}, info["num_classes"], **({"width": 32} if kind is DenseInterpreter else {}))
    model.load_state_dict(weights)  # the exported weights are the interpreter's, whole
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{2 * (labeled // 4)}"]


def test_resume_continues_and_a_fresh_run_over_it_is_refused(tmp_path, setup):
    first = _run(tmp_path / "run", setup, "--labels-fraction", "0.5")
    assert json.loads((first / "interpreter.json").read_text())["peak_lr"] == train_interpreter.DEFAULT_LR
    with pytest.raises(ValueError, match=r"epochs: 2 in the checkpoint, 3 now.*--allow-resume-mismatch"):
        _run(tmp_path / "run", setup, "--labels-fraction", "0.5", "--epochs", "3", "--resume", "latest")
    longer = _run(tmp_path / "run", setup, "--labels-fraction", "0.5", "--epochs", "3", "--resume", "latest",
                  "--allow-resume-mismatch", "--lr", "1e-3")
    info = json.loads((longer / "interpreter.json").read_text())
    assert info["epochs"] == 3 and info["peak_lr"] == 1e-3  # a --lr given on resume is the schedule's new peak
    assert len(list((first / "checkpoints").iterdir())) == 1  # keep=1: the newest epoch's
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        _run(tmp_path / "run", setup, "--labels-fraction", "0.5")


def test_masks_come_from_the_image_and_flip_with_it(setup):
    import torch

    from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe
    from training.run.data import build_transform, load_idx_dataset

    recipe = get_recipe(DEFAULT_RECIPE)
    hf = load_idx_dataset(setup[1])
    plain = train_interpreter.LabeledImages(hf, range(8), build_transform(recipe.data, train=False), "fmnist-masks",
                                            0.5)
    flipping = train_interpreter.JointFlip(plain, seed=0)
    flipped = 0
    for i in range(8):
        pixels, mask = plain[i]
        assert mask.shape == pixels.shape[-2:] and set(mask.unique().tolist()) <= {0, 1}
        gray = (pixels.mean(0) * recipe.data.std[0] + recipe.data.mean[0])  # back to [0, 1]
        assert ((gray > 0.5) == mask.bool()).float().mean() > 0.9  # the same image, resized the same way
        seen, seen_mask = flipping[i]
        if not torch.equal(seen, pixels):
            flipped += 1
            assert torch.equal(seen, pixels.flip(-1)) and torch.equal(seen_mask, mask.flip(-1))
    assert 0 < flipped < 8


def _benchmark_replica(root, n_train=6, n_test=2, classes=5, size=40):
    """A tiny DDPM-seg-style folder: real/train and real/test, PNG images with .npy class masks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        folder = root / "real" / split
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
            np.save(folder / f"{i:03d}.npy", rng.integers(0, classes, (size, size)).astype(np.uint8))
    return root


def test_the_benchmark_loader_reads_the_layout_and_names_bad_masks(tmp_path):
    import numpy as np

    from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe
    from training.labels.dense_masks import MaskedImages, num_classes_of, split_folder
    from training.run.data import build_transform

    root = _benchmark_replica(tmp_path / "cat_15", classes=15)
    assert num_classes_of(root, None) == 15 and num_classes_of(tmp_path, 7) == 7
    with pytest.raises(ValueError, match="pass --num-classes"):
        num_classes_of(tmp_path, None)
    transform = build_transform(get_recipe(DEFAULT_RECIPE).data, train=False)
    train = MaskedImages(split_folder(root, "train"), 15, transform, (32, 32), limit=4)
    pixels, mask = train[0]
    assert len(train) == 4 and pixels.shape == (3, 32, 32) and mask.shape == (32, 32) and int(mask.max()) < 15
    _, full = train.read(0)
    assert np.array_equal(full, np.load(root / "real" / "train" / "000.npy"))

    folder = root / "real" / "train"
    np.save(folder / "001.npy", np.zeros((20, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"001\.npy has shape \(20, 40\); its image is 40x40"):
        train[1]
    np.save(folder / "002.npy", np.full((40, 40), 17, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"002\.npy holds class ids \[17\] outside \[0, 15\)"):
        train[2]
    (folder / "003.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask .* for 003\.png"):
        MaskedImages(folder, 15, transform, (32, 32))


def test_masks_task_trains_on_a_benchmark_folder(tmp_path, setup):
    root = _benchmark_replica(tmp_path / "horse_21", classes=21)
    out = train_interpreter.main(["--teacher", str(setup[0]), "--data-dir", str(root), "--task", "masks",
                                  "--labels", "4", "--output-dir", str(tmp_path / "run"), "--epochs", "1",
                                  "--batch-size", "2", "--threads", "1", "--width", "32"])
    info = json.loads((out / "interpreter.json").read_text())
    assert info["num_classes"] == 21 and info["labeled_images"] == 4 and info["validation"]["metric"] == "mIoU"
    assert info["validation"]["images"] == 2
