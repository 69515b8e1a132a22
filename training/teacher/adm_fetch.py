"""OpenAI's guided-diffusion checkpoints by name: `--teacher adm:256x256_diffusion_uncond`.

The first use downloads the official checkpoint from OpenAI's URL, checks its SHA-256, converts it with
training/teacher/adm.py into a diffusers folder in the cache (`$DREAMTEACHER_CACHE`, else `$HF_HOME/dreamteacher`, under
`adm/<preset>/`), and deletes the downloaded .pt; later uses load the converted folder without the network.
Offline, the error names the file to download and where to put it; a file put there by hand is checked and
converted the same way (and left in place). Processes sharing the cache (ranks, nodes on a shared disk) take a file
lock, so one fetches and converts while the others wait for the result. Only the unconditional checkpoints are
offered: the class-conditional ones need class labels the teacher is never given.

Pickle safety: OpenAI publishes only PyTorch pickles. A download is loaded (with `torch.load(weights_only=True)`)
only once its size and SHA-256 equal the ones recorded here (the size first: a truncated or wrong file is refused
without reading 2 GB). OpenAI publishes no hashes; see OFFICIAL_CHECKPOINTS for where the recorded one comes from.
The other presets have none recorded: their first download is refused unless the name carries one,
`adm:lsun_cat@<sha256>`, and the refusal prints the digest the download had, to check and pass on.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from dreamteacher_models._timm_registry import hub_offline
from training.run.checksums import sha256_file

logger = logging.getLogger("dreamteacher.adm_fetch")

PREFIX = "adm:"
_BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021"


@dataclass(frozen=True)
class OfficialCheckpoint:
    url: str
    sha256: str | None  # None: no trustworthy digest known; the user must supply one
    size: int | None = None  # bytes; checked before the digest


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    # The digest and size of 256x256_diffusion_uncond.pt as later Disco Diffusion notebooks, independent download
    # scripts and a reproduction manifest agree on. (An early Disco Diffusion notebook's `model_256_SHA` line held
    # 983e3de6...613a, which is the digest of its secondary_model_imagenet_2.pth: pinned here before, it refused the
    # real file.)
    "256x256_diffusion_uncond": OfficialCheckpoint(
        f"{_BASE_URL}/256x256_diffusion_uncond.pt", "a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1",
        size=2_211_383_297,
    ),
    **{name: OfficialCheckpoint(f"{_BASE_URL}/{name}.pt", None)
       for name in ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout")},
}


def is_adm_name(source: str) -> bool:
    return str(source).startswith(PREFIX)


def cache_root() -> Path:
    if os.environ.get("DREAMTEACHER_CACHE"):
        return Path(os.environ["DREAMTEACHER_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "dreamteacher"


def _download(url: str, dest: Path) -> None:
    """Stream `url` into `dest` through a temporary file renamed only when complete (a cut connection is an error,
    not a short file)."""
    fd, partial = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            written = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    written += len(block)
                    bar.update(len(block))
        if total is not None and written != total:
            raise OSError(f"the download stopped after {written} of {total} bytes")
        os.replace(partial, dest)
    finally:
        Path(partial).unlink(missing_ok=True)


def resolve_adm_name(spec: str) -> str:
    """The converted diffusers folder for `adm:<preset>[@<sha256>]`, fetching, checking and converting it on first
    use."""
    preset, _, expected_sha256 = spec.removeprefix(PREFIX).partition("@")
    if preset not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"unknown ADM checkpoint {spec!r}; known: "
                         f"{', '.join(PREFIX + name for name in OFFICIAL_CHECKPOINTS)}")
    if expected_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise ValueError(f"{spec!r}: the part after '@' must be a SHA-256 digest (64 hex digits)")
    root = cache_root() / "adm"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{preset}.lock")):  # one process fetches; the others find its result
        return _resolve_locked(spec, preset, expected_sha256, root)


def _resolve_locked(spec: str, preset: str, expected_sha256: str, root: Path) -> str:
    from training.teacher import adm

    official = OFFICIAL_CHECKPOINTS[preset]
    expected = (expected_sha256 or official.sha256 or "").lower() or None
    folder, checkpoint = root / preset, root / Path(official.url).name
    if (folder / "config.json").is_file() and adm.read_adm_flags(folder) is not None:
        converted_from = adm.read_source_sha256(folder)
        if expected is not None and converted_from != expected:
            raise ValueError(f"{folder} was converted from a checkpoint with SHA-256 "
                             f"{converted_from or '(not recorded)'}, not {expected} as {spec} asks; delete {folder} "
                             "to fetch and convert again")
        return str(folder)
    how = (f"download {official.url} to {checkpoint}" + (f" (SHA-256 {expected})" if expected else "")
           + f", then run again; or set DREAMTEACHER_CACHE to a folder holding adm/{checkpoint.name}")
    downloaded = not checkpoint.is_file()
    if downloaded:
        if hub_offline():
            raise FileNotFoundError(f"{spec} is not in the cache and HF_HUB_OFFLINE is set: {how}")
        logger.info("fetching %s from %s", spec, official.url)
        try:
            _download(official.url, checkpoint)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(f"could not download {official.url} ({error}): {how}") from error
    size = checkpoint.stat().st_size
    if official.size is not None and not expected_sha256 and size != official.size:
        if downloaded:  # not the official file: never kept
            checkpoint.unlink()
        raise ValueError(f"{checkpoint} has {size:,} bytes, the official file {official.size:,}: "
                         + ("the download was deleted" if downloaded else f"delete it and {how}"))
    digest = sha256_file(checkpoint)
    if expected is None:
        raise ValueError(f"{checkpoint} has SHA-256 {digest}, and no official digest is recorded for {preset}: check "
                         f"it, then name the teacher {PREFIX}{preset}@<sha256> (the file is kept, and never loaded "
                         "unchecked)")
    if digest != expected:
        if downloaded:  # not the official file: never kept
            checkpoint.unlink()
            raise ValueError(f"{checkpoint} has SHA-256 {digest}, expected {expected} (the official file); the "
                             "download was deleted")
        raise ValueError(f"{checkpoint} has SHA-256 {digest}, expected {expected} (the official file); delete it "
                         f"and {how}")
    logger.info("%s: SHA-256 verified; converting into %s", checkpoint.name, folder)
    adm.convert_to_folder(checkpoint, preset, folder, overwrite=folder.exists(), source_sha256=digest)
    if downloaded:
        checkpoint.unlink()  # the converted safetensors folder is all later runs read
    return str(folder)
