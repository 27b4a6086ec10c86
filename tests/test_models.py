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


def test_checkpoint_write_copies_unchanged_tensors_in_slices_and_safetensors_reads_them(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    source = {
        "embed": torch.randn(37, 5).to(torch.bfloat16),  # floating: written as float32, like Checkpoint.read
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),  # not floating: kept as stored
        "scale": torch.tensor(2.5),  # 0-dim
        "norm": torch.randn(7),
    }
    save_file(source, tmp_path / models.SINGLE)
    checkpoint = models.Checkpoint.open(tmp_path, "src")
    held = {"norm": torch.randn(7)}  # changed in memory: written from there
    monkeypatch.setattr(models, "COPY_BYTES", 3 * 5 * 4)  # three rows of the embedding per slice
    slices: list[tuple[int, ...]] = []
    parts = models.Checkpoint._parts
    monkeypatch.setattr(models.Checkpoint, "_parts", lambda self, n, h: (
        slices.append(tuple(p.shape)) or p for p in parts(self, n, h)))
    written = checkpoint.write(tmp_path / "out.safetensors", ["embed", "ids", "scale", "norm"], held)
    back = load_file(tmp_path / "out.safetensors")
    assert torch.equal(back["embed"], source["embed"].float()) and back["embed"].dtype == torch.float32
    assert torch.equal(back["ids"], source["ids"]) and torch.equal(back["scale"], source["scale"])
    assert torch.equal(back["norm"], held["norm"])
    assert written == (37 * 5 + 1 + 7) * 4 + 12 * 8
    assert slices[:13] == [(3, 5)] * 12 + [(1, 5)]  # the embedding never read whole
    with safe_open(tmp_path / "out.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_checkpoint_rows_reads_only_the_asked_rows_as_load_gives_them(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    table = torch.randn(50, 6).to(torch.bfloat16)
    ids = torch.arange(20, dtype=torch.int32).reshape(10, 2)
    save_file({"a.table": table, "b.ids": ids}, tmp_path / models.SINGLE)
    checkpoint = models.Checkpoint.open(tmp_path, "src")
    wanted = [0, 1, 2, 7, 30, 31, 49]  # runs of consecutive rows and single ones, both ends of the table
    got = checkpoint.rows("a.table", wanted, torch.device("cpu"))
    assert got.dtype == torch.float32 and torch.equal(got, table.float()[wanted])
    assert torch.equal(checkpoint.rows("b.ids", [3, 9], torch.device("cpu")), ids[[3, 9]])
    assert checkpoint.rows("a.table", [], torch.device("cpu")).shape == (0, 6)
