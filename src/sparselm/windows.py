"""Calibration windows: random token windows cut from a text source's training split, sized to fit the model.

The model's usable context (`facts.context_length`) bounds the window length; the activations the block driver will
hold bound it too, so a long default is shortened (with a note) rather than exhausting memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .data import joined_text, parse_source
from .errors import SparselmError
from .facts import context_length, hidden_size
from .io import atomic_write_bytes
from .models import quiet_transformers
from .sources import cache_dir

DEFAULT_SEQLEN = 2048
UNBOUNDED_DEFAULT = 512  # relative-position models (T5) accept any length; they were trained on 512-token inputs
MEMORY_FRACTION = 0.5  # of available RAM that held calibration activations may use
WORKING_WINDOWS = 8  # a block's working set while it runs, in windows of hidden states
CALIBRATION_SPLIT = "train"


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


def window_bytes(model: nn.Module, seqlen: int) -> int:
    """One window's hidden states in float32."""
    return seqlen * hidden_size(model) * 4


def activation_bytes(model: nn.Module, samples: int, seqlen: int) -> int:
    """Held activations (one hidden-state tensor per window, float32) plus one block's working set."""
    return window_bytes(model, seqlen) * (samples + WORKING_WINDOWS)


def choose_seqlen(
    model: nn.Module, samples: int, requested: int | None, note: Callable[[str], None], budget: int | None = None
) -> int:
    """`requested`, or min(2048, the model's context); clamped (with a note) when the activations would not fit."""
    context = context_length(model)
    seqlen = requested if requested is not None else min(DEFAULT_SEQLEN, context or UNBOUNDED_DEFAULT)
    if context is not None and seqlen > context:
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
    """`samples` random windows of `seqlen` tokens (samples × seqlen), reproducible from `seed`."""
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


def calibration_windows(
    model: nn.Module, tokenizer: Any, source: str, samples: int, seqlen: int | None, seed: int,
    note: Callable[[str], None],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`samples` windows of the source's training split for this model, and what describes them in sparsity.json."""
    seqlen = choose_seqlen(model, samples, seqlen, note)
    stream = token_stream(tokenizer, source, CALIBRATION_SPLIT)
    windows = sample_windows(stream, samples, seqlen, seed, f"{source} {CALIBRATION_SPLIT}")
    info = {
        "source": source,
        "split": CALIBRATION_SPLIT,
        "samples": samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens_in_text": int(stream.numel()),
    }
    return windows, info
