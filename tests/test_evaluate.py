"""Downstream protocols (training/evaluate.py) on tiny data: seconds, offline, CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from hub.export import export_for_hub
from tests.tiny import write_fashion_mnist, write_idx, write_image_folder
from training.evaluate import main
from training.protocols.classification import (
    balanced_subset,
    check_fraction,
    extract_features,
    finetune,
    knn_classify,
    linear_probe,
)
from training.protocols.evaluation import EvalConfig, dataset_labels, evaluate, parse_protocols
from training.run.backbones import load_backbone

REPO = Path(__file__).resolve().parents[1]
FAST = dict(ft_epochs=1, ft_batch_size=8, probe_weight_decays=(1e-3,), probe_max_iter=20, progress=False)


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(folder, n=40, seed=0, split="train")
    write_fashion_mnist(folder, n=20, seed=1, split="test")
    return folder


@pytest.fixture(scope="module")
def dark_or_bright(tmp_path_factory):
    """Fashion-MNIST-shaped IDX files whose two classes even a random network tells apart: dark or bright images."""
    folder = tmp_path_factory.mktemp("dark_or_bright")
    for prefix, n, seed in (("train", 40, 0), ("t10k", 20, 1)):
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 2
        images = np.clip(40 + 170 * labels[:, None, None] + rng.normal(0, 15, (n, 28, 28)), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder


def _blobs(n_per_class, num_classes, dim, seed, spread=0.3):
    """Well separated classes: each a tight cloud around its own random direction."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


# ---------------------------------------------------------------------------------------------------------------
# the whole run


def test_cli_script_runs_all_protocols_and_writes_the_results_json(dark_or_bright, tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "training" / "evaluate.py"), "--model", "resnet18", "--random-init",
           "--data-dir", str(dark_or_bright), "--ft-epochs", "1", "--ft-batch-size", "8", "--probe-iters", "50",
           "--threads", "1", "--no-progress", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"model", "results", "settings", "machine", "seconds"}
    assert report["model"] == "resnet18"
    assert list(report["results"]) == ["linear probe", "kNN k=20", "fine-tune 1%", "fine-tune 10%"]
    for row in report["results"].values():
        assert list(row) == ["top1"] and 0.0 <= row["top1"] <= 100.0
    # frozen random features separate dark from bright: the scores are of these images and labels, aligned
    assert report["results"]["linear probe"]["top1"] == 100.0 and report["results"]["kNN k=20"]["top1"] == 100.0
    assert set(report["machine"]) >= {"torch", "threads", "cpu"} and report["machine"]["threads"] == 1
    settings = report["settings"]
    assert settings["train_images"] == 40 and settings["test_images"] == 20 and settings["weights"] == "random init"
    assert settings["recipe"] == "resnet18.dreamteacher_fmnist" and settings["input_size"] == [3, 32, 32]
    assert settings["fine_tune"]["fractions"] == [0.01, 0.1] and settings["fine_tune"]["epochs"] == [1, 1]
    assert report["seconds"]["total"] > 0 and "features" in report["seconds"]
    assert "| protocol | metric | value |" in proc.stdout
    assert "| kNN k=20 | top1 |" in proc.stdout
    # the results block is what hub.export renders
    from hub.model_card import _results_table

    assert "| fine-tune 10% |" in _results_table(report["results"])


def test_evaluate_is_deterministic_and_subsamples(tiny_fmnist):
    config = EvalConfig(data_dir=str(tiny_fmnist), max_train=30, max_test=10, seed=3, fractions=(0.5,), **FAST)
    first = evaluate("resnet18", config, random_init=True)
    second = evaluate("resnet18", config, random_init=True)
    assert first["results"] == second["results"]
    assert first["details"]["fine-tune"] == second["details"]["fine-tune"]
    assert first["settings"]["train_images"] == 30 and first["settings"]["test_images"] == 10


def test_protocol_subset_and_k(tiny_fmnist):
    report = evaluate("resnet18", EvalConfig(protocols="knn", k=5, data_dir=str(tiny_fmnist), **FAST), random_init=True)
    assert list(report["results"]) == ["kNN k=5"]
    assert "linear probe" not in report["seconds"] and "fine-tune 1%" not in report["seconds"]


# ---------------------------------------------------------------------------------------------------------------
# kNN and linear probe on hand-made features


