"""A latent teacher's empty-prompt embedding (training/teacher/prompt.py): computed by the text encoder, stored
beside the UNet, loaded from a folder, the Hub or a home path, and the errors when it cannot be had."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

from training.teacher.prompt import (
    EMPTY_PROMPT_FILE,
    compute_empty_prompt_embedding,
    load_empty_prompt_embedding,
    save_empty_prompt_embedding,
    store_empty_prompt_embedding,
)


class _Tokenizer:  # transformers' CLIPTokenizer, as the embedding helpers call it
    model_max_length = 5

    def __call__(self, texts, **kw):
        assert texts == [""] and kw["padding"] == "max_length" and kw["max_length"] == 5
        return type("Enc", (), {"input_ids": torch.tensor([[0, 1, 2, 2, 2]])})()


class _TextEncoder(nn.Module):  # returns (last_hidden_state,) like transformers' CLIPTextModel
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 8)
        self.embed.weight.data = torch.arange(24.0).reshape(3, 8)

    def forward(self, ids):
        return (self.embed(ids),)


def test_empty_prompt_embedding_helpers(tmp_path):
    emb = compute_empty_prompt_embedding(_Tokenizer(), _TextEncoder())
    assert emb.shape == (1, 5, 8) and not emb.requires_grad
    torch.testing.assert_close(emb[0, :, 0], torch.tensor([0.0, 8.0, 16.0, 16.0, 16.0]))
    path = save_empty_prompt_embedding(tmp_path, emb)
    torch.testing.assert_close(load_empty_prompt_embedding(str(tmp_path)), emb)
    assert path.name == EMPTY_PROMPT_FILE


def test_the_text_encoder_computes_the_embedding_where_none_is_stored(tmp_path, monkeypatch):
    from types import SimpleNamespace

    loaded = []

    def loader(kind, make):
        def from_pretrained(where, subfolder):
            loaded.append((kind, where, subfolder))
            return make()

        return SimpleNamespace(from_pretrained=from_pretrained)

    transformers = SimpleNamespace(CLIPTokenizer=loader("tokenizer", _Tokenizer),
                                   CLIPTextModel=loader("text_encoder", _TextEncoder))
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    expected = compute_empty_prompt_embedding(_Tokenizer(), _TextEncoder())
    folder = tmp_path / "sd"
    folder.mkdir()
    torch.testing.assert_close(load_empty_prompt_embedding(str(folder)), expected)
    assert loaded == [("tokenizer", str(folder), "tokenizer"), ("text_encoder", str(folder), "text_encoder")]
    assert not (folder / EMPTY_PROMPT_FILE).exists()  # loading computes, storing writes
    assert store_empty_prompt_embedding(str(folder)) == folder / EMPTY_PROMPT_FILE
    assert store_empty_prompt_embedding("someone/sd", tmp_path / "out") == tmp_path / "out" / EMPTY_PROMPT_FILE
    assert loaded[-2:] == [("tokenizer", "someone/sd", "tokenizer"), ("text_encoder", "someone/sd", "text_encoder")]
    for stored in (folder, tmp_path / "out"):
        torch.testing.assert_close(load_empty_prompt_embedding(str(stored)), expected)
    with pytest.raises(ValueError, match=r"^someone/sd is not a local folder: pass out_dir to store the embedding$"):
        store_empty_prompt_embedding("someone/sd")

    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(ImportError, match=r"^computing the empty-prompt embedding needs `pip install transformers`$"):
        store_empty_prompt_embedding(str(folder))
    nothing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=rf"^teacher source '{re.escape(str(nothing))}' \(latent\): no "
                                                rf"{EMPTY_PROMPT_FILE} and `transformers` is not installed to "
                                                rf"compute it; run `python training/inspect_teacher\.py "
                                                rf"--store-empty-prompt-embedding {re.escape(str(nothing))}`"):
        load_empty_prompt_embedding(str(nothing))


def test_the_embedding_comes_from_the_hub_for_a_repo_id_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    import huggingface_hub

    stored = save_empty_prompt_embedding(tmp_path / "download", torch.ones(1, 2, 8))
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a: downloads.append(a) or str(stored))
    torch.testing.assert_close(load_empty_prompt_embedding("someone/sd"), torch.ones(1, 2, 8))
    assert downloads == [("someone/sd", EMPTY_PROMPT_FILE)]
    monkeypatch.setenv("HOME", str(tmp_path))
    save_empty_prompt_embedding(tmp_path / "sd", torch.zeros(1, 2, 8))
    torch.testing.assert_close(load_empty_prompt_embedding("~/sd"), torch.zeros(1, 2, 8))
