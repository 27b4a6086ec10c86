"""Tiny random models of every family, built locally from configs (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

VOCAB = 96
FAMILIES = ["gpt2", "opt", "llama", "bert", "roberta", "bart", "t5", "pegasus"]
DECODER_ONLY = ["gpt2", "opt", "llama"]
ENCODER_ONLY = ["bert", "roberta"]
ENCODER_DECODER = ["bart", "t5", "pegasus"]


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-block config of the family with hidden size 32 and input sizes divisible by 8."""
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=128,
            word_embed_proj_dim=32, **common,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, **common,
        )
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, **common,
        )
    if family == "roberta":
        return transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=130, pad_token_id=1, **common,
        )
    if family == "bart":
        return transformers.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, **common,
        )
    if family == "t5":
        return transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
            **common,
        )
    if family == "pegasus":
        return transformers.PegasusConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, decoder_start_token_id=0, **common,
        )
    raise ValueError(family)


def tiny_model(family: str, head: str = "auto", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of the family; `auto` gives the family's LM head (causal, masked or seq2seq)."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    if head == "auto":
        head = "causal-lm" if family in DECODER_ONLY else "masked-lm" if family in ENCODER_ONLY else "seq2seq-lm"
    cls = {
        "base": transformers.AutoModel,
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[head]
    return cls.from_config(config).eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(tmp_path: Path):
    """Save a tiny model of a family as a local directory and return its path."""

    def make(family: str, head: str = "auto", seed: int = 0) -> Path:
        out = tmp_path / f"tiny-{family}-{head}"
        tiny_model(family, head, seed).save_pretrained(out)
        return out

    return make


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Share one sparselm cache per test session (the smollm2 fp32 conversion is done once)."""
    shared = os.environ.get("SPARSELM_CACHE") or str(tmp_path_factory.getbasetemp().parent / "sparselm-cache")
    monkeypatch.setenv("SPARSELM_CACHE", shared)
