"""benchmarks/experiments/transfer_digits.py: the digits written once as a fixed image folder, every backbone
source, per-level features, and a validation run that never reads the digits' test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.experiments import transfer_digits as transfer
from dreamteacher_models.recipes import get_recipe


def fake_digits(n_per_class: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Stand-ins for scikit-learn's 8x8 digits: class c lights up row c % 8, so the classes are separable."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), n_per_class)
    images = rng.integers(0, 40, size=(len(labels), 8, 8)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, label % 8, :] = 255 if label < 8 else 128
    return images, labels


def test_the_folder_holds_a_fixed_class_balanced_third_as_test_and_is_written_once(tmp_path):
    images, labels = fake_digits()
    root = transfer.write_image_folder(images, labels, tmp_path / "digits")
    facts = json.loads((root / transfer.DONE_MARKER).read_text())
    assert facts == {"images": 90, "train": 60, "test": 30, "size": 32}
    assert all(len(list((root / "test" / str(c)).glob("*.png"))) == 3 for c in range(10))
    test_files = sorted(p.name for p in (root / "test").rglob("*.png"))
    from PIL import Image

    assert Image.open(next((root / "train").rglob("*.png"))).size == (32, 32)
    # a complete folder is kept as it is; a second writer with other images would not change it
    transfer.write_image_folder(images[::-1].copy(), labels, root)
    assert sorted(p.name for p in (root / "test").rglob("*.png")) == test_files
    assert not (tmp_path / "digits.partial").exists()


def test_pooled_levels_give_each_pyramid_level_or_all_of_them():
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    backbone = transfer.load_source("random", recipe)
    x = torch.randn(2, 3, 32, 32)
    c2 = transfer.PooledLevels(backbone, recipe.arch, (4,))
    every = transfer.PooledLevels(backbone, recipe.arch, (4, 8, 16, 32))
    assert c2(x).shape == (2, 64) and c2.num_features == 64
    assert every(x).shape == (2, 64 + 128 + 256 + 512)
    torch.testing.assert_close(every(x)[:, :64], c2(x))


def test_fractions_outside_the_stated_epochs_are_refused(capsys):
    with pytest.raises(SystemExit):
        transfer.parse_args(["--tag", "t", "--backbone", "r=random", "--fractions", "0.5"])
    assert "--fractions: choose from 0.1,1.0" in capsys.readouterr().err


def test_a_source_that_is_none_of_the_allowed_kinds_is_refused(tmp_path):
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    with pytest.raises(ValueError, match="'nowhere/model.pt' is none of: random, pixels, teacher"):
        transfer.load_source("nowhere/model.pt", recipe)
    saved = tmp_path / "backbone.safetensors"
    import safetensors.torch

    trained = transfer.load_source("random", recipe)
    torch.nn.init.constant_(trained.conv1.weight, 0.5)
    safetensors.torch.save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(saved))
    loaded = transfer.load_source(str(saved), recipe)
    torch.testing.assert_close(loaded.conv1.weight, trained.conv1.weight)


@pytest.mark.slow
def test_a_validation_run_scores_every_backbone_and_level_without_reading_test(tmp_path, monkeypatch):
    import training.protocols.evaluation as evaluation

    monkeypatch.setattr(transfer, "load_sklearn_digits", fake_digits)
    read_splits = []
    real_load_split = evaluation.load_split
    monkeypatch.setattr(evaluation, "load_split",
                        lambda data_dir, split, recipe: read_splits.append(split) or real_load_split(data_dir, split,
                                                                                                       recipe))
    report = transfer.main(["--tag", "v", "--backbone", "random=random", "--backbone", "pixels=pixels", "--levels",
                            "--no-finetune", "--data-root", str(tmp_path / "digits"), "--out-dir", str(tmp_path),
                            "--threads", "1", "--no-progress"])
    assert set(read_splits) == {"train"}
    assert report["fit_images"] == 50 and report["scored_images"] == 10  # a sixth of the 60 train digits
    assert report["input_px"] == 32
    assert list(report["backbones"]["random"]["levels"]) == ["C2", "C3", "C4", "C5", "C2+C3+C4+C5"]
    assert report["backbones"]["pixels"]["levels"] is None
    assert report["backbones"]["pixels"]["results"]["kNN k=20"]["top1"] >= 90  # the fake classes are separable
    table = (tmp_path / "v.md").read_text()
    assert "| random |" in table and "C2+C3+C4+C5" in table


@pytest.mark.slow
def test_pooled_strides_feed_the_frozen_protocols_and_fine_tuning_keeps_the_whole_backbone(tmp_path, monkeypatch):
    import training.protocols.evaluation as evaluation

    monkeypatch.setattr(transfer, "load_sklearn_digits", fake_digits)
    seen = []
    real_evaluate = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda module, config, **kw: seen.append(
        (type(module).__name__, config.protocols)) or real_evaluate(module, config, **kw))
    report = transfer.main(["--tag", "p", "--backbone", "random=random", "--pool-strides", "8,16",
                            "--fractions", "0.1", "--seed", "3", "--data-root", str(tmp_path / "digits"),
                            "--out-dir", str(tmp_path), "--threads", "1", "--no-progress"])
    assert seen == [("PooledLevels", "linear,knn"), ("ResNet", "finetune")]
    assert list(report["backbones"]["random"]["results"]) == ["linear probe", "kNN k=20", "fine-tune 10%"]
    assert report["settings"]["seed"] == 3
    assert report["settings"]["pool_strides"] == [8, 16]
    assert "frozen features: C3+C4 pooled" in (tmp_path / "p.md").read_text()


def test_the_level_choice_is_the_best_mean_over_backbones():
    def scores(linear, knn):
        return {"linear probe": {"top1": linear}, "kNN k=20": {"top1": knn}}

    levels = {"a": {"C3": scores(90, 80), "C5": scores(95, 60)}, "b": {"C3": scores(92, 88), "C5": scores(96, 90)}}
    assert transfer.level_means(levels) == {"C3": 87.5, "C5": 85.25}


def run_report(seed: int, scores: dict[str, float], fractions=(0.1,)) -> dict:
    settings = {"split": "test", "levels": False, "finetune": True, "seed": seed, "fractions": list(fractions),
                "pool_strides": None, "recipe": "r", "overrides": [], "data": {}}
    return {"split": "test", "settings": settings, "sources": {n: n for n in scores}, "machine": "m",
            "backbones": {n: {"results": {"fine-tune 10%": {"top1": v}}} for n, v in scores.items()}}


def test_combined_seeds_give_mean_and_range_and_refuse_other_settings(tmp_path):
    for seed, scores in ((0, {"dt": 90.0, "simclr": 87.0}), (1, {"dt": 86.0, "simclr": 84.0})):
        (tmp_path / f"s{seed}.json").write_text(json.dumps(run_report(seed, scores)))
    report = transfer.main(["--tag", "both", "--combine", "s0,s1", "--out-dir", str(tmp_path)])
    assert report["rows"]["dt"]["fine-tune 10%"] == [90.0, 86.0]
    assert "| dt | 88.00 (86.00-90.00) |" in (tmp_path / "both.md").read_text()
    other = run_report(2, {"dt": 80.0})
    other["settings"]["pool_strides"] = [8]
    (tmp_path / "s2.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differ in more than the evaluation seed"):
        transfer.main(["--tag", "bad", "--combine", "s0,s2", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="repeat one"):
        transfer.main(["--tag", "bad", "--combine", "s0,s0", "--out-dir", str(tmp_path)])
