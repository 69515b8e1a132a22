"""Fashion-MNIST scenes: a dense-prediction benchmark built from real images whose masks are exact.

No segmentation dataset ships offline, so scenes are composed: a `size` x `size` black canvas with 2-4 real
Fashion-MNIST garments (28 x 28) pasted at seeded random positions, later garments over earlier ones. A garment's
pixels are those brighter than `threshold` (gray level in [0, 1]); only they are pasted, so every pixel of the
scene is either background (0, and dark: at or below the threshold) or a pasted garment pixel labelled with that
garment's class + 1. Classes: 0 = background, 1..10 = Fashion-MNIST's ten (SCENE_CLASSES). Train scenes use
garments of the Fashion-MNIST train split only, test scenes of the test split only.

Written in the DDPM-seg folder layout (training/labels/dense_masks.py) so the same evaluation runs unchanged on the
real label-efficient benchmarks:

    <root>/real/train/00000.png + 00000.npy     labelled train scenes (validation is carved from them)
    <root>/real/test/...                        labelled test scenes (test garments)
    <root>/unlabelled/00000.png ...             unlabelled scenes for pretraining (train garments, other seeds)
    <root>/card.json, <root>/card.md            what was generated, by which command, class counts
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.run.layout import atomic_file, write_text_atomic

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
GARMENT = 28  # Fashion-MNIST's side


@dataclass(frozen=True)
class SceneSpec:
    """How the scenes of one folder are made; written to its card."""

    size: int = 64
    min_garments: int = 2
    max_garments: int = 4
    threshold: float = 0.2  # gray level (0-1) above which a garment pixel is pasted and labelled
    train: int = 2500
    test: int = 1000
    unlabelled: int = 20000
    seed: int = 0

    def check(self) -> None:
        if self.size < GARMENT:
            raise ValueError(f"scene size {self.size} is smaller than a {GARMENT}-px garment")
        if not 1 <= self.min_garments <= self.max_garments:
            raise ValueError(f"need 1 <= min_garments <= max_garments, got {self.min_garments}, {self.max_garments}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold is a gray level in [0, 1), got {self.threshold}")
        for name in ("train", "test", "unlabelled"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} scene count must be >= 0, got {getattr(self, name)}")


def compose_scene(garments: Sequence[np.ndarray], classes: Sequence[int], positions: Sequence[tuple[int, int]],
                  size: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (size, size), mask uint8 (size, size)): each garment (uint8 28 x 28) pasted at its (row, col),
    in order, where it is brighter than `threshold`; the mask holds its class + 1 there, 0 elsewhere."""
    image = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cut = threshold * 255
    for garment, cls, (r, c) in zip(garments, classes, positions, strict=True):
        h, w = garment.shape
        if not (0 <= r <= size - h and 0 <= c <= size - w):
            raise ValueError(f"garment at ({r}, {c}) does not fit a {size}-px scene")
        on = garment > cut
        image[r:r + h, c:c + w][on] = garment[on]
        mask[r:r + h, c:c + w][on] = cls + 1
    return image, mask


def random_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                 spec: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    """One scene of `spec` from a seeded generator over one split's (N, 28, 28) images and their labels."""
    n = int(rng.integers(spec.min_garments, spec.max_garments + 1))
    picks = rng.integers(0, len(images), size=n)
    positions = [tuple(int(v) for v in rng.integers(0, spec.size - GARMENT + 1, size=2)) for _ in range(n)]
    return compose_scene(images[picks], labels[picks].tolist(), positions, spec.size, spec.threshold)


def _save_png(image: np.ndarray, path: Path) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _save_npy(mask: np.ndarray, path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, mask, allow_pickle=False)


def write_split(folder: Path, count: int, images: np.ndarray, labels: np.ndarray, spec: SceneSpec, seed: int,
                with_masks: bool, progress: bool = True) -> np.ndarray:
    """Write `count` scenes (`00000.png`, and `.npy` masks when `with_masks`) and return the pixel count per class.
    Scene i depends only on (seed, i), so a partly written folder is completed, never rewritten differently."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(len(SCENE_CLASSES), np.int64)
    for i in tqdm(range(count), desc=str(folder), unit="scene", disable=not progress):
        image, mask = random_scene(np.random.default_rng([seed, i]), images, labels, spec)
        pixels += np.bincount(mask.ravel(), minlength=len(SCENE_CLASSES))
        png = folder / f"{i:05d}.png"
        if not png.is_file():
            _save_png(image, png)
        if with_masks and not png.with_suffix(".npy").is_file():
            _save_npy(mask, png.with_suffix(".npy"))
    return pixels


def write_scenes(root: str | Path, spec: SceneSpec, train: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], command: str = "", progress: bool = True) -> dict:
    """Write the whole benchmark folder of `spec` (see the module docstring) and its card; returns the card."""
    spec.check()
    root = Path(root)
    # three disjoint seed streams: labelled train, unlabelled (both train garments), test (test garments)
    counts = {
        "train": write_split(root / "real" / "train", spec.train, *train, spec, 3 * spec.seed, True, progress),
        "test": write_split(root / "real" / "test", spec.test, *test, spec, 3 * spec.seed + 1, True, progress),
    }
    write_split(root / "unlabelled", spec.unlabelled, *train, spec, 3 * spec.seed + 2, False, progress)
    card = {"spec": asdict(spec), "domain": "fashion-mnist", "classes": list(SCENE_CLASSES),
            "num_classes": len(SCENE_CLASSES),
            "scenes": {"train": spec.train, "test": spec.test, "unlabelled": spec.unlabelled},
            "pixels_per_class": {split: dict(zip(SCENE_CLASSES, c.tolist(), strict=True))
                                 for split, c in counts.items()},
            "command": command}
    write_text_atomic(root / "card.json", json.dumps(card, indent=2) + "\n")
    write_text_atomic(root / "card.md", render_card(card))
    return card


def render_card(card: dict) -> str:
    spec = card["spec"]
    lines = [
        "# Fashion-MNIST scenes",
        "",
        f"{spec['size']}x{spec['size']} scenes of {spec['min_garments']}-{spec['max_garments']} real Fashion-MNIST "
        f"garments at seeded random positions (seed {spec['seed']}); a pixel brighter than gray level "
        f"{spec['threshold']} of a pasted garment is labelled with its class, every other pixel is background. "
        "Train and unlabelled scenes use train-split garments, test scenes test-split garments.",
        "",
        f"Made by: `{card['command']}`" if card["command"] else "",
        "",
        f"Splits: {card['scenes']['train']} labelled train (real/train), {card['scenes']['test']} labelled test "
        f"(real/test), {card['scenes']['unlabelled']} unlabelled (unlabelled/). Classes: {card['num_classes']}.",
        "",
        "| class | id | train pixels % | test pixels % |",
        "|---|---|---|---|",
    ]
    totals = {s: max(1, sum(c.values())) for s, c in card["pixels_per_class"].items()}
    for i, name in enumerate(card["classes"]):
        cells = [f"{100 * card['pixels_per_class'][s][name] / totals[s]:.2f}" for s in ("train", "test")]
        lines.append(f"| {name} | {i} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
