"""Masked-LM perplexity for encoders, with a fixed masking seed.

The text is tokenised once without special tokens and cut into non-overlapping windows that, with the tokenizer's
own special tokens around them ([CLS] … [SEP]), are `seqlen` long; the remainder is dropped. In every window 15% of
the text tokens (rounded, at least one) are chosen with a `torch.Generator` seeded with `seed`, as BERT's
pre-training chooses them, and all of them are replaced by [MASK]: the 80/10/10 mask/random/keep corruption of
pre-training is a training regulariser, and scoring corrupted-but-visible tokens would leak the answer.
mlm_ppl = exp(mean NLL of the masked tokens). Numbers are comparable only at the same seqlen, fraction and seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import input_device
from ..errors import SparselmError
from ..progress import SILENT, Progress
from .loop import forward_batches
from .perplexity import find_run, resolve_seqlen, window_logits_batch

MASK_FRACTION = 0.15


@dataclass(frozen=True)
class MaskedPerplexity:
    """mlm_ppl and the windows, masked tokens, fraction and seed it was measured with."""

    mlm_ppl: float
    seqlen: int
    windows: int
    windows_available: int
    masked_tokens: int
    mask_fraction: float
    mask_seed: int
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def masked_windows(
    tokenizer: Any, text: str, seqlen: int, max_windows: int | None, seed: int, fraction: float = MASK_FRACTION
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(masked inputs, labels with -100 at unmasked positions, windows available) for the text."""
    if tokenizer.mask_token_id is None:
        raise SparselmError("the tokenizer has no [MASK] token, so masked-LM perplexity cannot be measured")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    prefix, suffix = special_wrapping(tokenizer)
    body = seqlen - len(prefix) - len(suffix)
    if body < 1:
        raise SparselmError(f"--seqlen {seqlen} leaves no room for text between the special tokens; raise it")
    available = len(ids) // body
    if available == 0:
        raise SparselmError(f"the text has {len(ids)} tokens, fewer than one window of {body}; use a smaller --seqlen")
    windows = available if max_windows is None else min(available, max_windows)
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = [], []
    for w in range(windows):
        chunk = ids[w * body : (w + 1) * body]
        full = torch.tensor(prefix + chunk + suffix, dtype=torch.long)
        chosen = torch.randperm(body, generator=generator)[: max(1, round(fraction * body))] + len(prefix)
        label = torch.full_like(full, -100)
        label[chosen] = full[chosen]
        full[chosen] = tokenizer.mask_token_id
        inputs.append(full)
        labels.append(label)
    return torch.stack(inputs), torch.stack(labels), available


def special_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (e.g. [CLS] and [SEP])."""
    full = tokenizer("a", return_attention_mask=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, return_attention_mask=False)["input_ids"]
    start = find_run(full, plain)
    return full[:start], full[start + len(plain) :]


def masked_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    seqlen: int | None,
    max_windows: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: Progress = SILENT,
) -> MaskedPerplexity:
    """mlm_ppl of a masked-LM model on the text; the model is not modified (its train/eval mode is restored)."""
    seqlen = resolve_seqlen(model, seqlen)
    inputs, labels, available = masked_windows(tokenizer, text, seqlen, max_windows, seed)
    micro = window_logits_batch(seqlen, model.get_output_embeddings().weight.shape[0], batch_size)
    device = input_device(model)
    total, count = 0.0, 0
    stage = f"masked-LM perplexity ({len(inputs)}×{seqlen})"
    for batch in forward_batches(model, len(inputs), micro, stage, progress):
        x, y = inputs[batch].to(device), labels[batch].to(device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += int((y != -100).sum())
    return MaskedPerplexity(
        mlm_ppl=math.exp(total / count),
        seqlen=seqlen,
        windows=len(inputs),
        windows_available=available,
        masked_tokens=count,
        mask_fraction=MASK_FRACTION,
        mask_seed=seed,
        batch_size=micro,
    )
