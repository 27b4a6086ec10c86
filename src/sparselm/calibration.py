"""Calibration: one block-by-block driver for every architecture (the token windows it is fed: `windows.py`).

The driver (`run_blocks`) works on any model whose transformer blocks `sparselm.weights.find_block_lists` finds.
For each stack of blocks (encoder stacks first) it runs the model once per calibration window with forward
pre-hooks that record what each block is called with — positional and keyword arguments alike (attention masks,
rotary position embeddings, T5's position biases, the encoder output for cross-attention) — and stops the forward
with `StopForward` at the last block. Only the first block's hidden states are kept; the other blocks keep just
their extra arguments, which do not depend on the weights being pruned (so only the first block computes: the later
ones hand its output on, `_first_block_only`). Blocks are then visited in order: the
visitor collects statistics (by calling `run()`, typically inside hooks) and prunes, after which the driver runs the
block again so the next block is fed the already-pruned outputs. The hidden states are held once and overwritten in
place. For encoder-decoder models the decoder stack is captured after the encoder is pruned, so cross-attention
sees the pruned encoder's output.

With `recover` the driver carries two streams: the dense model's (every stack captured once before anything is
pruned, so a decoder's cross-attention reads the dense encoder there) and the pruned model's. Per block it runs the
still-dense block on the dense stream first (its outputs are the block's targets and the dense stream's next
inputs), then the visitor prunes, then `recover` gets the pruned stream's batches with those targets (block
reconstruction trains the kept weights towards them), and only then is the pruned stream advanced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .errors import SparselmError
from .facts import family
from .weights import BlockList, Matrix, find_block_lists

BATCH_TOKENS = 4096  # calibration tokens per block call


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the inputs it needs are recorded."""


@dataclass(frozen=True)
class BlockRef:
    """One block being visited: which stack, its index in the stack and the module."""

    stack: BlockList
    index: int
    module: nn.Module

    @property
    def name(self) -> str:
        return f"{self.stack.path}.{self.index}"


@dataclass
class Captured:
    """Per batch of windows: the first block's hidden states and, per block, the other arguments it is called with."""

    hidden: list[torch.Tensor]
    extra: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]  # [block][batch]: (args after hidden, kwargs)


Visitor = Callable[[BlockRef, Callable[[], object]], None]


@dataclass(frozen=True)
class Batches:
    """One block's calibration batches on the pruned stream: its inputs, the rest of each call, and the targets — the
    dense block's outputs on the dense model's inputs."""

    inputs: list[torch.Tensor]
    calls: list[Call]
    targets: list[torch.Tensor]

    def outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs on the pruned stream's inputs (one forward per batch)."""
        return _forward_all(block, list(zip(self.inputs, self.calls)))


Recover = Callable[[BlockRef, Batches], None]


class Collector(Protocol):
    """A running statistic of one matrix's inputs (Wanda's column norms, SparseGPT's Hessian)."""

    tokens: int

    def add(self, inputs: torch.Tensor) -> None: ...


def check_vocab(model: nn.Module, windows: torch.Tensor) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and windows.numel() and int(windows.max()) >= vocab:
        raise SparselmError(
            f"calibration token id {int(windows.max())} is outside the model's vocabulary of {vocab}; "
            "the tokenizer does not belong to this model"
        )




