"""Calibration windows: reproducible sampling, seqlen choice within the usable context, the token-stream cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sparselm.errors import SparselmError
from sparselm.facts import context_length
from sparselm.windows import choose_seqlen, sample_windows, token_stream


def test_sample_windows_reproducible_and_in_range():
    stream = torch.arange(1000)
    a = sample_windows(stream, 8, 50, seed=3)
    assert a.shape == (8, 50)
    assert torch.equal(a, sample_windows(stream, 8, 50, seed=3))
    assert not torch.equal(a, sample_windows(stream, 8, 50, seed=4))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous windows of the stream


def test_too_many_samples_is_a_clear_error():
    with pytest.raises(SparselmError, match="only 10 windows of 100.*lower --calib-samples"):
        sample_windows(torch.arange(1000), 11, 100, seed=0)


def test_seqlen_default_and_clamp():
    model = tiny_model("llama")
    notes: list[str] = []
    assert context_length(model) == 128
    assert choose_seqlen(model, 4, None, notes.append) == 128
    assert choose_seqlen(model, 4, 64, notes.append) == 64
    assert notes == []
    clamped = choose_seqlen(model, 4, 128, notes.append, budget=4 * 32 * 4 * 40)
    assert clamped < 128 and "clamped from 128" in notes[0]
    with pytest.raises(SparselmError, match="exceeds the model's context"):
        choose_seqlen(model, 4, 4096, notes.append)


class CountingTokenizer:
    """The embedded MiniLM tokenizer, counting how often it is asked to tokenise."""

    def __init__(self) -> None:
        from sparselm.models import load_tokenizer

        self.inner = load_tokenizer("minilm-l6")
        self.backend_tokenizer = self.inner.backend_tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_token_stream_is_cached_by_tokenizer_and_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog . " * 50)
    tokenizer = CountingTokenizer()
    first = token_stream(tokenizer, f"text:{corpus}")
    expected = tokenizer.inner(corpus.read_text(), add_special_tokens=False)["input_ids"]
    assert first.tolist() == expected and first.dtype == torch.long
    cached = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(cached) == 1 and tokenizer.calls == 1
    assert torch.equal(token_stream(tokenizer, f"text:{corpus}"), first) and tokenizer.calls == 1
    cached[0].write_bytes(b"damaged")  # a broken entry is rebuilt, not trusted
    assert torch.equal(token_stream(tokenizer, f"text:{corpus}"), first) and tokenizer.calls == 2
    corpus.write_text("another text entirely")  # new text, new key
    assert token_stream(tokenizer, f"text:{corpus}").numel() == 3 and tokenizer.calls == 3


def test_roberta_default_window_fits_its_position_table(tmp_path):
    """RoBERTa numbers positions from padding_idx + 1: 130 rows hold 128 tokens, and the default window is 128."""
    from evaluation_fixtures import tiny_tokenizer

    from sparselm.pruning import prune

    model = tiny_model("roberta")
    assert model.config.max_position_embeddings == 130
    assert choose_seqlen(model, 2, None, lambda _m: None) == 128
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)  # 1,800 one-character tokens
    report = prune(model, tokenizer=tiny_tokenizer("roberta"), method="wanda", calib=f"text:{corpus}",
                   calib_samples=3)
    assert report.calibration["seqlen"] == 128 and report.calibration["tokens_in_text"] == 1800
    assert report.achieved_sparsity == 0.5
    with pytest.raises(SparselmError, match="exceeds the model's context of 128"):
        choose_seqlen(model, 2, 129, lambda _m: None)


def test_relative_position_models_default_to_512_and_accept_longer_windows():
    model = tiny_model("t5")
    assert context_length(model) is None
    assert choose_seqlen(model, 2, None, lambda _m: None, budget=1 << 40) == 512
    assert choose_seqlen(model, 2, 4096, lambda _m: None, budget=1 << 40) == 4096
