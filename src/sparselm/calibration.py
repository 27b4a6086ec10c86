"""Calibration: one block-by-block driver for every architecture (the token windows it is fed: `windows.py`).

The driver (`run_blocks`) works on any model whose transformer blocks `sparselm.weights.find_block_lists` finds.
For each stack of blocks (encoder stacks first) it runs the model once per calibration window with forward
pre-hooks that record what each block is called with — positional and keyword arguments alike (attention masks,
rotary position embeddings, T5's position biases, the encoder output for cross-attention) — and stops the forward
with `StopForward` at the last block. Only the first block's hidden states are kept; the other blocks keep just
their extra arguments, which do not depend on the weights being pruned (so only the first block computes: the later
ones hand its output on, `_first_block_only`). Blocks are then visited in order: the
visitor collects statistics (by calling `run()`, typically inside hooks) and prunes, after which the driver runs the
block again so the next block is fed the already-pruned outputs. A statistics pass that names its block
(`collect_inputs(..., block)`) ends each call after the first once every hooked matrix had its input (`EarlyStop`).
The hidden states are held once and overwritten in place, batch by batch (a stream may hold them on disk:
`BlockStream.held_batches`); a block's outputs are kept beside them only for a read-only visitor, whose outputs feed
the next block.
For encoder-decoder models the decoder stack is captured after the encoder is pruned, so cross-attention sees the
pruned encoder's output.

With `recover` the driver carries two streams: the dense model's (every stack captured once before anything is
pruned, so a decoder's cross-attention reads the dense encoder there) and the pruned model's. Per block it runs the
still-dense block on the dense stream first (its outputs are the block's targets and the dense stream's next
inputs), then the visitor prunes, then `recover` gets the pruned stream's batches with those targets (block
reconstruction trains the kept weights towards them), and only then is the pruned stream advanced.

With a `BlockStream` (models bigger than memory, `pruning/stream.py`) the blocks not in use live on the meta device:
the driver asks the stream to load a block before capturing or visiting it and to unload it when done, and the
tensors outside blocks (embeddings, heads) are in memory only while a capture runs (and, for a caller that prunes
them, after the last block: `BlockStream.restore_outside`). Capture
forwards run unloaded blocks on meta tensors (only the arguments recorded for them matter); an argument a block
receives from an unloaded block (T5's position bias, passed on unchanged) takes the value the previous block got,
and a decoder's capture reads the already-pruned encoder stack's output through its last block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .errors import SparselmError
from .facts import family
from .weights import BlockList, Matrix, find_block_lists

# Calibration tokens per block call. Larger calls are no faster on a CPU (smollm2 block, 8 × 1024 tokens: 0.61–0.67 s
# one window per call, 0.70–0.88 s four) and hold ~130 MB more of attention and MLP temporaries. Smaller ones are
# slower in a whole run (smollm2-135m streamed, Wanda, 32 × 512 tokens: 127–132 s at 512 tokens a call, 117 s at 1024).
BATCH_TOKENS = 1024


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the inputs it needs are recorded."""


