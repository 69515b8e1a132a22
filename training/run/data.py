"""Data loading shared by the teacher trainer (`train_teacher.py`) and the distillation trainer (`pretrain.py`).

Sources (`load_image_dataset`), all returned as a `datasets.Dataset` (or `IterableDataset` when streaming) whose
rows have an ``"image"`` (PIL) and, when known, a ``"label"``:

* a local folder of Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]`` ...), read with `read_idx`;
* a local copy of a Hub dataset's parquet shards (``data/<split>-00000-of-00004.parquet``, the layout of
  ``ILSVRC/imagenet-1k``): ``datasets.load_dataset("parquet", ...)``, streamable;
* any other local folder of images: ``datasets.load_dataset("imagefolder", data_dir=...)``;
* a Hub dataset id: ``datasets.load_dataset(id, split=..., streaming=...)`` (only when ``HF_HUB_OFFLINE`` is unset).

With no source, a recipe whose data is Fashion-MNIST looks in the Debian folder (package ``dataset-fashion-mnist``),
then on the Hub if online, else fails with a message saying how to get the data.

Corrupt images (design): `ImageDataset` is a map-style torch dataset that decodes each image itself, inside a
try/except. A bad item (truncated JPEG, unreadable file) is logged with a warning naming the file or index, and
`__getitem__` returns ``None``. `collate_skip_bad` drops the ``None`` items and puts their number in the batch as
``batch["num_skipped"]`` (an int). Counting in the batch rather than in a global counter is what makes it work with
DataLoader workers (separate processes) and with several ranks: the trainer adds ``num_skipped`` up in its loop (and
may ``accelerator.gather`` it) and logs the total. `SkipCounter` is a tiny helper for that. A batch whose items were
all bad has ``pixel_values`` of shape ``(0,)``; the trainers ask every rank (`guards.every_rank_has_images`, one
collective) and all ranks skip such a micro-batch together, so none waits at a gradient sync the others never reach.
Nothing is ever skipped silently and no bad image is fatal. A streamed example is decoded the same way, outside the
`datasets` iterator; a failure of the reader itself (a connection still down after `datasets`' own read retries) ends
the iterator, so it raises `StreamReadError` instead of silently shortening the epoch.

Order and sharding (design): `build_dataloader` uses `EpochSeededSampler`, whose permutation depends only on
``(seed, epoch)``, never on the rank or on how many epochs ran before; for an `ImageDataset` it also hands each item
an augmentation seed that depends only on ``(seed, epoch, index)`` (so flips are reproducible too).
``accelerator.prepare`` keeps it and shards
its batches across ranks (`BatchSamplerShard`), and Accelerate's `DataLoaderShard` calls ``set_epoch(iteration)``
at the start of every pass, so all ranks see the same permutation. A resumed run calls ``loader.set_epoch(epoch)``
then ``accelerator.skip_first_batches(loader, k)`` (and ``set_epoch(epoch)`` again on the returned loader) and sees
exactly the batches the interrupted run had not seen yet. Streaming ``IterableDataset``s cannot be sampled: they are
split across ranks with ``datasets.distributed.split_dataset_by_node`` (each rank reads every n-th shard or example)
and shuffled with a seeded buffer (``IterableDataset.shuffle(seed, buffer_size)``); the trainer does not pass that
loader to ``accelerator.prepare`` (which would shard it a second time) and moves its batches itself.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamteacher_models._timm_registry import hub_offline
from dreamteacher_models.recipes import DataConfig
from training.run.schedule import noise_seed

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MISSING_DATA_HELP = (
    "install the Debian package (`apt-get install dataset-fashion-mnist`, files go to "
    f"{DEBIAN_FASHION_MNIST_DIR}), or pass `--data-dir DIR` (a folder of IDX files or of images), "
    "or go online (unset HF_HUB_OFFLINE) to use the Hub dataset"
)

# ---------------------------------------------------------------------------------------------------------------
# IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed when the name ends in ``.gz``) into a numpy array.

    The header is checked (two zero bytes, a known dtype code, 1..4 dims) and the payload must hold exactly
    prod(dims) items: a truncated or padded file raises a ValueError naming the file and the expected vs actual
    byte counts.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, OSError) as e:  # truncated gzip stream, not gzip at all, unreadable
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, expected at least a 4-byte header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: magic bytes {raw[:4].hex()} (expected 0000 + dtype code in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)} + number of dims)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if not 1 <= ndim <= 4:
        raise ValueError(f"IDX file {path} declares {ndim} dimensions; expected 1 to 4")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, expected a {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {path} is {what}: expected {expected} bytes for shape {dims} ({dtype}), got {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # the last: torchvision-style names
        if (folder / name).is_file():
            return folder / name
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return folder.is_dir() and all(_idx_file(folder, s) is not None for s in FASHION_MNIST_FILES["train"])


def _local_idx_dir(folder: Path) -> Path | None:
    for c in (folder, folder / "raw", folder / "FashionMNIST" / "raw"):  # the last two: torchvision's layout
        if _has_fashion_mnist(c):
            return c
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding the Fashion-MNIST training IDX files: `data_dir` (also its ``raw/`` or
    ``FashionMNIST/raw/`` subfolder, torchvision's layout), then the Debian folder; None if neither has them."""
    if data_dir is not None:
        found = _local_idx_dir(Path(data_dir).expanduser())
        if found is not None:
            return found
    return DEBIAN_FASHION_MNIST_DIR if _has_fashion_mnist(DEBIAN_FASHION_MNIST_DIR) else None


