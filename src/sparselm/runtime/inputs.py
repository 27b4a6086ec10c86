"""Model inputs the runtime builds itself: one prefill forward of random token ids, for timing and tracing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_causal_lm(config_or_model: Any) -> bool:
    """Whether this is a left-to-right language model: a model by the class it was loaded as, a config by its
    architectures (without any: a decoder-only model type). An encoder's config is not, although transformers can
    load it with a causal head (BertLMHeadModel): its checkpoint was trained bidirectionally and generates junk.
    (Local until sparselm.facts.is_causal_lm lands; then this becomes a call to it.)"""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = getattr(config_or_model, "config", config_or_model)
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ())
    names = (names,) if isinstance(names, str) else tuple(names)
    if isinstance(config_or_model, nn.Module):
        return type(config_or_model).__name__ in names
    if getattr(config, "is_encoder_decoder", False):
        return False
    architectures = getattr(config, "architectures", None)
    if architectures:
        return any(a in names for a in architectures)
    return bool(names) and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


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
