"""The calibration driver: block-by-block replay equal to the model's own forward, input collection."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_DECODER, tiny_model

from sparselm import calibration
from sparselm.calibration import StopForward, capture, check_vocab, collect_inputs, hidden_state, run_blocks
from sparselm.errors import SparselmError
from sparselm.weights import by_block, find_block_lists, select_matrices


def test_capture_stops_at_the_last_block_and_batches_windows(family, monkeypatch):
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 24)  # two windows of 12 tokens per batch
    model = tiny_model(family)
    stack = find_block_lists(model)[0]
    windows = torch.randint(0, 96, (3, 12))
    captured = capture(model, stack, windows)
    assert [h.shape[:2] for h in captured.hidden] == [(2, 12), (1, 12)]
    assert [len(e) for e in captured.extra] == [2] * len(stack.blocks)
    assert issubclass(StopForward, Exception) and not issubclass(StopForward, ValueError)


def test_what_every_batch_passes_alike_is_held_once(monkeypatch):
    """Rotary tables (equal for every batch of equal shape) are recorded once and shared by later batches; what
    differs from batch to batch (the hidden states) is each batch's own."""
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 12)  # one window of 12 tokens per batch
    model = tiny_model("llama")
    stack = find_block_lists(model)[0]
    windows = torch.randint(0, 96, (4, 12))
    captured = capture(model, stack, windows)

    def tensors(call) -> list[torch.Tensor]:
        args, kwargs = call
        found = [a for a in args if isinstance(a, torch.Tensor)]
        for value in kwargs.values():
            items = value if isinstance(value, (tuple, list)) else [value]
            found += [v for v in items if isinstance(v, torch.Tensor)]
        return found

    for calls in captured.extra:
        first = tensors(calls[0])
        assert first  # the rotary tables at least
        for call in calls[1:]:
            assert all(a is b for a, b in zip(first, tensors(call)))
    assert len({id(h) for h in captured.hidden}) == 4 and not torch.equal(captured.hidden[0], captured.hidden[1])


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

    def visitor(kind: str):
        def visit(ref, run):  # the block's outputs during the visitor's own run
            outputs: list[torch.Tensor] = []
            handle = ref.module.register_forward_hook(lambda m, i, o: outputs.append(hidden_state(o).clone()))
            assert run() is None
            handle.remove()
            seen[kind].append(outputs)

        return visit

    try:
        run_blocks(model, windows, visitor("read-only"), read_only=True)
        read_only_runs = dict(runs)
        runs.clear()
        run_blocks(model, windows, visitor("default"))
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


class SumOfSquares:
    def __init__(self, in_features: int) -> None:
        self.total, self.tokens = torch.zeros(in_features, dtype=torch.float64), 0

    def add(self, inputs: torch.Tensor) -> None:
        self.total += inputs.reshape(-1, inputs.shape[-1]).double().pow(2).sum(0)
        self.tokens += inputs.reshape(-1, inputs.shape[-1]).shape[0]


def test_collect_inputs_sums_every_token_each_matrix_sees():
    """Each matrix's collector receives exactly its module's inputs over all batches; hooks are gone afterwards."""
    model = tiny_model("llama")
    windows = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    mats = by_block(select_matrices(model))["model.layers.1"]
    seen: dict[str, list[torch.Tensor]] = {m.name: [] for m in mats}
    handles = [m.module.register_forward_hook(lambda _mod, i, _o, n=m.name: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
               for m in mats]

    collected = {}

    def visit(ref, run):
        if ref.name == "model.layers.1":
            collected.update(collect_inputs(mats, SumOfSquares, run))

    try:
        run_blocks(model, windows, visit, read_only=True)
    finally:
        for h in handles:
            h.remove()
    assert set(collected) == {m.name for m in mats}
    for m in mats:
        expected = torch.cat(seen[m.name]).double()
        assert collected[m.name].tokens == expected.shape[0] == 36
        torch.testing.assert_close(collected[m.name].total, expected.pow(2).sum(0))
        assert not m.module._forward_hooks and not m.module._forward_pre_hooks


def test_a_statistics_pass_ends_each_later_call_once_every_matrix_had_its_input(monkeypatch):
    """Given the block, collect_inputs stops each call after the first at the last matrix's input: the same
    statistics, and the last matrix's own product (Llama's down projection) runs only in the first call."""
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 12)  # one window of 12 tokens per call: 4 calls
    model = tiny_model("llama")
    windows = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(2))
    mats = by_block(select_matrices(model))["model.layers.1"]
    last = model.get_submodule("model.layers.1.mlp.down_proj")
    products = []
    handle = last.register_forward_hook(lambda *_: products.append(1))
    collected: dict[str, dict] = {}

    def visit(ref, run):
        if ref.name == "model.layers.1":
            products.clear()
            collected["whole"] = collect_inputs(mats, SumOfSquares, run)
            collected["whole products"] = len(products)
            products.clear()
            collected["stopped"] = collect_inputs(mats, SumOfSquares, run, ref.module)
            collected["stopped products"] = len(products)

    try:
        run_blocks(model, windows, visit)
    finally:
        handle.remove()
    assert collected["whole products"] == 4 and collected["stopped products"] == 1
    for m in mats:
        whole, stopped = collected["whole"][m.name], collected["stopped"][m.name]
        assert whole.tokens == stopped.tokens == 48
        assert torch.equal(whole.total, stopped.total)
    assert not find_block_lists(model)[0].blocks[1]._forward_pre_hooks


def test_early_stop_waits_for_a_first_call_with_every_matrix_called_exactly_once():
    stop = calibration.EarlyStop(["a", "b"], torch.nn.Identity())
    stop.block_starts(None, (), {})
    stop.called("a"), stop.called("b")  # first call: learns, never stops
    stop.block_starts(None, (), {})
    stop.called("b")
    with pytest.raises(StopForward):
        stop.called("a")  # every matrix had its input, in any order

    twice = calibration.EarlyStop(["a", "b"], torch.nn.Identity())
    twice.block_starts(None, (), {})
    twice.called("a"), twice.called("b"), twice.called("a")  # "a" is called again after "b"
    twice.block_starts(None, (), {})
    twice.called("a"), twice.called("b"), twice.called("a")  # so no call is ever cut short

    uncalled = calibration.EarlyStop(["a", "b"], torch.nn.Identity())
    uncalled.block_starts(None, (), {})
    uncalled.called("a")  # "b" saw nothing in the first call (a routed expert, say)
    uncalled.block_starts(None, (), {})
    uncalled.called("a"), uncalled.called("b")
    assert uncalled.once is False and twice.once is False and stop.once is True


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_model("gpt2")
    check_vocab(model, torch.tensor([[0, 95]]))
    with pytest.raises(SparselmError, match="token id 96 is outside the model's vocabulary of 96"):
        check_vocab(model, torch.tensor([[0, 96]]))