def read_idx_split(folder: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W), labels int64 (N,) or None when the folder has no label file) of one IDX split."""
    folder = Path(folder)
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r} for IDX data in {folder}; allowed: {sorted(FASHION_MNIST_FILES)}")
    img_stem, lbl_stem = FASHION_MNIST_FILES[split]
    img_file, lbl_file = _idx_file(folder, img_stem), _idx_file(folder, lbl_stem)
    if img_file is None:
        raise FileNotFoundError(f"no {img_stem}[.gz] in {folder}")
    images = read_idx(img_file)
    if images.ndim != 3:
        raise ValueError(f"{img_file}: expected images of shape (N, H, W), got {images.shape}")
    if lbl_file is None:
        return images, None
    labels = read_idx(lbl_file)
    if labels.shape != (len(images),):
        raise ValueError(f"{lbl_file}: {labels.shape[0]} labels for {len(images)} images in {img_file}")
    return images, labels.astype(np.int64)


def load_idx_dataset(folder: str | os.PathLike, split: str = "train"):
    """A `datasets.Dataset` over a folder of Fashion-MNIST/MNIST IDX files: columns ``image`` (PIL, mode L) and
    ``label`` (int).

    The arrays go into Arrow as they are (one fixed-size uint8 row per image); the PIL images are
    made on access by a ``with_transform``, so there is no per-image encode loop.
    """
    import datasets
    import pyarrow as pa

    folder = Path(folder)
    images, labels = read_idx_split(folder, split)
    n, h, w = images.shape
    # Straight into Arrow: Dataset.from_dict would go through Python lists, one per image.
    columns = {"pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), h * w)}
    features = {"pixels": datasets.Sequence(datasets.Value("uint8"), length=h * w)}
    if labels is not None:
        columns["label"] = pa.array(labels)
        features["label"] = datasets.Value("int64")
    info = datasets.DatasetInfo(features=datasets.Features(features), description=f"{split} IDX files in {folder}")
    ds = datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)), info=info, split=datasets.Split(split))

    def to_pil(batch: dict) -> dict:
        out = {"image": [Image.fromarray(np.asarray(p, dtype=np.uint8).reshape(h, w))
                         for p in batch["pixels"]]}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    return ds.with_format("numpy").with_transform(to_pil)


# ---------------------------------------------------------------------------------------------------------------
# Source resolution


def data_source(data_dir: str | os.PathLike | None, dataset: str | None = None) -> str | None:
    """The source a command line asked for: `--data-dir` must be an existing folder (never read as a Hub id, even
    when relative), else `--dataset` (a Hub id), else None (the recipe's default)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "no such folder"
            raise FileNotFoundError(f"--data-dir {data_dir}: {what}; pass a folder of IDX files or of images, or "
                                    "--dataset HUB_ID for a Hub dataset")
        return str(path)
    return dataset


def _parquet_shards(folder: Path, split: str) -> list[str]:
    """A local copy of a Hub dataset's parquet shards for `split` (<split>-*.parquet anywhere under the folder;
    'validation' stands in for 'test')."""
    for name in (split, "validation") if split == "test" else (split,):
        shards = sorted(str(p) for p in folder.rglob(f"{name}-*.parquet"))
        if shards:
            return shards
    return []


def _has_images(folder: Path) -> bool:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    return any(p.suffix.lower() in extensions for p in folder.rglob("*") if p.is_file())


def load_image_dataset(
    source: str | os.PathLike | None = None,
    split: str = "train",
    *,
    recipe_data: DataConfig | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """Load unlabeled (or labeled) images as a `datasets.Dataset` (``IterableDataset`` when `streaming`).

    `source`: a local folder of IDX files, a local image folder (``imagefolder``), or a Hub dataset id. ``None``
    means the recipe's default: for Fashion-MNIST, the Debian folder, else the recipe's Hub dataset when online.
    """
    import datasets

    if source is None:
        if recipe_data is None:
            raise ValueError("no data source: pass --data-dir DIR or --dataset HUB_ID (or a recipe with data)")
        if recipe_data.name == "fashion-mnist":
            found = find_fashion_mnist(None)
            if found is not None:
                logger.info("Fashion-MNIST from %s", found)
                return load_idx_dataset(found, split)
        if recipe_data.hub_dataset is None:
            hint = MISSING_DATA_HELP if recipe_data.name == "fashion-mnist" else "pass --data-dir DIR or --dataset ID"
            raise FileNotFoundError(f"no local copy of {recipe_data.name!r} found and the recipe names no Hub "
                                    f"dataset: {hint}")
        source = recipe_data.hub_dataset

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"data source {path} is a file; expected a folder of IDX files or of images")
        idx_dir = _local_idx_dir(path)
        if idx_dir is not None:
            return load_idx_dataset(idx_dir, split)
        shards = _parquet_shards(path, split)
        if shards:  # the Hub's layout (e.g. ILSVRC/imagenet-1k): data/<split>-0000i-of-0000n.parquet
            return datasets.load_dataset("parquet", data_files={split: shards}, split=split, streaming=streaming,
                                         cache_dir=cache_dir)
        if not _has_images(path):
            raise ValueError(f"data folder {path} holds no images (nor Fashion-MNIST IDX files); image files need a "
                             "known extension such as .png, .jpg or .webp")
        dd = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir, streaming=streaming)
        if split not in dd:
            raise ValueError(f"image folder {path} has splits {sorted(dd)}, not {split!r}")
        return dd[split]

    if Path(source).is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"data folder {source} does not exist (and it is not a Hub dataset id)")
    try:  # offline, `datasets` still serves a copy it cached earlier
        return datasets.load_dataset(str(source), split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - offline, every miss is the same user error
        if not hub_offline():
            raise
        raise FileNotFoundError(
            f"{source!r} is not a local folder nor in the datasets cache, and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded; pass --data-dir DIR" + (f" ({MISSING_DATA_HELP})" if source == FASHION_MNIST_HUB_ID else "")
        ) from e


# ---------------------------------------------------------------------------------------------------------------
# Transforms

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def build_transform(
    data: DataConfig,
    train: bool,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    hflip: bool | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (C, H, W) as the recipe says: RGB, resize the shorter side to
    H / crop_pct with the recipe's interpolation, center crop to (H, W), random horizontal flip when training
    (and the recipe allows it), to tensor, normalise with mean/std.

    `mean`/`std` override the recipe's (a diffusion teacher trains on [-1, 1]: mean = std = 0.5).
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if data.interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {data.interpolation!r}; allowed: {', '.join(_INTERPOLATIONS)}")
    if not 0 < data.crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {data.crop_pct}")
    _, h, w = data.input_size
    size = int(round(min(h, w) / data.crop_pct))
    steps: list[Callable] = [
        _to_rgb,
        T.Resize(size, interpolation=InterpolationMode(data.interpolation)),
        T.CenterCrop((h, w)),
    ]
    if train and (data.hflip if hflip is None else hflip):
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean or data.mean, std or data.std)]
    return T.Compose(steps)


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNGs open as I;16 (older Pillow: I)
_converted: dict[str, int] = {}  # per process: conversions by kind, for the log


