"""The calibration driver: windows, seqlen choice, and block-by-block replay equal to the model's own forward."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_DECODER, tiny_model

from sparselm.calibration import (
    StopForward,
    capture,
    choose_seqlen,
    model_context,
    run_blocks,
    sample_windows,
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


def test_capture_stops_at_the_last_block(family):
    model = tiny_model(family)
    stack = find_block_lists(model)[0]
    windows = torch.randint(0, 96, (3, 12))
    captured = capture(model, stack, windows)
    assert len(captured.hidden) == 3 and all(h.shape[:2] == (1, 12) for h in captured.hidden)
    assert [len(e) for e in captured.extra] == [3] * len(stack.blocks)
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
        # replayed once per window (the visitor never called run); an encoder also runs again to capture the decoder
        got = seen[id(b)]
        assert len(got) == (4 if family in ENCODER_DECODER and b is last_blocks[0] else 2)
        for g, e in zip(got[:2], expected[id(b)]):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


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
    assert len(cross_inputs) == 2
    for x in cross_inputs:
        assert x.shape == (1, 8, 32) and not bool(x.any())
