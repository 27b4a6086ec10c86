"""Model inputs the runtime builds itself: one prefill forward of random token ids, for timing and tracing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..facts import is_causal_lm


def forward_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Inputs for one prefill forward: last-position logits for causal LMs, one decoder token for seq2seq."""
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = input_ids[:, :1]
    elif is_causal_lm(model):
        kwargs.update(use_cache=True, logits_to_keep=1)
    return kwargs


def random_prefill(model: nn.Module, tokens: int, generator: torch.Generator | None = None) -> dict[str, Any]:
    """forward_kwargs for `tokens` random ids (never the first three, which are often special tokens)."""
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=generator)
    return forward_kwargs(model, ids.to(device))
