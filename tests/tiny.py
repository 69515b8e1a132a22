"""Tiny objects the tests build in seconds: a teacher folder, IDX files, an image folder, teacher configs and images.

Imported by tests and by benchmarks/tools/fault_injection.py: torch, diffusers and the training code are imported
inside the functions that need them, so importing this module stays cheap.
"""

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
MEAN, STD = (0.2860,) * 3, (0.3530,) * 3  # the fmnist recipe's normalisation


def make_tiny_teacher(folder: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


def make_teacher_and_fmnist(root: Path) -> tuple[Path, Path]:
    """A tiny teacher (root/teacher) and Fashion-MNIST-shaped data (root/data: 40 train images, 16 test images)."""
    data = write_fashion_mnist(root / "data", n=40)
    write_fashion_mnist(data, n=16, seed=1, split="test")
    return make_tiny_teacher(root / "teacher"), data


# ------------------------------------------------------------------------------------------------ data files

IDX_TYPE_CODES = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (gzipped when the name ends in .gz): uint8, int32 and float32 arrays keep their type (stored
    big-endian), any other array is stored as uint8."""
    array = np.asarray(array)
    if array.dtype.type not in IDX_TYPE_CODES:
        array = array.astype(np.uint8)
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array.astype(array.dtype.newbyteorder(">"))).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(payload)
    return path


def write_fashion_mnist(folder: Path, n: int = 64, seed: int = 0, split: str = "train") -> Path:
    """Fashion-MNIST-shaped IDX files: n random 28x28 images with random labels 0..9."""
    rng = np.random.default_rng(seed)
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def make_fmnist_dir(folder: Path, n: int = 12, gz: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Both Fashion-MNIST splits, gzipped or not: n random images labelled 0, 1, .., 9, 0, .. and a test split of
    the first 4 of them. Returns the train (images, labels)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", labels)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", images[:4])
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", labels[:4])
    return images, labels


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


# ------------------------------------------------------------------------------------------------ teachers


def teacher_config(source, **kw):
    """A UNet `TeacherConfig` at timestep 50 for `source`, with any field overridden."""
    from dreamteacher_models.recipes import TeacherConfig

    return TeacherConfig(**{"kind": "unet", "source": str(source), "timestep": 50, **kw})


def tiny_images(n=2, size=32, seed=0, mean=MEAN, std=STD):
    """Images in [0, 1] and the same images in the student's normalisation."""
    import torch

    x01 = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return x01, (x01 - m) / s


def hooked_forward(unet, names, *args, **kwargs):
    """A full UNet forward with plain forward hooks on `names`: the reference the teacher must match."""
    import torch

    from training.teacher.taps import _first_tensor

    modules = dict(unet.named_modules())
    out = {}
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, _first_tensor(o))) for n in names
    ]
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


# ------------------------------------------------------------------------------------------------ stand-ins


class FakeAccelerator:
    """An `accelerate.Accelerator` stand-in for one process of a run, for code that asks which process it is, waits
    at barriers (each recorded in `waits` as is_main_process), saves state (`save_state` writes a model.safetensors
    holding "weights of <folder name>" and records the folder name in `saved`) and unwraps its model (as is)."""

    num_processes = 1  # the folder checks of several processes (training/run/shared_disk.py) are not run

    def __init__(self, main: bool = True, waits: list | None = None):
        import torch

        self.is_main_process = self.is_local_main_process = main
        self.device = torch.device("cpu")
        self.waits = [] if waits is None else waits
        self.saved: list[str] = []

    def wait_for_everyone(self) -> None:
        self.waits.append(self.is_main_process)

    def save_state(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_text(f"weights of {folder.name}")
        self.saved.append(folder.name)

    def unwrap_model(self, model):
        return model
