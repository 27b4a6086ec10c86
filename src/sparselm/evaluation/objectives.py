"""Which language-modelling head scores which model family (a causal-LM score fits decoders only).

* decoder-only: the model's own causal-LM head;
* encoder-only: the family's `*ForCausalLM` class with `is_decoder=True` (causal attention mask). The encoder was
  trained bidirectionally and `finetune` refuses to train it as a causal LM, so this number is a curiosity, noted
  as such; `mlm` is the measure that fits;
* encoder-decoder: the family's `*ForCausalLM` decoder (Pegasus, BART: the decoder alone, cross-attention skipped);
  families without one (T5) get a clear message;
* `mlm` (encoders only): the masked-LM head, the pre-training-faithful measure (`mlm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .. import facts
from ..errors import SparselmError
from ..models import load_tokenizer, load_with_source
from ..sources import resolve

Objective = Literal["clm", "mlm"]
OBJECTIVES: tuple[str, ...] = ("clm", "mlm")
CAUSAL_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
MASKED_HEAD_SUFFIXES = ("ForMaskedLM", "ForPreTraining")


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: Any
    family: str
    head: str
    quantized_from: str | None
    notes: list[str] = field(default_factory=list)


def load_language_model(
    model_or_dir: str, objective: Objective = "clm", offload: dict[str, Any] | None = None
) -> LanguageModel:
    """The model with the head that scores `objective` for its family, its tokenizer, and notes for the reader.

    `offload` (`models.offload_kwargs`) loads it for accelerate's big-model inference (weights offloaded)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if objective not in OBJECTIVES:
        raise SparselmError(f"unknown objective '{objective}'; use clm or mlm")
    source = resolve(model_or_dir)
    config = AutoConfig.from_pretrained(source.path)
    family = facts.family(config)
    archs = getattr(config, "architectures", None) or []
    notes: list[str] = []
    if objective == "mlm":
        if family != "encoder-only":
            raise SparselmError(
                f"--objective mlm needs an encoder-only (BERT-like) model; '{model_or_dir}' is {family}: use --objective clm"
            )
        head, overrides = "masked-lm", {}
        if not any(a.endswith(MASKED_HEAD_SUFFIXES) for a in archs):
            notes.append("the checkpoint has no masked-LM head weights: the head is newly initialised, so mlm_ppl "
                         "measures an untrained head")
    else:
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise SparselmError(
                f"{config.model_type} has no causal-LM (*ForCausalLM) class in transformers, so '{model_or_dir}' has no "
                "causal perplexity; evaluate it on a classification task (e.g. --task wiki-pair)"
                + (" or with --objective mlm" if family == "encoder-only" else "")
            )
        head = "causal-lm"
        overrides = {"is_decoder": True} if family == "encoder-only" else {}
        if family == "encoder-only":
            notes.append("encoder-only model scored through a causal-LM head (is_decoder=True) it was not trained for "
                         "(sparselm does not fine-tune encoders as causal LMs): the number is no language-modelling "
                         "quality; --objective mlm measures it as it was trained")
        elif family == "encoder-decoder":
            notes.append(f"encoder-decoder model scored through its decoder alone ({MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]}, no encoder input)")
        if not any(a.endswith(CAUSAL_HEAD_SUFFIXES) for a in archs) and family != "encoder-only":
            notes.append("the checkpoint has no LM head weights of its own: the head is newly initialised or tied")
    if family == "encoder-decoder" and not any(a.endswith("ForCausalLM") for a in archs):
        if offload:
            raise SparselmError("--max-memory evaluates decoder-only and encoder models; drop it for this model")
        seq2seq, source = load_with_source(model_or_dir, head="seq2seq-lm")
        model = decoder_as_causal_lm(seq2seq)
    else:
        model, source = load_with_source(model_or_dir, head=head, config_overrides=overrides, **(offload or {}))
    tokenizer = load_text_tokenizer(model_or_dir)
    return LanguageModel(model, tokenizer, family, head, source.quantized_from, notes)


def decoder_as_causal_lm(seq2seq: nn.Module) -> nn.Module:
    """The family's *ForCausalLM holding the decoder and LM head of an encoder-decoder model.

    Loading the *ForCausalLM class straight from a seq2seq checkpoint would leave its embeddings newly initialised
    (the checkpoint stores them as the shared `model.shared`), so the trained tensors are copied over explicitly.
    """
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_config(seq2seq.config, dtype=next(seq2seq.parameters()).dtype)
    causal.get_decoder().load_state_dict(seq2seq.get_decoder().state_dict())
    with torch.no_grad():
        causal.get_output_embeddings().weight.copy_(seq2seq.get_output_embeddings().weight)
    return causal.eval()


def load_text_tokenizer(model_or_dir: str) -> Any:
    """The model's tokenizer, or a clear message when the directory has none."""
    tokenizer = load_tokenizer(model_or_dir, required=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