def test_knn_on_separable_features_is_perfect():
    train_x, train_y = _blobs(30, 5, 16, seed=0)
    test_x, test_y = _blobs(10, 5, 16, seed=1)
    out = knn_classify(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    assert out["top1"] == 100.0
    assert torch.equal(out["predictions"], test_y)
    # scaling a feature vector changes nothing: the similarity is cosine
    assert knn_classify(train_x * 7, train_y, test_x * 0.1, test_y)["top1"] == 100.0


def test_knn_votes_are_weighted_by_similarity():
    # one very close neighbour of class 0 against two mediocre ones of class 1 (k=3)
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([0, 1, 1])
    test_x = torch.tensor([[1.0, 0.05]])
    assert knn_classify(train_x, train_y, test_x, k=3, temperature=0.07)["predictions"].tolist() == [0]
    # with a huge temperature the weights are ~equal and the majority wins
    assert knn_classify(train_x, train_y, test_x, k=3, temperature=1e4)["predictions"].tolist() == [1]
    # k is capped by the number of train features; a chunk smaller than the test set gives the same answer
    test_many = torch.randn(9, 2, generator=torch.Generator().manual_seed(0))
    a = knn_classify(train_x, train_y, test_many, k=50)["predictions"]
    b = knn_classify(train_x, train_y, test_many, k=50, chunk_size=2)["predictions"]
    assert torch.equal(a, b)


def test_linear_probe_on_separable_features_is_perfect():
    # classes differ only by a shift along one direction, buried under large nuisance dimensions that fool kNN
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(3).repeat(n)
        x = torch.randn(len(y), 20, generator=g) * 5
        x[:, 0] = y.float() * 4 + 0.3 * torch.randn(len(y), generator=g)
        return x, y

    train_x, train_y = make(60)
    test_x, test_y = make(30)
    out = linear_probe(train_x, train_y, test_x, test_y, seed=0)
    assert out["top1"] == 100.0
    assert out["weight_decay"] in (1e-5, 1e-4, 1e-3, 1e-2) and len(out["val_top1"]) == 4
    assert knn_classify(train_x, train_y, test_x, test_y)["top1"] < 90  # the nuisance dims really matter
    # deterministic
    again = linear_probe(train_x, train_y, test_x, test_y, seed=0)
    assert again["top1"] == out["top1"] and torch.equal(again["predictions"], out["predictions"])


def _brightness_loaders(n_train=32, n_test=16):
    """Two classes told apart only by the images' mean brightness (dark / bright), in the evaluation's batch dicts."""
    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(2).repeat(n // 2)
        images = (labels.float() - 0.5).view(-1, 1, 1, 1) + 0.2 * torch.randn(n, 3, 8, 8, generator=g)
        return [{"pixel_values": x, "labels": y} for x, y in zip(images, labels, strict=True)]

    return (torch.utils.data.DataLoader(split(n_train, 0), batch_size=8, shuffle=True),
            torch.utils.data.DataLoader(split(n_test, 1), batch_size=8))


@pytest.mark.parametrize("lr, expected_top1", [(0.05, 100.0), (0.0, 50.0)])
def test_finetune_trains_the_backbone_not_only_the_head(lr, expected_top1):
    # a zero conv's features carry nothing: only a fine-tuned backbone (with a working optimizer and schedule) can
    # tell the classes apart; with lr 0 it predicts one class for every image
    backbone = torch.nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.init.zeros_(backbone.weight)
    torch.nn.init.zeros_(backbone.bias)
    train, test = _brightness_loaders()
    out = finetune(backbone, train, test, num_classes=2, epochs=10, lr=lr, weight_decay=0.0, input_size=(3, 8, 8),
                   progress=False)
    assert out["top1"] == expected_top1 and out["steps"] == 40 and out["train_images"] == 320
    assert not backbone.weight.any()  # the caller's model is left untouched


def test_extract_features_are_pooled_eval_mode_and_aligned(tiny_fmnist):
    from dreamteacher_models import get_recipe
    from training.run.data import ImageDataset, build_dataloader, build_transform, load_idx_dataset

    ds = ImageDataset(load_idx_dataset(tiny_fmnist, "test"),
                      build_transform(get_recipe("resnet18.dreamteacher_fmnist").data, train=False))
    model = timm.create_model("resnet18", num_classes=0).train()
    feats, labels = extract_features(model, build_dataloader(ds, 8, shuffle=False, drop_last=False), progress=False)
    assert feats.shape == (20, 512) and labels.tolist() == [ds[i]["label"] for i in range(20)]
    assert model.training  # mode restored
    with torch.no_grad():
        expected = model.eval()(torch.stack([ds[i]["pixel_values"] for i in range(3)]))
    torch.testing.assert_close(feats[:3], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# fine-tune subset


def test_balanced_subset_size_per_class_and_determinism():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 100))
    subset = balanced_subset(labels, 0.1, seed=0)
    assert len(subset) == 100 and len(np.unique(subset)) == 100 and np.all(np.diff(subset) > 0)
    assert np.bincount(labels[subset], minlength=10).tolist() == [10] * 10
    assert np.array_equal(subset, balanced_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subset, balanced_subset(labels, 0.1, seed=1))
    one_pct = balanced_subset(labels, 0.01, seed=0)
    assert np.bincount(labels[one_pct], minlength=10).tolist() == [1] * 10
    assert len(balanced_subset(labels, 1.0, seed=0)) == 1000
    # a class smaller than its share gives what it has
    labels = np.array([0] * 50 + [1] * 2)
    assert np.bincount(labels[balanced_subset(labels, 0.5, seed=0)]).tolist() == [13, 2]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_fraction(bad)


def test_cli_refuses_bad_fraction_and_bad_protocol(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "resnet18", "--random-init", "--ft-fractions", "0.01,2"])
    assert "(0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "resnet18", "--random-init", "--protocols", "linear,svm"])
    err = capsys.readouterr().err
    assert "svm" in err and "allowed: linear, knn, finetune" in err


