"""Calibration: token windows from a text source, and one block-by-block driver for every architecture.

The driver (`run_blocks`) works on any model whose transformer blocks `sparselm.weights.find_block_lists` finds.
For each stack of blocks (encoder stacks first) it runs the model once per calibration window with forward
pre-hooks that record what each block is called with — positional and keyword arguments alike (attention masks,
rotary position embeddings, T5's position biases, the encoder output for cross-attention) — and stops the forward
with `StopForward` at the last block. Only the first block's hidden states are kept; the other blocks keep just
their extra arguments, which do not depend on the weights being pruned. Blocks are then visited in order: the
visitor collects statistics (by calling `run()`, typically inside hooks) and prunes, after which the driver runs the
block again so the next block is fed the already-pruned outputs. The hidden states are held once and overwritten in
place. For encoder-decoder models the decoder stack is captured after the encoder is pruned, so cross-attention
sees the pruned encoder's output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .data import joined_text, parse_source
from .errors import SparselmError
from .io import atomic_write_bytes
from .models import cache_dir, quiet_transformers
from .weights import BlockList, find_block_lists, model_family

DEFAULT_SEQLEN = 2048
FALLBACK_CONTEXT = 512
MEMORY_FRACTION = 0.5  # of available RAM that held calibration activations may use
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


def model_context(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings allow (relative-position models: a safe default)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def available_memory() -> int:
    """Bytes the kernel says are available (Linux), or a conservative 4 GiB elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def activation_bytes(model: nn.Module, samples: int, seqlen: int) -> int:
    """Held activations (one hidden-state tensor per window, float32) plus one block's working set (~8 more)."""
    per_window = seqlen * hidden_size(model) * 4
    return per_window * samples + per_window * 8


def choose_seqlen(
    model: nn.Module, samples: int, requested: int | None, note: Callable[[str], None], budget: int | None = None
) -> int:
    """`requested`, or min(2048, the model's context); clamped (with a note) when the activations would not fit."""
    context = model_context(model)
    seqlen = requested if requested is not None else min(DEFAULT_SEQLEN, context)
    if seqlen > context:
        raise SparselmError(
            f"--calib-seqlen {seqlen} exceeds the model's context of {context} tokens; use ≤ {context}"
        )
    budget = int(available_memory() * MEMORY_FRACTION) if budget is None else budget
    if activation_bytes(model, samples, seqlen) > budget:
        fit = max(1, budget // (hidden_size(model) * 4 * (samples + 8)))
        note(
            f"calibration seqlen clamped from {seqlen} to {fit}: {samples} windows of {seqlen} tokens would hold "
            f"{activation_bytes(model, samples, seqlen) / 2**30:.1f} GiB of activations "
            f"(budget {budget / 2**30:.1f} GiB)"
        )
        seqlen = int(fit)
    return seqlen


def token_stream(tokenizer: Any, spec: str, split: str = "train") -> torch.Tensor:
    """The source's text for a split, tokenised as one stream (no special tokens), as 1-D int64.

    Tokenising a whole training split takes seconds, so the stream is cached under $SPARSELM_CACHE, keyed by the
    tokenizer's full serialisation and the text itself (fast tokenizers only; others are tokenised every time).
    """
    text = joined_text(parse_source(spec), split)
    path = _stream_cache_path(tokenizer, text)
    if path is not None and path.is_file():
        try:
            return load_file(path)["ids"].long()
        except (OSError, KeyError, SafetensorError):  # a damaged cache entry is rebuilt below
            pass
    with quiet_transformers():  # "sequence longer than the model's maximum": expected, windows are cut from it
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"ids": ids.to(torch.int32)}))  # vocabularies are far below 2**31
    return ids.long()


def _stream_cache_path(tokenizer: Any, text: str) -> Path | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    for runtime_state in ("truncation", "padding"):  # set per call by the tokenizer, not part of its identity
        spec.pop(runtime_state, None)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    digest.update(b"\0" + text.encode())
    return cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.safetensors"


def sample_windows(
    stream: torch.Tensor, samples: int, seqlen: int, seed: int, source: str = "the text"
) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens (samples × seqlen), reproducible from the seed."""
    if samples < 1 or seqlen < 1:
        raise SparselmError(
            "calibration needs at least 1 sample of at least 1 token; raise --calib-samples/--calib-seqlen"
        )
    holds = stream.numel() // seqlen
    if samples > holds:
        raise SparselmError(
            f"{source} holds {stream.numel():,} tokens, only {holds} windows of {seqlen}, but {samples} calibration "
            f"samples were requested; lower --calib-samples or --calib-seqlen, or use a longer text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (samples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


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
    with module_hooks({b: recorder(i) for i, b in enumerate(blocks)}, pre=True):
        for batch in windows.split(windows_per_batch(windows.shape[1])):
            try:
                model(**inputs(batch.to(_device(model))))
            except StopForward:
                continue
            raise SparselmError(f"the forward pass never reached the last block of {stack.path}; cannot calibrate it")
    return captured


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_inputs(model: nn.Module) -> Callable[[torch.Tensor], dict[str, Any]]:
    """Keyword inputs for one window: encoder-decoder models read the same tokens on the decoder side."""
    if model_family(model) == "encoder-decoder":
        return lambda ids: {"input_ids": ids, "decoder_input_ids": ids, "use_cache": False}
    if getattr(model.config, "use_cache", None) is not None and model_family(model) == "decoder-only":
        return lambda ids: {"input_ids": ids, "use_cache": False}
    return lambda ids: {"input_ids": ids}


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _forward_all(block: nn.Module, calls: list[tuple[torch.Tensor, Call]]) -> list[torch.Tensor]:
    return [_first(block(h, *args, **kwargs)) for h, (args, kwargs) in calls]


def run_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    visit: Visitor,
    on_block_done: Callable[[BlockRef], None] | None = None,
    read_only: bool = False,
) -> None:
    """Visit every transformer block in forward order, feeding each the previous block's (pruned) outputs.

    A `read_only` visitor promises not to change the weights, so the outputs of its own `run()` feed the next block
    and each block runs once instead of twice.
    """
    check_vocab(model, windows)
    with torch.no_grad(), no_cache(model):
        for stack in find_block_lists(model):
            captured = capture(model, stack, windows)
            hidden = captured.hidden
            for index, block in enumerate(stack.blocks):
                calls = list(zip(hidden, captured.extra[index]))
                ref = BlockRef(stack, index, block)
                outputs: list[torch.Tensor] = []

                def run(block: nn.Module = block, calls: list = calls, outputs: list = outputs) -> list[torch.Tensor]:
                    outputs[:] = _forward_all(block, calls)
                    return outputs

                visit(ref, run)
                hidden[:] = outputs if read_only and outputs else _forward_all(block, calls)
                if on_block_done is not None:
                    on_block_done(ref)
            del captured, hidden


def total_blocks(model: nn.Module) -> int:
    return sum(len(s.blocks) for s in find_block_lists(model))
