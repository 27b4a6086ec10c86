"""The calibration driver: windows, seqlen choice, and block-by-block replay equal to the model's own forward."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_DECODER, tiny_model

from sparselm import calibration
from sparselm.calibration import (
    StopForward,
    capture,
    choose_seqlen,
    model_context,
    run_blocks,
    sample_windows,
    token_stream,
)
from sparselm.errors import SparselmError
from sparselm.weights import find_block_lists


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
    assert model_context(model) == 128
    assert choose_seqlen(model, 4, None, notes.append) == 128
    assert choose_seqlen(model, 4, 64, notes.append) == 64
    assert notes == []
    clamped = choose_seqlen(model, 4, 128, notes.append, budget=4 * 32 * 4 * 40)
    assert clamped < 128 and "clamped from 128" in notes[0]
    with pytest.raises(SparselmError, match="exceeds the model's context"):
        choose_seqlen(model, 4, 4096, notes.append)


def test_capture_stops_at_the_last_block_and_batches_windows(family, monkeypatch):
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 24)  # two windows of 12 tokens per batch
    model = tiny_model(family)
    stack = find_block_lists(model)[0]
    windows = torch.randint(0, 96, (3, 12))
    captured = capture(model, stack, windows)
    assert [h.shape[:2] for h in captured.hidden] == [(2, 12), (1, 12)]
    assert [len(e) for e in captured.extra] == [2] * len(stack.blocks)
    assert issubclass(StopForward, Exception) and not issubclass(StopForward, ValueError)


def test_replay_matches_the_models_own_forward(family):
    """With no pruning, the driver's block outputs equal what each block outputs inside a normal forward."""
    model = tiny_model(family)
    windows = torch.randint(0, 96, (2, 10))
    stacks = find_block_lists(model)
    last_blocks = [s.blocks[-1] for s in stacks]
    seen: dict[int, list[torch.Tensor]] = {id(b): [] for b in last_blocks}

    def record(module, _inputs, output):
        seen[id(module)].append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [b.register_forward_hook(record) for b in last_blocks]
    try:
        with torch.no_grad():
            for row in windows:
                kwargs = {"decoder_input_ids": row[None]} if family in ENCODER_DECODER else {}
                model(input_ids=row[None], **kwargs)
        expected = {k: list(v) for k, v in seen.items()}
        for v in seen.values():
            v.clear()
        visited: list[str] = []
        run_blocks(model, windows, lambda ref, run: visited.append(ref.name))
    finally:
        for h in handles:
            h.remove()
    assert visited == [f"{s.path}.{i}" for s in stacks for i in range(len(s.blocks))]
    for b in last_blocks:
        # both windows go through as one batch, replayed once (the visitor never called run); an encoder's last
        # block also runs again when the decoder stack is captured
        got = seen[id(b)]
        assert len(got) == (2 if family in ENCODER_DECODER and b is last_blocks[0] else 1)
        torch.testing.assert_close(got[0], torch.cat(expected[id(b)]), rtol=1e-5, atol=1e-5)


def test_read_only_visitor_runs_each_block_once_and_feeds_its_outputs_on(monkeypatch):
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 10)  # one window per batch
    model = tiny_model("llama")
    windows = torch.randint(0, 96, (3, 10))
    blocks = find_block_lists(model)[0].blocks
    runs: dict[int, int] = {}
    handles = [b.register_forward_hook(lambda m, i, o, k=k: runs.__setitem__(k, runs.get(k, 0) + 1))
               for k, b in enumerate(blocks)]
    seen: dict[str, list[list[torch.Tensor]]] = {"read-only": [], "default": []}
    try:
        run_blocks(model, windows, lambda ref, run: seen["read-only"].append([o.clone() for o in run()]),
                   read_only=True)
        read_only_runs = dict(runs)
        runs.clear()
        run_blocks(model, windows, lambda ref, run: seen["default"].append([o.clone() for o in run()]))
    finally:
        for h in handles:
            h.remove()
    last = len(blocks) - 1
    # capture runs blocks 0..last-1 once per window; then each block once per window (read-only) or twice
    assert read_only_runs == {k: 3 * (1 + (k < last)) for k in range(len(blocks))}
    assert runs == {k: 3 * (2 + (k < last)) for k in range(len(blocks))}
    for ours, ref in zip(seen["read-only"], seen["default"], strict=True):
        assert len(ours) == 3
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)


def test_encoder_stack_comes_first_and_decoder_sees_pruned_encoder():
    """After the encoder is zeroed by the visitor, the decoder's cross-attention input reflects it."""
    model = tiny_model("bart")
    windows = torch.randint(0, 96, (2, 8))
    cross_inputs: list[torch.Tensor] = []

    def visit(ref, run):
        if ref.stack.side == "encoder":
            for p in ref.module.parameters():
                p.data.zero_()
        elif ref.index == 0:
            k_proj = ref.module.encoder_attn.k_proj
            h = k_proj.register_forward_hook(lambda m, i, o: cross_inputs.append(i[0].clone()))
            run()
            h.remove()

    run_blocks(model, windows, visit)
    # BART's encoder blocks end in a LayerNorm: with every parameter zeroed the encoder outputs exact zeros
    assert len(cross_inputs) == 1  # both windows in one batch
    assert cross_inputs[0].shape == (2, 8, 32) and not bool(cross_inputs[0].any())


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
