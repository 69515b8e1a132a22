"""Images with per-pixel class masks in the label-efficient segmentation benchmarks' layout (DDPM-seg, DatasetGAN).

    <dataset>/real/train/<name>.png (or .jpg)  +  <dataset>/real/train/<name>.npy   (H x W class indices)
    <dataset>/real/test/...

as `datasets/ffhq_34`, `celeba_19`, `bedroom_28`, `cat_15`, `horse_21` of github.com/yandex-research/ddpm-segmentation
(the folder may also be given down to its split). Each mask is read with numpy (`allow_pickle=False`), checked
against its image (same height and width) and the class count (ids in [0, num_classes), or the ignore id 255), and
resized with nearest neighbour to the training resolution, the image with the recipe's transform. A missing mask,
a size mismatch or a foreign class id is an error naming the file and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IGNORE_ID = 255
BENCHMARK_CLASSES = {"ffhq_34": 34, "celeba_19": 19, "bedroom_28": 28, "cat_15": 15, "horse_21": 21}


def split_folder(root: str | Path, split: str) -> Path:
    """`root/real/<split>` (the benchmark layout), `root/<split>`, or `root` itself when it holds the images."""
    root = Path(root)
    for folder in (root / "real" / split, root / split, root):
        if folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
            return folder
    raise FileNotFoundError(f"no images for split {split!r} under {root} (looked in real/{split}/, {split}/ and "
                            "the folder itself)")


def num_classes_of(root: str | Path, given: int | None) -> int:
    """--num-classes, else the `num_classes` of a card.json in the folder (training/make_scenes.py writes one),
    else the benchmark's class count from the folder's name (e.g. ffhq_34 -> 34)."""
    if given:
        return given
    card = Path(root) / "card.json"
    if card.is_file():
        return int(json.loads(card.read_text())["num_classes"])
    name = Path(root).resolve().name
    if name in BENCHMARK_CLASSES:
        return BENCHMARK_CLASSES[name]
    raise ValueError(f"cannot tell the class count of {root}: pass --num-classes (known benchmark folders: "
                     f"{', '.join(BENCHMARK_CLASSES)})")


class MaskedImages(torch.utils.data.Dataset):
    """(image tensor, mask (H, W) long) pairs of one split; `limit` keeps the first N images (sorted names)."""

    def __init__(self, folder: str | Path, num_classes: int, transform: Callable, size: tuple[int, int],
                 limit: int | None = None):
        self.folder, self.num_classes, self.transform, self.size = Path(folder), num_classes, transform, size
        self.images = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
        missing = [p.name for p in self.images if not p.with_suffix(".npy").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: no mask (.npy with the same name) for {', '.join(missing[:5])}")

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The image and its checked mask at full size."""
        path = self.images[i]
        image = Image.open(path).convert("RGB")
        mask = np.load(path.with_suffix(".npy"), allow_pickle=False)
        if mask.ndim != 2 or mask.shape != (image.height, image.width):
            raise ValueError(f"mask {path.with_suffix('.npy')} has shape {mask.shape}; its image is "
                             f"{image.height}x{image.width}")
        bad = np.setdiff1d(np.unique(mask), [*range(self.num_classes), IGNORE_ID])
        if bad.size:
            raise ValueError(f"mask {path.with_suffix('.npy')} holds class ids {bad.tolist()[:8]} outside "
                             f"[0, {self.num_classes}) (and the ignore id {IGNORE_ID})")
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(i)
        resized = Image.fromarray(mask.astype(np.uint8)).resize((self.size[1], self.size[0]), Image.NEAREST)
        return self.transform(image), torch.from_numpy(np.asarray(resized, dtype=np.int64))
