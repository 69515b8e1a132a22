"""The opt-in teacher-feature cache: bit-equal read-back, refusal when stale, atomic writes, flips, loss parity."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import training.pretrain as pretrain
from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe
from tests.tiny import FakeAccelerator, make_tiny_teacher, write_fashion_mnist
from training.distill.distiller import build_distiller, distillation_loss
from training.distill.feature_cache import (
    FeatureCache,
    StaleFeatureCacheError,
    build_feature_cache,
    cache_key,
    encoding_generator,
    open_or_build_feature_cache,
)
from training.run.data import ImageDataset, build_transform, load_idx_dataset
from training.teacher.build import build_teacher

REPO = Path(__file__).resolve().parent.parent
STRIDES = {4, 8}  # the Fashion-MNIST recipe's paired teacher taps


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n=20)


def _teacher(teacher_dir, *overrides):
    recipe = apply_overrides(get_recipe(DEFAULT_RECIPE), list(overrides))
    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, source=str(teacher_dir))
    return teacher.keep_strides(STRIDES)


def _dataset(idx_dir):
    recipe = get_recipe(DEFAULT_RECIPE)
    return ImageDataset(load_idx_dataset(idx_dir), build_transform(recipe.data, train=True, hflip=False),
                        return_index=True)


def _key(teacher, dataset, encodings=2, flips=True, seed=0):
    return cache_key(teacher, dataset, data_source="tiny", encodings=encodings, flips=flips, seed=seed)


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_dir, idx_dir):
    teacher, dataset = _teacher(teacher_dir), _dataset(idx_dir)
    folder = tmp_path_factory.mktemp("caches") / "cache"
    cache = build_feature_cache(folder, teacher, dataset, _key(teacher, dataset), batch_size=8, progress=False)
    return cache, teacher, dataset


def test_written_once_read_back_bit_equal(built):
    cache, teacher, dataset = built
    images = torch.stack([dataset[i]["pixel_values"] for i in range(8, 16)])  # the build's second batch of 8
    for k in range(2):
        for mirrored in (False, True):
            expected = teacher(images.flip(-1) if mirrored else images,
                               generator=encoding_generator(0, k, int(mirrored), 8, teacher.device))
            got = cache.lookup(torch.arange(8, 16), torch.full((8,), k), torch.full((8,), mirrored), "cpu")
            assert set(got) == STRIDES
            for stride in STRIDES:
                assert torch.equal(got[stride], expected[stride].half().float()), (k, mirrored, stride)
    enc0 = cache.lookup(torch.arange(8), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.bool), "cpu")
    enc1 = cache.lookup(torch.arange(8), torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.bool), "cpu")
    assert not torch.equal(enc0[4], enc1[4])  # two independent noise draws

    stamp = {p.name: p.stat().st_mtime_ns for p in cache.folder.iterdir()}
    again = open_or_build_feature_cache(cache.folder, teacher, dataset, cache.key, build=True)
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.iterdir()} == stamp  # opened, not rewritten


def test_a_stale_cache_is_refused_naming_what_differs(built, teacher_dir, idx_dir, tmp_path):
    cache, teacher, dataset = built
    other_teacher = _teacher(make_tiny_teacher(tmp_path / "other", seed=1))
    cases = {
        "teacher_sha256": _key(other_teacher, dataset),
        "timestep": _key(_teacher(teacher_dir, "teacher.timestep=100"), dataset),
        "taps": _key(_teacher(teacher_dir).keep_strides({8}), dataset),
        "data_sha256": _key(teacher, _dataset(write_fashion_mnist(tmp_path / "data", n=20, seed=5))),
        "encodings": _key(teacher, dataset, encodings=3),
        "orientations": _key(teacher, dataset, flips=False),
    }
    for field, key in cases.items():
        with pytest.raises(StaleFeatureCacheError, match=field):
            FeatureCache(cache.folder, key)
    assert FeatureCache(cache.folder, {**cache.key, "data": "elsewhere"}).encodings == 2  # a path is not a change


def test_a_killed_writer_leaves_no_cache_that_passes_as_complete(teacher_dir, idx_dir, tmp_path):
    folder = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_feature_cache import _dataset, _key, _teacher
        from training.distill.feature_cache import build_feature_cache
        teacher, dataset = _teacher({str(teacher_dir)!r}), _dataset({str(idx_dir)!r})
        calls, forward = [0], teacher.forward
        def dying_forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:  # SIGKILL in the middle of the build, half the arrays written
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(*args, **kwargs)
        teacher.forward = dying_forward
        build_feature_cache({str(folder)!r}, teacher, dataset, _key(teacher, dataset), batch_size=8, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not folder.exists()
    partial = list(tmp_path.glob(".cache.partial-*"))
    assert len(partial) == 1 and (partial[0] / "stride_4.npy").is_file() and not (partial[0] / "cache.json").exists()
    teacher, dataset = _teacher(teacher_dir), _dataset(idx_dir)
    with pytest.raises(FileNotFoundError, match="not a teacher-feature cache"):
        FeatureCache(folder, _key(teacher, dataset))
    cache = open_or_build_feature_cache(folder, teacher, dataset, _key(teacher, dataset), build=True, progress=False)
    assert cache.maps[4].shape[:2] == (20, 2) and not list(tmp_path.glob(".cache.partial-*"))


def test_flipped_images_get_the_teachers_features_of_the_flipped_image(built):
    cache, teacher, dataset = built
    indices = torch.arange(6)
    build_batch = torch.stack([dataset[i]["pixel_values"] for i in range(8)])  # the build's first batch
    images = build_batch[:6]
    noise = torch.Generator().manual_seed(0)
    seen, maps = pretrain.teacher_targets(teacher, cache, {"indices": indices}, images, True, noise)
    flipped = [b for b in range(6) if not torch.equal(seen[b], images[b])]
    assert 0 < len(flipped) < 6  # a random half, drawn from the step's generator
    for b in range(6):
        is_flipped = b in flipped
        assert torch.equal(seen[b], images[b].flip(-1) if is_flipped else images[b])
        for stride, fmap in maps.items():  # the teacher's encoding of what the student sees, not a flipped map
            view = build_batch.flip(-1) if is_flipped else build_batch
            expected = [teacher(view, generator=encoding_generator(0, k, int(is_flipped), 0, "cpu"))[stride][b]
                        for k in range(2)]
            assert any(torch.equal(fmap[b], e.half().float()) for e in expected), (b, stride)
    seen, _ = pretrain.teacher_targets(teacher, cache, {"indices": indices}, images, False, noise)
    assert torch.equal(seen, images)  # a recipe without flips


def test_cached_loss_is_within_the_encoding_noise_of_the_online_loss(built):
    cache, teacher, dataset = built
    recipe = apply_overrides(get_recipe(DEFAULT_RECIPE), ["regressor_width=16"])
    torch.manual_seed(0)
    model, _ = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    model.eval()
    indices = torch.arange(8)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(8)])
    with torch.no_grad():
        predictions = model(images)
        online = [distillation_loss(predictions, teacher(images, generator=torch.Generator().manual_seed(s)),
                                    model.pairs, recipe.loss)["loss"].item() for s in range(8)]
        cached = [distillation_loss(predictions, cache.lookup(indices, torch.full((8,), k),
                                                              torch.zeros(8, dtype=torch.bool), "cpu"),
                                    model.pairs, recipe.loss)["loss"].item() for k in range(2)]
    spread = max(online) - min(online)
    assert spread > 0
    for loss in cached:
        assert min(online) - spread <= loss <= max(online) + spread, (loss, online)


def test_pretrain_with_a_feature_cache_builds_it_once_and_refuses_a_stale_one(tmp_path, teacher_dir, idx_dir, caplog):
    cache_dir = tmp_path / "cache"
    common = ["--teacher", str(teacher_dir), "--data-dir", str(idx_dir), "--batch-size", "8",
              "--per-device-batch-size", "4", "--num-workers", "0", "--threads", "1", "--set", "regressor_width=16",
              "--feature-images", "0", "--log-every", "1", "--max-steps", "2", "--no-export",
              "--feature-cache", str(cache_dir), "--cache-encodings", "1"]
    pretrain.main([*common, "--output-dir", str(tmp_path / "a")])
    assert (cache_dir / "cache.json").is_file() and (tmp_path / "a" / "metrics.jsonl").is_file()
    stamp = (cache_dir / "stride_4.npy").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        pretrain.main([*common, "--output-dir", str(tmp_path / "b")])
    assert (cache_dir / "stride_4.npy").stat().st_mtime_ns == stamp
    assert "teacher features from the cache" in caplog.text
    with pytest.raises(StaleFeatureCacheError, match="timestep"):
        pretrain.main([*common, "--output-dir", str(tmp_path / "c"), "--set", "teacher.timestep=100"])
    with pytest.raises(ValueError, match=r"^--feature-cache needs indexed data; it cannot be used with --streaming$"):
        pretrain.main([*common, "--output-dir", str(tmp_path / "d"), "--streaming"])


def test_the_main_process_builds_the_run_cache_with_a_progress_bar_and_the_others_open_it(
        tmp_path, teacher_dir, idx_dir, capsys, monkeypatch):
    teacher, dataset, waits = _teacher(teacher_dir), _dataset(idx_dir), []

    def open_cache(main: bool, *data):
        args = pretrain.parse_args(["--teacher", str(teacher_dir), *data, "--feature-cache", str(tmp_path / "cache"),
                                    "--cache-encodings", "1"])
        accelerator = FakeAccelerator(main, waits)
        return pretrain.open_feature_cache(args, pretrain.recipe_from_args(args), teacher, dataset, accelerator)

    with pytest.raises(FileNotFoundError, match="is not a teacher-feature cache"):  # the main process has not built it
        open_cache(False, "--data-dir", str(idx_dir))
    capsys.readouterr()
    built = open_cache(True, "--data-dir", str(idx_dir))
    assert "teacher-feature cache" in capsys.readouterr().err  # the main process shows its progress
    assert built.key["data"] == str(idx_dir) and built.key["encodings"] == 1
    opened = open_cache(False, "--data-dir", str(idx_dir))
    assert isinstance(opened, FeatureCache) and opened.key == built.key
    assert waits == [False, True, False]  # every process waits for the main one's build
    recorded = []  # the data source the key records (informational: the same images may sit elsewhere)
    monkeypatch.setattr(pretrain, "open_or_build_feature_cache", lambda *a, **k: recorded.append(a[3]["data"]))
    for data in (["--dataset", "someone/images"], []):
        assert open_cache(True, *data).key == built.key
    assert recorded == ["someone/images", "fashion-mnist"]  # else the recipe's dataset


def test_cached_targets_draw_their_flips_and_encodings_from_the_steps_generator(built):
    cache, teacher, dataset = built
    indices = torch.arange(12)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(12)])

    def draw(seed: int, global_seed: int):
        torch.manual_seed(global_seed)  # torch's global RNG must not matter
        return pretrain.teacher_targets(teacher, cache, {"indices": indices}, images, True,
                                        torch.Generator().manual_seed(seed))

    (seen_a, maps_a), (seen_b, maps_b), (seen_c, maps_c) = draw(0, 1), draw(0, 2), draw(1, 1)
    assert torch.equal(seen_a, seen_b) and all(torch.equal(maps_a[s], maps_b[s]) for s in maps_a)
    assert not torch.equal(seen_a, seen_c)  # 12 flips drawn alike by two seeds: odds 1 in 4096
    assert any(not torch.equal(maps_a[s][b], maps_c[s][b]) for s in maps_a for b in range(12)
               if torch.equal(seen_a[b], seen_c[b]))  # same view, another of its 2 cached encodings
