"""SHA-256 of files and the SHA256SUMS list an export carries: written at export, checked before a folder's weights
are trusted (evaluation of a local-dir: export, publishing)."""

from __future__ import annotations

from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (a 2 GB checkpoint is never held whole)."""
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


CHECKSUMS_FILENAME = "SHA256SUMS"


def read_safetensors(path: str | Path) -> dict:
    """The tensors of a .safetensors file; a truncated or corrupt file is a ValueError naming it (not a traceback
    from inside safetensors)."""
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError or ValueError
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}): it is truncated or corrupt; write, "
                         "copy or download it again") from e


def write_checksums(folder: Path) -> None:
    """SHA256SUMS (`sha256sum` format) of every other file of an export: what publish verifies before uploading."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS_FILENAME)
    (folder / CHECKSUMS_FILENAME).write_text("".join(f"{sha256_file(folder / name)}  {name}\n" for name in files))


def read_checksums(folder: Path) -> dict[str, str]:
    """{file name: SHA-256} from an export's SHA256SUMS; a clear error when it is empty or malformed."""
    path = folder / CHECKSUMS_FILENAME
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path} line {number} is not '<sha256>  <file>': {line[:80]!r}; re-export the folder")
        sums[parts[1].lstrip("*")] = parts[0]
    if not sums:
        raise ValueError(f"{path} is empty; re-export the folder with `python -m hub.export`")
    return sums


def verify_checksums(folder: Path) -> dict[str, str]:
    """Check every file SHA256SUMS lists against its digest; raises naming the first that differs or is missing."""
    sums = read_checksums(folder)
    for name, digest in sums.items():
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name} is listed in SHA256SUMS but missing: re-export the folder")
        if sha256_file(folder / name) != digest:
            raise ValueError(f"{folder / name} does not match its SHA256SUMS: re-export it")
    return sums
