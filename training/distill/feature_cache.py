"""Opt-in cache of the frozen teacher's features for multi-epoch runs: K stochastic encodings per image.

    accelerate launch training/pretrain.py --epochs 8 --feature-cache runs/fmnist_cache --cache-encodings 2

Online (the paper's way, the default), every batch pays one teacher forward, again on every pass over the data.
With a cache, the teacher encodes each training image K times once (x_t with K independent noise draws, one UNet
pass each, the paired taps only), and also its mirror image K times when the recipe flips; the maps are stored as
fp16 in one memory-mapped `stride_<s>.npy` per tap, shape (images, K, orientations, C, H/s, W/s), and each training
step reads, for each image in the orientation the trainer drew, one of its K encodings at random in place of a
fresh one. What this changes, and why it is opt-in (a documented deviation from the paper):

* The noise is no longer fresh every time: each image has K noise draws instead of one per visit, so the targets
  carry less of the stochastic-encoding variation (K=1: the same target every epoch).
* Flipped images get the teacher's features of the flipped image, cached beside the plain ones. Flipping a stored
  map instead would be wrong: a UNet's channels are not mirror-symmetric (a channel for one edge orientation
  answers the mirrored edge in another channel), and `benchmarks/speed/feature_cache.py` measures flip(T(x)) 5-7x
  further from T(flip x) than two noise draws of T(x) are from each other.
* Only deterministic data transforms can be cached (resize, centre crop, normalise; the recipes' only random one,
  the flip, is handled as above).
* Size: images x K x orientations x sum over taps of C x (H/s) x (W/s) x 2 bytes. Fashion-MNIST (60k, taps
  128@8x8 + 128@4x4): 1.2 GB per encoding and orientation. ImageNet at 256 px with ADM's taps is tens of MB per
  image and encoding: terabytes, so the cache is for small in-domain sets, never for the ImageNet recipes.

The cache is keyed (`cache_key`): teacher weights (SHA-256), taps, timestep, encoding, resolution, teacher dtype,
normalisation, the data (image count and a SHA-256 of a spread of preprocessed images), K, orientations and the
seed. A cache whose key differs from the run's is refused with the differing fields named. It is written
atomically: into a hidden `.<name>.partial-<pid>` folder, synced to the disk and renamed to its name when complete;
a killed writer leaves only a partial folder, removed by the next build, never a cache that passes as complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from training.run.disk_full import FULL_DISK_ERRNOS, reporting_full_disk
from training.run.layout import replace_dir
from training.run.schedule import noise_seed

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
KEY_FILENAME = "cache.json"
DATA_FINGERPRINT_IMAGES = 16
# recorded for the reader but not compared: the same teacher or data may sit at another path
INFORMATIONAL_FIELDS = ("teacher", "data")


def teacher_fingerprint(teacher) -> str:
    """SHA-256 of the teacher's weights (every network, every tensor, in name order)."""
    digest = hashlib.sha256()
    for net in teacher.nets:
        for name, tensor in sorted(net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(dataset, images: int = DATA_FINGERPRINT_IMAGES) -> str:
    """SHA-256 of the count and of `images` evenly spread preprocessed images (shape and values) of `dataset`."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for i in np.linspace(0, len(dataset) - 1, num=min(images, len(dataset)), dtype=int):
        item = dataset[int(i)]
        if item is None:
            digest.update(b"unreadable")
            continue
        pixels = item["pixel_values"].float().contiguous()
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher, dataset, *, data_source: str, encodings: int, flips: bool, seed: int) -> dict[str, Any]:
    """What the cached features depend on; `dataset` must be the run's training images without random flips;
    `flips`: also cache the mirror images (the recipe's `data.hflip`)."""
    if encodings < 1:
        raise ValueError(f"cache encodings must be >= 1, got {encodings}")
    key = {"format": CACHE_FORMAT, "teacher": teacher.source, "teacher_sha256": teacher_fingerprint(teacher),
           "taps": [[t.name, t.stride, t.channels] for t in teacher.taps], "timestep": teacher.timestep,
           "encoding": teacher.encoding, "resolution": teacher.resolution,
           "teacher_dtype": str(teacher.dtype or torch.float32), "mean": teacher.mean.flatten().tolist(),
           "std": teacher.std.flatten().tolist(), "data": data_source, "num_images": len(dataset),
           "data_sha256": data_fingerprint(dataset), "encodings": int(encodings),
           "orientations": 2 if flips else 1, "seed": int(seed),
           "dtype": "float16"}
    return json.loads(json.dumps(key))  # the form it takes in cache.json


class StaleFeatureCacheError(ValueError):
    """A cache folder written for another teacher, tap set, timestep or data than the run's."""


class FeatureCache:
    """A complete cache folder, opened read-only (memory-mapped); `lookup` gives the trainer its targets."""

    def __init__(self, folder: str | os.PathLike, key: Mapping[str, Any]):
        self.folder = Path(folder)
        key_file = self.folder / KEY_FILENAME
        if not key_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a teacher-feature cache (no {KEY_FILENAME})")
        saved = json.loads(key_file.read_text())
        diffs = [f"{k}: cached {saved.get(k)!r}, this run {key.get(k)!r}" for k in sorted(set(saved) | set(key))
                 if k not in INFORMATIONAL_FIELDS and saved.get(k) != key.get(k)]
        if diffs:
            raise StaleFeatureCacheError(
                f"teacher-feature cache {self.folder} was written for another run ({'; '.join(diffs)}); delete the "
                "folder to rebuild it, or pass another --feature-cache folder")
        self.key = saved
        self.encodings, self.orientations = int(saved["encodings"]), int(saved["orientations"])
        self.maps = {int(stride): np.load(self.folder / f"stride_{stride}.npy", mmap_mode="r")
                     for _, stride, _ in saved["taps"]}

    def lookup(self, indices: Tensor, encodings: Tensor, flips: Tensor, device: torch.device | str
               ) -> dict[int, Tensor]:
        """{stride: (B, C, h, w) float32}: encoding `encodings[b]` of image `indices[b]`, of its mirror image where
        `flips[b]` (the trainer flipped that image)."""
        if self.orientations == 1 and bool(flips.any()):
            raise ValueError(f"teacher-feature cache {self.folder} holds no mirror images (built without flips)")
        idx, enc, orient = indices.cpu().numpy(), encodings.cpu().numpy(), flips.cpu().long().numpy()
        return {stride: torch.from_numpy(np.ascontiguousarray(array[idx, enc, orient])).to(device, torch.float32)
                for stride, array in self.maps.items()}


def encoding_generator(seed: int, encoding: int, orientation: int, first_index: int, device: torch.device
                       ) -> torch.Generator:
    """The noise of encoding k, orientation o (1: mirrored) of the batch starting at image `first_index`."""
    return torch.Generator(device=device).manual_seed(
        noise_seed(seed, (2 * encoding + orientation) * 7_919 + first_index * 31))


def reserved_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A zero fp16 .npy memory map whose blocks are reserved on the disk first: writing into a sparse map on a full
    disk kills the process with SIGBUS, so the space is claimed (`posix_fallocate`, ENOSPC if it is not there)
    before any is written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
            except OSError as e:
                if e.errno in FULL_DISK_ERRNOS:
                    raise
                # a file system that cannot reserve space (EOPNOTSUPP, EINVAL): the map stays sparse
    return array


def build_feature_cache(folder: str | os.PathLike, teacher, dataset, key: Mapping[str, Any], batch_size: int = 256,
                        progress: bool = True) -> FeatureCache:
    """Encode every image of `dataset` (an `ImageDataset` with `return_index`, no random flip) K times, and its
    mirror image K times when the key has 2 orientations, and write the cache atomically at `folder`; unreadable
    images are skipped (their rows stay zero; training skips them)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; open it with FeatureCache or delete it to rebuild")
    for leftover in folder.parent.glob(f".{folder.name}.partial-*"):  # a killed writer's
        shutil.rmtree(leftover, ignore_errors=True)
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        with reporting_full_disk(folder.parent, "the teacher-feature cache"):
            return _write_feature_cache(folder, staging, teacher, dataset, key, batch_size, progress)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_feature_cache(folder: Path, staging: Path, teacher, dataset, key: Mapping[str, Any], batch_size: int,
                         progress: bool) -> FeatureCache:
    from training.run.data import build_dataloader

    n, k_total, orientations = len(dataset), int(key["encodings"]), int(key["orientations"])
    loader = build_dataloader(dataset, batch_size, shuffle=False, drop_last=False)
    arrays: dict[int, np.memmap] = {}
    bar = tqdm(total=n * k_total * orientations, desc="teacher-feature cache", unit="img", disable=not progress)
    for batch in loader:
        if batch["pixel_values"].shape[0] == 0:
            continue
        indices = batch["indices"].numpy()
        images = batch["pixel_values"].to(teacher.device)
        for k in range(k_total):
            for o in range(orientations):
                noise = encoding_generator(int(key["seed"]), k, o, int(indices[0]), teacher.device)
                maps = teacher(images.flip(-1) if o else images, generator=noise)
                for stride, fmap in maps.items():
                    if stride not in arrays:
                        arrays[stride] = reserved_memmap(staging / f"stride_{stride}.npy",
                                                         (n, k_total, orientations, *fmap.shape[1:]))
                    arrays[stride][indices, k, o] = fmap.to(torch.float16).cpu().numpy()
                bar.update(len(indices))
    bar.close()
    if not arrays:
        raise ValueError(f"no readable image among the {n} to cache")
    for array in arrays.values():
        array.flush()
    del arrays
    (staging / KEY_FILENAME).write_text(json.dumps(dict(key), indent=2) + "\n")
    replace_dir(staging, folder)  # synced to the disk first: a crash never leaves a cache with empty files
    logger.info("teacher-feature cache written to %s (%d images x %d encodings x %d orientations, %.2f GB)", folder,
                n, k_total, orientations, sum(p.stat().st_size for p in folder.glob("*.npy")) / 1e9)
    return FeatureCache(folder, key)


def open_or_build_feature_cache(folder: str | os.PathLike, teacher, dataset, key: Mapping[str, Any], *,
                                build: bool, batch_size: int = 256, progress: bool = True) -> FeatureCache:
    """The cache at `folder`, checked against `key`; built first when missing and `build` (the main process)."""
    if not Path(folder).exists() and build:
        return build_feature_cache(folder, teacher, dataset, key, batch_size=batch_size, progress=progress)
    return FeatureCache(folder, key)