def _log_conversion(kind: str) -> None:
    """Log the first conversion of a kind and then at 10, 100, 1000, ... (per process)."""
    n = _converted[kind] = _converted.get(kind, 0) + 1
    if n == 1 or math.log10(n).is_integer():
        logger.info("converted %d %s image(s) so far", n, kind)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, converted as the image means it: a 16-bit image scaled to 8 bits (value / 257; PIL's own conversion
    clips everything above 255 to white), transparency composited over black (PIL's would keep whatever colour
    the transparent pixels hold); other modes by PIL."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        _log_conversion("16-bit (scaled to 8 bits)")
        scaled = np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        _log_conversion("transparent (composited over black)")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Torch dataset that skips bad images, collate, sampler, loader


class ImageDataset(torch.utils.data.Dataset):
    """Map-style torch view of a `datasets.Dataset`: item ``i`` is ``{"pixel_values": tensor[, "label": int]
    [, "index": i]}`` (the index with `return_index`, for the teacher-feature cache), or ``None`` when the image
    cannot be decoded (logged as a warning naming the file or index)."""

    def __init__(self, hf_dataset, transform: Callable, image_key: str = "image", label_key: str | None = "label",
                 return_index: bool = False):
        import datasets

        self.transform, self.return_index = transform, return_index
        self.image_key = image_key
        feats = getattr(hf_dataset, "features", None) or {}
        self.label_key = label_key if label_key and label_key in feats else None
        # Decode images ourselves, so a bad file is caught here and named (datasets would raise inside __getitem__).
        if isinstance(feats.get(image_key), datasets.Image) and feats[image_key].decode:
            hf_dataset = hf_dataset.cast_column(image_key, datasets.Image(decode=False))
        self.ds = hf_dataset

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        # `key` is an index, or (index, augmentation seed) from `EpochSeededSampler(item_seeds=True)`: then the
        # random augmentation of an item depends only on (seed, epoch, index), not on which worker or rank loads it,
        # nor on how far a prefetching loader had read when a checkpoint was saved: resumes are exact.
        i, aug_seed = (key, None) if isinstance(key, int) else (int(key[0]), int(key[1]))
        where = f"index {i}"
        try:
            row = self.ds[i]
            img = row[self.image_key]
            if isinstance(img, dict):  # undecoded datasets.Image: {"bytes": ..., "path": ...}
                where = f"index {i} ({img.get('path') or 'in-memory bytes'})"
                if img.get("bytes") is not None:
                    import io

                    img = Image.open(io.BytesIO(img["bytes"]))
                else:
                    img = Image.open(img["path"])
                img.load()
            if aug_seed is None:
                pixels = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(aug_seed)
                    pixels = self.transform(img)
            out = {"pixel_values": pixels}
            if self.label_key is not None:
                out["label"] = int(row[self.label_key])
            if self.return_index:
                out["index"] = i
            return out
        except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, never fatal
            logger.warning("skipping unreadable image at %s: %s: %s", where, type(e).__name__, e)
            return None