@contextmanager
def module_hooks(hooks: dict[nn.Module, Callable[..., Any]], pre: bool = False) -> Iterator[None]:
    """Register forward hooks (or keyword-aware forward pre-hooks with `pre=True`) and always remove them."""
    if pre:
        handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in hooks.items()]
    else:
        handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Calibration forwards must not build KV caches: blocks are re-run and a cache would grow across runs."""
    config = model.config
    previous = getattr(config, "use_cache", None)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = previous


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple[Any, ...], dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def windows_per_batch(seqlen: int) -> int:
    """How many windows go through a block together: enough tokens for efficient matrix products, few enough that
    one batch's working set stays small next to the held activations."""
    return max(1, BATCH_TOKENS // seqlen)


def capture(model: nn.Module, stack: BlockList, windows: torch.Tensor) -> Captured:
    """Run the model on batches of windows and record every block's call arguments up to the stack's last block."""
    blocks = list(stack.blocks)
    captured = Captured(hidden=[], extra=[[] for _ in blocks])

    def recorder(index: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
            if index == 0:
                captured.hidden.append(hidden.detach())
            captured.extra[index].append((rest_args, rest_kwargs))
            if index == len(blocks) - 1:
                raise StopForward

        return hook

    inputs = _model_inputs(model)
    with module_hooks({b: recorder(i) for i, b in enumerate(blocks)}, pre=True), _first_block_only(blocks):
        for batch in windows.split(windows_per_batch(windows.shape[1])):
            try:
                model(**inputs(batch.to(_device(model))))
            except StopForward:
                continue
            raise SparselmError(f"the forward pass never reached the last block of {stack.path}; cannot calibrate it")
    return captured


@contextmanager
def _first_block_only(blocks: list[nn.Module]) -> Iterator[None]:
    """While capturing, only the first block computes: every later block returns the first block's output of the
    same batch. Later blocks' hidden states are not kept, and what a block passes on besides them (T5's position
    bias) is what the first block passes on, so the recorded arguments are those of a full forward — at the cost of
    one block instead of all but one. A block whose `forward` is already replaced on the instance is left alone."""
    stubbed = [b for b in blocks[1:-1] if "forward" not in vars(b)]
    first: list[Any] = [None]

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
        first[0] = output

    for b in stubbed:
        b.forward = lambda *_args, **_kwargs: first[0]
    try:
        with module_hooks({blocks[0]: keep}):
            yield
    finally:
        for b in stubbed:
            del b.forward


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_inputs(model: nn.Module) -> Callable[[torch.Tensor], dict[str, Any]]:
    """Keyword inputs for one window: encoder-decoder models read the same tokens on the decoder side."""
    if family(model) == "encoder-decoder":
        return lambda ids: {"input_ids": ids, "decoder_input_ids": ids, "use_cache": False}
    if getattr(model.config, "use_cache", None) is not None and family(model) == "decoder-only":
        return lambda ids: {"input_ids": ids, "use_cache": False}
    return lambda ids: {"input_ids": ids}


def hidden_state(output: Any) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, or the first item of the tuple many blocks return."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _forward_all(block: nn.Module, calls: list[tuple[torch.Tensor, Call]]) -> list[torch.Tensor]:
    return [hidden_state(block(h, *args, **kwargs)) for h, (args, kwargs) in calls]


def run_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    visit: Visitor,
    on_block_done: Callable[[BlockRef], None] | None = None,
    read_only: bool = False,
    recover: Recover | None = None,
) -> None:
    """Visit every transformer block in forward order, feeding each the previous block's (pruned) outputs.

    A `read_only` visitor promises not to change the weights, so the outputs of its own `run()` feed the next block
    and each block runs once instead of twice. `recover` (called after `visit`) makes the driver carry the dense
    stream as well and hands each block's batches with their dense targets to it (module docstring).
    """
    check_vocab(model, windows)
    with torch.no_grad(), no_cache(model):
        stacks = find_block_lists(model)
        dense = [capture(model, stack, windows) for stack in stacks] if recover is not None else None
        for position, stack in enumerate(stacks):
            if dense is not None and position == 0:  # nothing is pruned yet: the pruned stream starts as the dense
                captured = Captured(hidden=list(dense[0].hidden), extra=dense[0].extra)
            else:
                captured = capture(model, stack, windows)
            hidden = captured.hidden
            for index, block in enumerate(stack.blocks):
                calls = list(zip(hidden, captured.extra[index]))
                ref = BlockRef(stack, index, block)
                targets = None
                if dense is not None:
                    dense_hidden = dense[position].hidden
                    targets = _forward_all(block, list(zip(dense_hidden, dense[position].extra[index])))
                    dense_hidden[:] = targets
                outputs: list[torch.Tensor] = []

                def run(block: nn.Module = block, calls: list = calls, outputs: list = outputs) -> list[torch.Tensor]:
                    outputs[:] = _forward_all(block, calls)
                    return outputs

                visit(ref, run)
                if recover is not None and targets is not None:
                    recover(ref, Batches(list(hidden), list(captured.extra[index]), targets))
                hidden[:] = outputs if read_only and outputs else _forward_all(block, calls)
                if on_block_done is not None:
                    on_block_done(ref)
            if dense is not None:
                dense[position] = Captured(hidden=[], extra=[])  # this stack's dense stream is no longer needed
            del captured, hidden


def collect_inputs(
    matrices: list[Matrix], make: Callable[[int], Collector], run: Callable[[], object]
) -> dict[str, Collector]:
    """Run a block once (`run`) with hooks feeding each matrix's inputs to a new collector; hooks are then removed."""
    stats = {m.name: make(m.shape[1]) for m in matrices}

    def hook_for(name: str) -> Callable[..., None]:
        return lambda _module, inputs, _output: stats[name].add(inputs[0])

    with module_hooks({m.module: hook_for(m.name) for m in matrices}):
        run()
    return stats


def total_blocks(model: nn.Module) -> int:
    return sum(len(s.blocks) for s in find_block_lists(model))
