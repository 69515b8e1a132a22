"""Tiny objects the trainer tests build in seconds: a teacher folder, IDX files, an image folder."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

TINY_UNET = dict(  # attention-free, 4 levels: decoder taps at strides 8, 4, 2, 1 for 32 px
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D",) * 4,
    up_block_types=("UpBlock2D",) * 4,
    norm_num_groups=4,
)


def make_tiny_teacher(folder: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (gzipped when the name ends in .gz) holding a uint8 array."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(payload)
    return path


def write_fashion_mnist(folder: Path, n: int = 64, seed: int = 0, split: str = "train") -> Path:
    """Fashion-MNIST-shaped IDX files: n random 28x28 images with labels 0..9."""
    rng = np.random.default_rng(seed)
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def write_image_folder(folder: Path, n: int = 16, size: int = 36, corrupt: int = 0, seed: int = 0) -> Path:
    """n random RGB PNGs plus `corrupt` files with a .png name that are not images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
    for i in range(corrupt):
        (folder / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder
