"""The empty-prompt embedding a latent (Stable Diffusion) teacher conditions on, stored once beside its weights
so training never needs the text encoder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from training.run.layout import atomic_file
from training.teacher.sources import _missing

EMPTY_PROMPT_FILE = "empty_prompt_embedding.safetensors"  # stored next to unet/ and vae/ in a latent teacher folder
EMPTY_PROMPT_KEY = "embedding"


def compute_empty_prompt_embedding(tokenizer, text_encoder) -> Tensor:
    """The text encoder's last hidden state for the empty prompt, (1, tokens, dim), as SD pipelines compute it."""
    ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids.to(next(text_encoder.parameters()).device))[0].detach().float().cpu()


def save_empty_prompt_embedding(folder: str | os.PathLike, embedding: Tensor) -> Path:
    """Write `embedding` to <folder>/empty_prompt_embedding.safetensors atomically."""
    from safetensors.torch import save_file

    out = Path(folder) / EMPTY_PROMPT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        save_file({EMPTY_PROMPT_KEY: embedding.detach().float().cpu().contiguous()}, str(tmp))
    return out


def store_empty_prompt_embedding(source: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Compute the empty-prompt embedding with the pipeline's text encoder (needs `transformers`) and store it.

    Written to `out_dir` (default: the local `source` folder) so training never needs the text encoder.
    """
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ImportError("computing the empty-prompt embedding needs `pip install transformers`") from e
    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
    if out_dir is None:
        if not path.is_dir():
            raise ValueError(f"{source} is not a local folder: pass out_dir to store the embedding")
        out_dir = path
    return save_empty_prompt_embedding(out_dir, compute_empty_prompt_embedding(tokenizer, text_encoder))


def load_empty_prompt_embedding(source: str) -> Tensor:
    """The stored empty-prompt embedding of a latent teacher, else computed with its text encoder."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    file = path / EMPTY_PROMPT_FILE
    if not file.is_file() and not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(source, EMPTY_PROMPT_FILE))
        except Exception:  # any Hub miss: fall through to the text encoder
            pass
    if file.is_file():
        return load_file(str(file))[EMPTY_PROMPT_KEY]
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise _missing(
            "latent",
            source,
            f"no {EMPTY_PROMPT_FILE} and `transformers` is not installed to compute it; run "
            f"`python training/inspect_teacher.py --store-empty-prompt-embedding {source}` where transformers is "
            "installed",
        ) from None
    where = str(path) if path.exists() else source
    tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
    return compute_empty_prompt_embedding(tokenizer, text_encoder)