def collate_skip_bad(items: list[dict | None]) -> dict:
    """Stack the good items (``pixel_values``, ``labels``, ``indices`` where the items have them);
    ``batch["num_skipped"]`` says how many were dropped (bad images)."""
    good = [it for it in items if it is not None]
    batch: dict[str, Any] = {"num_skipped": len(items) - len(good)}
    if not good:
        batch["pixel_values"] = torch.empty(0)
        return batch
    batch["pixel_values"] = torch.stack([it["pixel_values"] for it in good])
    if "label" in good[0]:
        batch["labels"] = torch.tensor([it["label"] for it in good], dtype=torch.long)
    if "index" in good[0]:
        batch["indices"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    return batch


class SkipCounter:
    """Running total of skipped images for the trainer to log: ``counter.update(batch)`` each step."""

    def __init__(self) -> None:
        self.total = 0

    def update(self, batch: dict) -> int:
        n = int(batch.get("num_skipped", 0))
        self.total += n
        return n


class EpochSeededSampler(torch.utils.data.Sampler):
    """Random permutation that depends only on (seed, epoch): the same on every rank and after a resume.

    With `item_seeds`, yields ``(index, augmentation_seed)`` pairs (for `ImageDataset`), the seed a function of
    (seed, epoch, index) only.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, item_seeds: bool = False):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0
        self.item_seeds = item_seeds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator:
        if self.shuffle:
            g = torch.Generator().manual_seed(noise_seed(self.epoch, self.seed))  # epoch-major, as it always was
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if not self.item_seeds:
            return iter(order)
        return iter([(i, hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF) for i in order])

    def __len__(self) -> int:
        return self.num_samples


def build_dataloader(
    dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    collate_fn: Callable = collate_skip_bad,
) -> torch.utils.data.DataLoader:
    """A DataLoader ready for ``accelerator.prepare`` (see the module docstring for order, resume and sharding).

    `dataset`: a map-style torch dataset (e.g. `ImageDataset`) or a torch ``IterableDataset`` (e.g. a streaming
    ``datasets.IterableDataset`` already split with ``split_dataset_by_node`` and shuffled with a seed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    common = dict(batch_size=batch_size, num_workers=num_workers, drop_last=drop_last, collate_fn=collate_fn,
                  persistent_workers=num_workers > 0)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(dataset, **common)
    sampler = EpochSeededSampler(len(dataset), seed=seed, shuffle=shuffle, item_seeds=isinstance(dataset, ImageDataset))
    return torch.utils.data.DataLoader(dataset, sampler=sampler, **common)


SHUFFLE_BUFFER = 10_000  # examples held per DataLoader worker; ImageNet JPEGs (~110 KB each): about 1.1 GB


def split_streaming(dataset, seed: int = 0, buffer_size: int = SHUFFLE_BUFFER, rank: int | None = None,
                    world_size: int | None = None):
    """Shard a streaming ``datasets.IterableDataset`` across ranks and shuffle it with a seeded buffer.

    `datasets` gives each rank its own shards only when the shard count is a multiple of the ranks; otherwise every
    rank reads the whole stream and keeps every world_size-th example (no example twice, but world_size times the
    reading). Rank 0 logs which mode the run is in, and warns in the second.
    """
    from datasets.distributed import split_dataset_by_node

    if rank is None or world_size is None:
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        shards = getattr(dataset, "num_shards", None) or getattr(dataset, "n_shards", None)
        if rank == 0 and shards and shards % world_size:
            logger.warning("streaming: %d shards are not a multiple of %d ranks, so every rank reads the whole stream "
                           "and keeps every %d-th example (%dx the reading); a dataset with a multiple of %d shards "
                           "lets each rank read only its own", shards, world_size, world_size, world_size, world_size)
        elif rank == 0:
            logger.info("streaming: %s shards over %d ranks, each rank reads its own %s", shards or "?", world_size,
                        f"{shards // world_size}" if shards else "share")
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset.shuffle(seed=seed, buffer_size=buffer_size)


class StreamReadError(RuntimeError):
    """The stream's reader failed after `datasets`' own bounded retries; the epoch cannot go on without a gap."""

    @classmethod
    def at(cls, position: int, cause: Exception) -> StreamReadError:
        import datasets

        return cls(f"streaming: reading example {position} of this worker's stream failed with "
                   f"{type(cause).__name__}: {cause}. Transient read errors were already retried "
                   f"(datasets.config.STREAMING_READ_MAX_RETRIES = {datasets.config.STREAMING_READ_MAX_RETRIES}); "
                   "the run stops rather than train on a shortened epoch. Rerun with --resume to continue from the "
                   "last checkpoint.")


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Torch iterable over a streaming ``datasets.IterableDataset`` with the same skip-bad-image behaviour.

    With `seed`, the random augmentation of the i-th example a loader worker streams in an epoch is drawn from (seed,
    epoch, worker, i) alone, so a resumed run (which skips the examples already trained on) flips exactly as the
    uninterrupted one; give each rank its own seed."""

    def __init__(self, hf_iterable, transform: Callable, image_key: str = "image", label_key: str | None = "label",
                 seed: int | None = None):
        import datasets

        # `datasets` decodes an image inside its iterator, where an error ends the iterator (and the rest of the
        # epoch with it): take the encoded image and decode it here, one example at a time, under our guard
        feature = (getattr(hf_iterable, "features", None) or {}).get(image_key)
        self.decoder = feature if isinstance(feature, datasets.Image) and feature.decode else None
        if self.decoder is not None:
            hf_iterable = hf_iterable.cast_column(image_key, datasets.Image(decode=False))
        self.ds, self.transform, self.image_key, self.label_key = hf_iterable, transform, image_key, label_key
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)

    def _augment(self, image, i: int) -> torch.Tensor:
        if self.seed is None:
            return self.transform(image)
        # the epoch as the loader's workers see it (datasets shares it with persistent workers; our own int is not),
        # and the worker: each worker streams its own shards, counting positions from 0
        epoch = int(getattr(self.ds, "epoch", self.epoch))
        info = torch.utils.data.get_worker_info()
        key = hash((self.seed, epoch, info.id if info else 0, i)) % 2**63  # ints hash the same in every process
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(key)  # the CPU generator only: CUDA's stays the trainer's
            return self.transform(image)

    def __iter__(self) -> Iterator[dict | None]:
        it = iter(self.ds)
        i = 0
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except Exception as e:  # the reader itself failed: a generator that raised is finished
                raise StreamReadError.at(i, e) from e
            try:
                image = row[self.image_key]
                if self.decoder is not None:
                    image = self.decoder.decode_example(image)
                out = {"pixel_values": self._augment(image, i)}
                if self.label_key and self.label_key in row:
                    out["label"] = int(row[self.label_key])
                yield out
            except Exception as e:  # noqa: BLE001
                logger.warning("skipping unreadable streamed image %d: %s: %s", i, type(e).__name__, e)
                yield None
            i += 1