def test_bad_protocol_error_lists_the_allowed_ones(tiny_fmnist):
    with pytest.raises(ValueError, match="allowed: linear, knn, finetune"):
        evaluate("resnet18", EvalConfig(protocols="linear,segmentation", data_dir=str(tiny_fmnist)), random_init=True)
    assert parse_protocols("finetune, KNN") == ["knn", "finetune"]


# ---------------------------------------------------------------------------------------------------------------
# datasets without labels


def test_test_split_without_labels_is_refused(tmp_path):
    write_fashion_mnist(tmp_path, n=12, split="train")
    write_fashion_mnist(tmp_path, n=6, split="test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="test split has no labels"):
        evaluate("resnet18", EvalConfig(data_dir=str(tmp_path), **FAST), random_init=True)


def test_dataset_labels_needs_a_label_column():
    import datasets

    with pytest.raises(ValueError, match="has no labels"):
        dataset_labels(datasets.Dataset.from_dict({"text": ["a", "b"]}), "my data")


def test_image_folder_labeled_only_by_split_names_is_refused(tmp_path):
    write_image_folder(tmp_path / "train", n=4, size=32)
    write_image_folder(tmp_path / "test", n=2, size=32, seed=1)
    with pytest.raises(ValueError, match="single label|no labels"):
        evaluate("resnet18", EvalConfig(data_dir=str(tmp_path), **FAST), random_init=True)


# ---------------------------------------------------------------------------------------------------------------
# weights from an export folder and from a training run


def _reference_backbone():
    torch.manual_seed(7)
    model = timm.create_model("resnet18", num_classes=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
    return model.eval()


def test_local_dir_export_loads_and_evaluates(tiny_fmnist, tmp_path):
    reference = _reference_backbone()
    export = export_for_hub(reference.state_dict(), tmp_path / "export", recipe="resnet18.dreamteacher_fmnist")
    spec = f"local-dir:{export}"
    loaded = load_backbone(spec)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))  # the exported weights, not a random init
    report = evaluate(spec, EvalConfig(protocols="linear,knn", data_dir=str(tiny_fmnist), **FAST))
    assert report["model"] == spec and report["settings"]["weights"] == "pretrained"
    assert report["settings"]["recipe_source"].startswith("recipe.json")
    assert set(report["results"]) == {"linear probe", "kNN k=20"}


def test_training_run_checkpoint_loads_student_weights(tiny_fmnist, tmp_path):
    from dreamteacher_models import get_recipe

    reference = _reference_backbone()
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    state = {f"student.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    state["regressor.lateral.0.weight"] = torch.zeros(4, 4)  # dropped
    safetensors.torch.save_file(state, step / "model.safetensors")
    (run / "recipe.json").write_text(json.dumps(get_recipe("resnet18.dreamteacher_fmnist").to_dict()))
    report = evaluate(None, EvalConfig(protocols="knn", data_dir=str(tiny_fmnist), **FAST), checkpoint=str(run))
    assert report["settings"]["weights"] == f"checkpoint {run}"
    assert report["settings"]["recipe_source"] == f"recipe.json of {run}"
    from training.run.backbones import recipe_for_model

    model = load_backbone(None, checkpoint=run, recipe=recipe_for_model(None, None, run)[0])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_a_tampered_export_is_refused_before_it_is_loaded(tmp_path):
    import timm


    student = timm.create_model("resnet18", num_classes=0)
    folder = export_for_hub(student.state_dict(), tmp_path / "export", recipe="resnet18.dreamteacher_fmnist")
    assert load_backbone(f"local-dir:{folder}") is not None
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its SHA256SUMS"):
        load_backbone(f"local-dir:{folder}")
