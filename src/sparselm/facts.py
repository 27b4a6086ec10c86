"""Facts about a model that several parts of sparselm need, each decided here and nowhere else.

Every function takes a model or its config (`config_or_model`), so callers that hold only a config (loaders deciding
which head to build) and callers that hold a model (calibration, evaluation, the runtime) read the same answer. The
file names sparselm writes into model directories are constants here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import SparselmError

Family = Literal["decoder-only", "encoder-only", "encoder-decoder"]

CONFIG_JSON = "config.json"
SPARSITY_JSON = "sparsity.json"
FINETUNE_JSON = "finetune.json"
PROVENANCE_JSON = "provenance.json"
STATS_JSON = "stats.json"

POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
# Families whose learned position ids start after the padding index: the table holds padding_idx + 1 unusable rows.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")
# Files any Hugging Face tokenizer is saved with (at least one of them).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model", "special_tokens_map.json",
)


def config_of(config_or_model: Any) -> Any:
    """The (text) config of a model or of a config: multimodal configs answer with their text part."""
    config = config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model
    if config is None:
        raise SparselmError(f"{type(config_or_model).__name__} has no Hugging Face config; pass a transformers model")
    return getattr(config, "get_text_config", lambda: config)()


def context_length(config_or_model: Any) -> int | None:
    """The longest token sequence the model's position table accepts, or None when positions are relative.

    RoBERTa-like families number positions from padding_idx + 1, so their usable context is
    max_position_embeddings − padding_idx − 1 (514 − 1 − 1 = 512 for roberta-base).
    """
    config = config_of(config_or_model)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in PADDING_OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def hidden_size(config_or_model: Any) -> int:
    """The width of the model's hidden states (the input size of its first block)."""
    config = config_of(config_or_model)
    for key in HIDDEN_SIZE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise SparselmError(
        f"cannot tell the hidden size of a {getattr(config, 'model_type', type(config).__name__)} model "
        f"(its config has none of {', '.join(HIDDEN_SIZE_KEYS)})"
    )


def family(config_or_model: Any) -> Family:
    """decoder-only, encoder-only or encoder-decoder, from the config rather than the class name.

    A plain torch module without a config has no encoder stack to tell apart, so it counts as decoder-only.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if isinstance(config_or_model, nn.Module) and getattr(config_or_model, "config", None) is None:
        return "decoder-only"
    config = config_of(config_or_model)
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder-only"
    return "decoder-only"


def causal_lm_classes(config_or_model: Any) -> tuple[str, ...]:
    """Names of the family's causal-LM classes in transformers (empty when it has none, e.g. T5)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config_of(config_or_model), "model_type", ""), ())
    return (names,) if isinstance(names, str) else tuple(names)


def is_causal_lm(config_or_model: Any) -> bool:
    """Whether this is a left-to-right language model: a model by the class it was loaded as, a config by the
    classes its checkpoint declares in `architectures` or, without any, by being a decoder-only family with a
    causal-LM class. An encoder's config is not, although transformers can give it a causal head
    (BertLMHeadModel): its checkpoint was trained bidirectionally and generates junk."""
    classes = causal_lm_classes(config_or_model)
    if isinstance(config_or_model, nn.Module):
        return type(config_or_model).__name__ in classes
    architectures = getattr(config_of(config_or_model), "architectures", None)
    if architectures:
        return any(a in classes for a in architectures)
    return bool(classes) and family(config_or_model) == "decoder-only"


def trains_as_causal_lm(config_or_model: Any) -> bool:
    """Whether next-token training makes sense: a family with a causal-LM class that is not an encoder (decoder-only
    models, and the decoders of encoder-decoders such as BART, which transformers loads as XForCausalLM)."""
    return bool(causal_lm_classes(config_or_model)) and family(config_or_model) != "encoder-only"


def has_tokenizer(directory: Path) -> bool:
    """Whether a model directory holds any tokenizer file."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and inference mode for the duration, then the model's own training flag back."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes of a size such as 200MB, 1.5GB, 2GiB or 512000 (decimal units; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise SparselmError(f"{option} '{text}' is not a size; give a positive number with a unit, e.g. 200MB or 2GB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def format_size(n: int) -> str:
    """A byte count the way --max-memory reads it (MB below 10 GB, else GB), rounded up so it always suffices."""
    if n < 10 * 10**9:
        return f"{-(-n // 10**6)}MB"
    return f"{-(-n // 10**8) / 10:g}GB"
