"""Loading models and tokenizers: local directories, embedded aliases, tokenizers required or not."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from evaluation_fixtures import tiny_tokenizer

import sparselm.models as models
import sparselm.sources as sources
from sparselm.errors import SparselmError


def test_local_directory_loads_with_its_architecture(tiny_dir):
    path = tiny_dir("gpt2")
    model = models.load(str(path))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not model.training
    base = models.load(str(path), head="base")
    assert type(base).__name__ == "GPT2Model"


@pytest.mark.slow
def test_embedded_minilm_loads_offline():
    model, source = models.load_with_source("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert source.quantized_from is None
    assert sum(p.numel() for p in model.parameters()) == sources.EMBEDDED["minilm-l6"].parameters


@pytest.mark.slow
def test_embedded_smollm2_is_cached_as_fp32_safetensors():
    model, source = models.load_with_source("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert source.quantized_from == "GGUF Q4_1"
    assert (source.path / "model.safetensors").exists()
    assert json.loads((source.path / "provenance.json").read_text())["quantized_from"] == "GGUF Q4_1"
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == sources.EMBEDDED["smollm2-135m"].parameters
    assert models.load_tokenizer("smollm2-135m")("hello world")["input_ids"]


def test_load_tokenizer_required_or_not(tmp_path):
    bare = tmp_path / "bare"
    tiny_model("gpt2").save_pretrained(bare)
    assert models.load_tokenizer(str(bare), required=False) is None
    with pytest.raises(SparselmError, match="has no tokenizer.*save_pretrained"):
        models.load_tokenizer(str(bare), required=True)

    full = tmp_path / "full"
    tiny_model("gpt2").save_pretrained(full)
    tiny_tokenizer("gpt2").save_pretrained(full)
    for required in (True, False):
        tok = models.load_tokenizer(str(full), required=required)
        assert tok("ab")["input_ids"] == tiny_tokenizer("gpt2")("ab")["input_ids"]


def test_a_broken_tokenizer_is_never_swallowed(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    for required in (True, False):
        with pytest.raises(SparselmError, match="cannot be loaded"):
            models.load_tokenizer(str(tmp_path), required=required)