class EarlyStop:
    """Ends each block call of a statistics pass once every hooked matrix has received its input for that call:
    what the block computes after the last of them (that matrix's own product, the residual) feeds nothing the pass
    keeps. In a Llama block that is the MLP's down projection, about a quarter of the block's multiply-adds.

    The block's first call runs whole and shows how often each matrix is called per call; later calls stop early
    only if that was exactly once for every matrix (a matrix called twice, or not at all, would be cut short).
    The caller's `run()` catches the `StopForward` (`run_blocks`). Without a block no call is seen to start, so none
    is ever stopped."""

    def __init__(self, names: Iterable[str], block: nn.Module | None) -> None:
        self.names = set(names)
        self.block = block
        self.seen: dict[str, int] = {}
        self.once: bool | None = None  # every matrix called exactly once per call (None: first call not done yet)

    def block_starts(self, _module: nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
        if self.seen and self.once is None:
            self.once = set(self.seen) == self.names and all(n == 1 for n in self.seen.values())
        self.seen = {}

    def called(self, name: str) -> None:
        """Count a matrix's call (after its input was recorded); ends the block call once every matrix had its."""
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.once and len(self.seen) == len(self.names):
            raise StopForward

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While the pass runs: learn where the block's calls start (nothing to watch without a block)."""
        with module_hooks({self.block: self.block_starts} if self.block is not None else {}, pre=True):
            yield


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

    hidden: HeldBatches
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


Recover = Callable[[BlockRef, Batches], "list[torch.Tensor] | None"]
"""Recovers a pruned block from its batches; may return the block's outputs on them afterwards (the pruned stream's
next inputs), which saves the driver running the block again."""


class HeldBatches(Protocol):
    """The block-to-block hidden states, one tensor per batch: a list, or batches kept on disk (`pruning/stream.py`)
    and read back one at a time."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...

    def __setitem__(self, index: int, value: torch.Tensor) -> None: ...

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def append(self, value: torch.Tensor) -> None: ...


class BlockStream(Protocol):
    """Loads a block's weights before the driver uses it and frees them when it is done (`pruning/stream.py`), and
    says where the hidden states are held."""

    def load(self, ref: BlockRef) -> None: ...

    def unload(self, ref: BlockRef) -> None: ...

    def held_batches(self) -> HeldBatches: ...

    def capturing(self) -> AbstractContextManager[None]:
        """A capture runs within it: the tensors outside blocks that a forward up to the last block reads
        (embeddings) are in memory. After it, the stream may free every tensor outside blocks until `restore_outside`:
        while blocks are worked on, only they and the hidden states need memory."""
        ...

    def restore_outside(self) -> None:
        """Bring back every tensor outside blocks, before the caller works on one of them (after the last block)."""
        ...

    def settle(self) -> None:
        """Give back the memory the last step freed (a matrix pruned; the stream settles after each block call
        itself), so that what a run holds stays what it needs."""
        ...


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


def windows_per_batch(seqlen: int, tokens: int | None = None) -> int:
    """How many windows go through a block together: enough tokens (`BATCH_TOKENS` unless `tokens` is given) for
    efficient matrix products, few enough that one batch's working set stays small next to the held activations."""
    return max(1, (tokens or BATCH_TOKENS) // seqlen)


def capture(
    model: nn.Module,
    stack: BlockList,
    windows: torch.Tensor,
    previous: tuple[nn.Module, HeldBatches] | None = None,
    batch_tokens: int | None = None,
    held: HeldBatches | None = None,
) -> Captured:
    """Run the model on batches of windows and record every block's call arguments up to the stack's last block.

    Blocks on the meta device (streaming) run on meta copies of their inputs; `previous` (a finished stack's last
    block and its outputs per batch) replaces that block's meta output so what follows it reads real values. The first
    block's hidden states go to `held` (default: a new list)."""
    blocks = list(stack.blocks)
    captured = Captured(hidden=held if held is not None else [], extra=[[] for _ in blocks])

    def recorder(index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
            if index == 0:
                captured.hidden.append(hidden.detach())
            calls = captured.extra[index]
            calls.append(_shared_with(calls[-1], (rest_args, rest_kwargs)) if calls else (rest_args, rest_kwargs))
            if index == len(blocks) - 1:
                raise StopForward
            return _on_meta(args, kwargs) if _unloaded(module) else None

        return hook

    inputs = _model_inputs(model)
    hooks = {b: _meta_inputs for s in find_block_lists(model) for b in s.blocks if _unloaded(b)}
    hooks.update({b: recorder(i) for i, b in enumerate(blocks)})
    with module_hooks(hooks, pre=True), _replaced_outputs(previous), _first_block_only(blocks):
        for batch in windows.split(windows_per_batch(windows.shape[1], batch_tokens)):
            try:
                model(**inputs(batch.to(_device(model))))
            except StopForward:
                continue
            raise SparselmError(f"the forward pass never reached the last block of {stack.path}; cannot calibrate it")
    if any(_unloaded(b) for b in blocks):
        _fill_from_previous(captured.extra, stack.path)
    return captured


def _shared_with(before: Any, value: Any) -> Any:
    """`value` with each tensor equal to the one at the same place in `before` (the block's call on the previous
    batch) replaced by that one, so that what every batch passes alike is held once: rotary tables (at 128 windows
    of 2048 tokens and head size 128, 268 MB held per batch instead of 2 MB once), masks, position biases."""
    if isinstance(value, torch.Tensor):
        same = (
            isinstance(before, torch.Tensor) and before is not value and not value.is_meta and not before.is_meta
            and before.shape == value.shape and before.dtype == value.dtype and before.device == value.device
            and torch.equal(before, value)
        )
        return before if same else value
    if isinstance(value, (tuple, list)) and isinstance(before, (tuple, list)) and len(before) == len(value):
        return type(value)(_shared_with(b, v) for b, v in zip(before, value))
    if isinstance(value, dict) and isinstance(before, dict):
        return {k: _shared_with(before.get(k), v) for k, v in value.items()}
    return value


def _unloaded(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


def _on_meta(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return _meta(args), _meta(kwargs)


def _meta_inputs(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _on_meta(args, kwargs)


@contextmanager
def _replaced_outputs(previous: tuple[nn.Module, HeldBatches] | None) -> Iterator[None]:
    """Make a finished stack's unloaded last block return its recorded outputs, batch after batch."""
    if previous is None or not _unloaded(previous[0]):
        yield
        return
    block, outputs = previous
    batches = iter(outputs)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        real = next(batches)
        return (real, *output[1:]) if isinstance(output, (tuple, list)) else real

    with module_hooks({block: hook}):
        yield


def _fill_from_previous(extra: list[list[Call]], path: str) -> None:
    """Replace meta tensors in a block's recorded arguments by the previous block's real ones at the same place."""
    for index in range(1, len(extra)):
        for batch, (args, kwargs) in enumerate(extra[index]):
            before_args, before_kwargs = extra[index - 1][batch]
            args = tuple(_real(v, before_args[i] if i < len(before_args) else None, path) for i, v in enumerate(args))
            kwargs = {k: _real(v, before_kwargs.get(k), path) for k, v in kwargs.items()}
            extra[index][batch] = (args, kwargs)


def _real(value: Any, before: Any, path: str) -> Any:
    if isinstance(value, torch.Tensor) and value.is_meta:
        if not isinstance(before, torch.Tensor) or before.is_meta or before.shape != value.shape:
            raise SparselmError(
                f"the blocks of {path} pass each other values that change from block to block; "
                "this model cannot be pruned block by block from disk, prune it without --max-memory"
            )
        return before
    if isinstance(value, (tuple, list)):
        befores = before if isinstance(before, (tuple, list)) and len(before) == len(value) else [None] * len(value)
        return type(value)(_real(v, b, path) for v, b in zip(value, befores))
    return value


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
    return next(p for p in model.parameters() if not p.is_meta).device


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


def _forward_all(block: nn.Module, calls: Iterable[tuple[torch.Tensor, Call]]) -> list[torch.Tensor]:
    return [hidden_state(block(h, *args, **kwargs)) for h, (args, kwargs) in calls]


def _advance(block: nn.Module, hidden: HeldBatches, extra: list[Call]) -> None:
    """Replace each batch by the block's output on it, batch after batch: one batch's output is held at a time."""
    for i, (args, kwargs) in enumerate(extra):
        hidden[i] = hidden_state(block(hidden[i], *args, **kwargs))


def run_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    visit: Visitor,
    on_block_done: Callable[[BlockRef], None] | None = None,
    read_only: bool = False,
    recover: Recover | None = None,
    batch_tokens: int | None = None,
    stream: BlockStream | None = None,
) -> None:
    """Visit every transformer block in forward order, feeding each the previous block's (pruned) outputs.

    A `read_only` visitor promises not to change the weights, so the outputs of its own `run()` feed the next block
    and each block runs once instead of twice. `recover` (called after `visit`) makes the driver carry the dense
    stream as well and hands each block's batches with their dense targets to it (module docstring). `batch_tokens`
    sets how many tokens go through a block per call (`windows_per_batch`); reconstruction takes one optimiser step
    per batch. A `stream` loads each block before it is used and unloads it after `on_block_done`.
    """
    check_vocab(model, windows)
    with torch.no_grad(), no_cache(model):
        stacks = find_block_lists(model)
        if stream is not None and recover is not None and len(stacks) > 1:
            raise SparselmError(
                "block reconstruction of an encoder-decoder model needs the whole dense model; "
                "drop --max-memory or --reconstruct"
            )
        load = stream.load if stream is not None else lambda _ref: None
        load(BlockRef(stacks[0], 0, stacks[0].blocks[0]))
        dense = None
        capturing = stream.capturing if stream is not None else nullcontext
        if recover is not None:
            with capturing():
                dense = [capture(model, stack, windows, batch_tokens=batch_tokens) for stack in stacks]
        previous = None
        for position, stack in enumerate(stacks):
            if dense is not None and position == 0:  # nothing is pruned yet: the pruned stream starts as the dense
                captured = Captured(hidden=list(dense[0].hidden), extra=dense[0].extra)
            else:
                load(BlockRef(stack, 0, stack.blocks[0]))
                held = stream.held_batches() if stream is not None else None
                with capturing():
                    captured = capture(model, stack, windows, previous, batch_tokens, held)
            hidden = captured.hidden
            keep = read_only and isinstance(hidden, list)  # a read-only visit's outputs feed the next block
            for index, block in enumerate(stack.blocks):
                extra = captured.extra[index]
                ref = BlockRef(stack, index, block)
                load(ref)
                targets = None
                if dense is not None:
                    dense_hidden = dense[position].hidden
                    targets = _forward_all(block, list(zip(dense_hidden, dense[position].extra[index])))
                    dense_hidden[:] = targets
                outputs: list[torch.Tensor] = []

                def run(block: nn.Module = block, extra: list = extra, outputs: list = outputs) -> None:
                    """The block on every batch, for the visitor's hooks; its outputs are kept (to feed the next
                    block) only for a read-only visit, else dropped batch by batch."""
                    if keep:
                        outputs[:] = _forward_all(block, zip(hidden, extra))
                        return
                    for h, (args, kwargs) in zip(hidden, extra):
                        try:
                            block(h, *args, **kwargs)
                        except StopForward:  # a statistics pass had all it needs (`EarlyStop`)
                            if stream is not None:
                                stream.settle()  # the block's own end-of-call hook did not run

                visit(ref, run)
                recovered = None
                if recover is not None and targets is not None:
                    recovered = recover(ref, Batches(list(hidden), list(extra), targets))
                if recovered is not None:
                    hidden[:] = recovered  # type: ignore[index]
                elif keep and outputs:
                    hidden[:] = outputs  # type: ignore[index]
                else:
                    _advance(block, hidden, extra)
                if on_block_done is not None:
                    on_block_done(ref)
                if stream is not None:
                    stream.unload(ref)
            if dense is not None:
                dense[position] = Captured(hidden=[], extra=[])  # this stack's dense stream is no longer needed
            previous = (stack.blocks[-1], hidden) if stream is not None else None
            del captured, hidden


def collect_inputs(
    matrices: list[Matrix], make: Callable[[int], Collector], run: Callable[[], object], block: nn.Module | None = None
) -> dict[str, Collector]:
    """Run a block once (`run`) with hooks feeding each matrix's inputs to a new collector; hooks are then removed.
    With the `block` that `run` calls, each call ends once every matrix had its input (`EarlyStop`)."""
    stats = {m.name: make(m.shape[1]) for m in matrices}
    stop = EarlyStop(stats, block)

    def hook_for(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
            stats[name].add(args[0])
            stop.called(name)

        return record

    with module_hooks({m.module: hook_for(m.name) for m in matrices}, pre=True), stop.watching():
        run()
    return stats


def total_blocks(model: nn.Module) -> int:
    return sum(len(s.blocks) for s in find_block_lists(model))
