"""The Fashion-MNIST scenes benchmark (training/protocols/scenes.py, training/make_scenes.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.labels.dense_masks import MaskedImages, num_classes_of, split_folder
from training.protocols.scenes import SCENE_CLASSES, SceneSpec, compose_scene, random_scene, write_scenes


def _garments(n: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), rng.integers(0, 10, n)


def test_a_pixel_is_labelled_with_the_garment_drawn_there_and_background_is_dark():
    threshold = 0.2
    a, b = np.full((28, 28), 200, np.uint8), np.full((28, 28), 100, np.uint8)
    a[:, :4] = 10  # a dark strip of garment a: not pasted, so b shows through there
    image, mask = compose_scene([b, a], [3, 7], [(0, 0), (10, 10)], size=48, threshold=threshold)
    assert mask[20, 20] == 8 and image[20, 20] == 200  # a, pasted last, covers b
    assert mask[12, 11] == 4 and image[12, 11] == 100  # a's dark strip: b is seen and labelled
    assert mask[40, 2] == 0 and image[40, 2] == 0


def test_random_scenes_masks_agree_with_their_images():
    images, labels = _garments()
    spec = SceneSpec(size=64)
    for i in range(30):
        image, mask = random_scene(np.random.default_rng([0, i]), images, labels, spec)
        assert np.array_equal(mask == 0, image <= spec.threshold * 255)
        n = len(np.unique(mask[mask > 0]))
        assert 1 <= n <= spec.max_garments and mask.max() <= 10


def test_scenes_are_deterministic_and_a_partial_folder_is_completed_not_rewritten(tmp_path):
    garments = _garments()
    spec = SceneSpec(size=32, train=6, test=3, unlabelled=4)
    card = write_scenes(tmp_path / "a", spec, garments, garments, progress=False)
    write_scenes(tmp_path / "b", spec, garments, garments, progress=False)
    for split in ("real/train", "real/test", "unlabelled"):
        a, b = sorted((tmp_path / "a" / split).iterdir()), sorted((tmp_path / "b" / split).iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b, strict=True))
    assert len(list((tmp_path / "a" / "unlabelled").glob("*.npy"))) == 0  # unlabelled: images only
    (tmp_path / "a" / "real" / "train" / "00002.png").unlink()
    (tmp_path / "a" / "real" / "train" / "00004.npy").unlink()
    assert write_scenes(tmp_path / "a", spec, garments, garments, progress=False) == card
    assert (tmp_path / "a" / "real" / "train" / "00002.png").read_bytes() == \
        (tmp_path / "b" / "real" / "train" / "00002.png").read_bytes()
    assert (tmp_path / "a" / "real" / "train" / "00004.npy").is_file()
    assert card["num_classes"] == len(SCENE_CLASSES) == 11
    assert sum(card["pixels_per_class"]["train"].values()) == 6 * 32 * 32


def test_train_and_test_scenes_come_from_their_own_split(tmp_path):
    train = (np.full((5, 28, 28), 90, np.uint8), np.zeros(5, np.int64))  # every train garment class 0, gray 90
    test = (np.full((5, 28, 28), 250, np.uint8), np.ones(5, np.int64))  # every test garment class 1, gray 250
    write_scenes(tmp_path, SceneSpec(size=32, train=4, test=4, unlabelled=4), train, test, progress=False)
    for split, gray, cls in (("real/train", 90, 1), ("real/test", 250, 2), ("unlabelled", 90, None)):
        for png in (tmp_path / split).glob("*.png"):
            pixels = np.asarray(Image.open(png))
            assert set(np.unique(pixels)) <= {0, gray}
            if cls is not None:
                assert set(np.unique(np.load(png.with_suffix(".npy")))) <= {0, cls}


def test_the_folder_reads_as_a_ddpm_seg_benchmark(tmp_path):
    garments = _garments()
    write_scenes(tmp_path / "scenes", SceneSpec(size=32, train=3, test=2, unlabelled=0), garments, garments,
                 progress=False)
    assert num_classes_of(tmp_path / "scenes", None) == 11  # from card.json
    data = MaskedImages(split_folder(tmp_path / "scenes", "train"), 11, lambda im: np.asarray(im), (32, 32))
    image, mask = data[0]
    assert image.shape == (32, 32, 3) and tuple(mask.shape) == (32, 32)
    assert json.loads((tmp_path / "scenes" / "card.json").read_text())["domain"] == "fashion-mnist"


def test_make_scenes_command(tmp_path):
    from tests.tiny import write_fashion_mnist
    from training import make_scenes

    fake_fashion_mnist = write_fashion_mnist(write_fashion_mnist(tmp_path / "fm", n=8), n=4, seed=1, split="test")

    card = make_scenes.main(["--out", str(tmp_path / "s"), "--data-dir", str(fake_fashion_mnist), "--train", "2",
                             "--test", "1", "--unlabelled", "1", "--no-progress"])
    assert card["scenes"] == {"train": 2, "test": 1, "unlabelled": 1}
    assert "--train 2" in card["command"]
    with pytest.raises(ValueError, match="smaller than a 28-px garment"):
        make_scenes.main(["--out", str(tmp_path / "t"), "--size", "20", "--data-dir", str(fake_fashion_mnist)])
