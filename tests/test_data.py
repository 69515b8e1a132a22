"""training/run/data.py: IDX reading, source resolution, transforms, bad-image skipping, seeded order."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dreamteacher_models.recipes import DataConfig, get_recipe
from tests.tiny import make_fmnist_dir, write_idx
from training.run import data

FMNIST = get_recipe("resnet18.dreamteacher_fmnist").data


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    images, labels = make_fmnist_dir(tmp_path, gz=gz)
    ext = ".gz" if gz else ""
    got = data.read_idx(tmp_path / f"train-images-idx3-ubyte{ext}")
    assert got.dtype == np.uint8 and got.shape == (12, 28, 28)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"train-labels-idx1-ubyte{ext}"), labels)
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    write_idx(tmp_path / "f.idx", f32)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f.idx"), f32)  # big-endian payload decoded


def test_read_idx_truncated_and_corrupt(tmp_path):
    arr = np.zeros((5, 4, 4), dtype=np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte", arr)
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "cut-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte is truncated: expected 96 bytes .* got 86 bytes"):
        data.read_idx(tmp_path / "cut-idx3-ubyte")
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(ValueError, match="cut.gz is truncated"):
        data.read_idx(tmp_path / "cut.gz")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(raw)[:-20])  # gzip stream cut short
    with pytest.raises(ValueError, match="broken.gz"):
        data.read_idx(tmp_path / "broken.gz")
    (tmp_path / "bad-magic").write_bytes(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad-magic")


def test_find_order_explicit_dir_wins(tmp_path, monkeypatch):
    explicit, debian = tmp_path / "mine", tmp_path / "debian"
    make_fmnist_dir(explicit)
    make_fmnist_dir(debian, gz=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", debian)
    assert data.find_fashion_mnist(explicit) == explicit
    assert data.find_fashion_mnist(None) == debian
    (tmp_path / "empty").mkdir()
    assert data.find_fashion_mnist(tmp_path / "empty") == debian
    tv = tmp_path / "tv"
    make_fmnist_dir(tv / "FashionMNIST" / "raw")  # torchvision's layout
    assert data.find_fashion_mnist(tv) == tv / "FashionMNIST" / "raw"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    assert data.find_fashion_mnist(tmp_path / "empty") is None


def test_load_idx_dataset_and_missing_data_error(tmp_path, monkeypatch):
    images, labels = make_fmnist_dir(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    ds = data.load_image_dataset(None, recipe_data=FMNIST)  # no source: the Debian folder
    assert len(ds) == 12
    row = ds[3]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (28, 28)
    np.testing.assert_array_equal(np.asarray(row["image"]), images[3])
    assert row["label"] == labels[3]
    assert len(data.load_image_dataset(str(tmp_path / "debian"), "test")) == 4
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.load_image_dataset(str(tmp_path / "debian"), "val")

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_image_dataset(None, recipe_data=FMNIST)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_dataset(str(tmp_path / "typo" / "dir"), recipe_data=FMNIST)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        data.load_image_dataset("someone/some_dataset")


def test_imagefolder_corrupt_image_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"ok_{i}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "bad.jpg", quality=90)
    raw = (folder / "bad.jpg").read_bytes()
    (folder / "bad.jpg").write_bytes(raw[: len(raw) // 3])  # truncated JPEG

    ds = data.load_image_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 6
    cfg = DataConfig(name="t", hub_dataset=None, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    tds = data.ImageDataset(ds, data.build_transform(cfg, train=True))
    loader = data.build_dataloader(tds, batch_size=3, shuffle=True, seed=0, drop_last=False)
    counter = data.SkipCounter()
    good = 0
    with caplog.at_level(logging.WARNING, logger="training.run.data"):
        for batch in loader:
            counter.update(batch)
            good += batch["pixel_values"].shape[0]
            if batch["pixel_values"].numel():
                assert batch["pixel_values"].shape[1:] == (3, 16, 16)
    assert counter.total == 1 and good == 5
    assert any("bad.jpg" in r.getMessage() for r in caplog.records)


def test_collate_all_bad_gives_empty_batch():
    batch = data.collate_skip_bad([None, None])
    assert batch["num_skipped"] == 2 and batch["pixel_values"].shape[0] == 0


def test_transform_shape_normalisation_and_flip():
    img = Image.fromarray(np.full((28, 28), 200, dtype=np.uint8))  # grayscale, 28 px
    x = data.build_transform(FMNIST, train=False)(img)
    assert x.shape == (3, 32, 32)
    expected = (200 / 255 - FMNIST.mean[0]) / FMNIST.std[0]
    torch.testing.assert_close(x, torch.full_like(x, expected), atol=1e-5, rtol=0)
    x01 = data.build_transform(FMNIST, train=False, mean=(0.5,) * 3, std=(0.5,) * 3)(img)
    torch.testing.assert_close(x01, torch.full_like(x01, 200 / 255 * 2 - 1), atol=1e-5, rtol=0)

    cfg = DataConfig(name="t", hub_dataset=None, input_size=(3, 8, 8), mean=(0,) * 3, std=(1,) * 3, crop_pct=0.5)
    ramp = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (16, 1)))  # 32 wide, 16 high
    ev = data.build_transform(cfg, train=False)(ramp)
    assert ev.shape == (3, 8, 8)  # shorter side 16 -> 8 / 0.5 = 16, then center crop 8x8
    assert ev[0, 0, 0] < ev[0, 0, -1]  # eval never flips
    torch.manual_seed(0)
    flips = {bool(data.build_transform(cfg, train=True)(ramp)[0, 0, 0] > ev[0, 0, 0]) for _ in range(20)}
    assert flips == {True, False}  # train flips sometimes
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        data.build_transform(DataConfig(name="t", hub_dataset=None, input_size=(3, 8, 8), mean=(0,) * 3,
                                        std=(1,) * 3, interpolation="cubic"), train=False)


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"pixel_values": torch.tensor([float(i)])}


def _order(loader):
    return [int(v) for b in loader for v in b["pixel_values"].flatten()]


def test_seeded_order_is_deterministic_and_resumable():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    a = _order(data.build_dataloader(_Indices(), 4, seed=7))
    assert a == _order(data.build_dataloader(_Indices(), 4, seed=7))
    assert sorted(a) == list(range(20)) and a != list(range(20))
    assert a != _order(data.build_dataloader(_Indices(), 4, seed=8))
    assert _order(data.build_dataloader(_Indices(), 4, shuffle=False)) == list(range(20))

    loader = data.build_dataloader(_Indices(), 4, seed=7)
    loader.sampler.set_epoch(1)
    epoch1 = _order(loader)
    assert epoch1 != a and sorted(epoch1) == list(range(20))

    try:
        acc = Accelerator()
        prepared = acc.prepare(data.build_dataloader(_Indices(), 4, seed=7))
        assert _order(prepared) == a  # pass 0 = epoch 0
        assert _order(prepared) == epoch1  # Accelerate calls set_epoch(iteration) on each pass
        prepared.set_epoch(1)  # a resumed run: epoch 1, two batches already done
        skipped = acc.skip_first_batches(prepared, 2)
        skipped.set_epoch(1)
        assert _order(skipped) == epoch1[8:]
    finally:
        AcceleratorState._reset_state(True)


def test_a_missing_data_dir_is_never_read_as_a_hub_id_and_an_empty_folder_is_named(tmp_path, monkeypatch):
    from training.run.data import data_source, load_image_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--data-dir my_images: no such folder"):
        data_source("my_images")  # relative and absent: not the Hub dataset "my_images"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        data_source("a_file")
    assert data_source(None, "org/name") == "org/name"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    assert data_source(str(empty)) == str(empty)
    with pytest.raises(ValueError, match=r"empty holds no images"):
        load_image_dataset(str(empty))


def test_16_bit_and_transparent_images_are_converted_as_they_mean_and_logged(tmp_path, caplog):
    import logging

    from PIL import Image

    from training.run.data import _to_rgb

    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 8-bit values 0..255, stored in 16 bits
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, ..., 3], rgba[2:, ..., 3] = 200, 0, 255  # red; top half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with caplog.at_level(logging.INFO, logger="training.run.data"):
        gray = np.asarray(_to_rgb(Image.open(tmp_path / "g16.png")))
        colour = np.asarray(_to_rgb(Image.open(tmp_path / "a.png")))
    assert gray.shape == (16, 16, 3) and np.array_equal(gray[..., 0], np.arange(256).reshape(16, 16))  # not clipped
    assert (colour[:2] == 0).all() and (colour[2:] == [200, 0, 0]).all()  # transparent -> black background
    assert "16-bit" in caplog.text and "transparent" in caplog.text


def test_offline_a_hub_dataset_in_the_datasets_cache_is_used_and_a_missing_one_is_a_clear_error(monkeypatch):
    import datasets

    from training.run.data import load_image_dataset

    cached = datasets.Dataset.from_dict({"label": [0, 1]})
    calls = []

    def load_dataset(source, split=None, **kwargs):
        calls.append(source)
        if source == "someone/cached":
            return cached
        raise ConnectionError(f"offline and {source} is not cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_image_dataset("someone/cached", "train") is cached
    with pytest.raises(FileNotFoundError, match="nor in the datasets cache, and HF_HUB_OFFLINE is set"):
        load_image_dataset("someone/missing", "train")
    assert calls == ["someone/cached", "someone/missing"]
