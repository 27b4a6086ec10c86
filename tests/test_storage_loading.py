"""Opening a packed directory as a model: nothing written, memory of the dense model plus one tensor, and plain
transformers tools refused loudly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import tiny_model
from sparselm import models
from sparselm.storage import pack
from test_storage import prune_smallest, pruned_dir


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_loading_a_packed_directory_writes_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SPARSELM_CACHE", str(cache))
    src = pruned_dir(tmp_path, "bart")
    pack(src, tmp_path / "packed")
    before = files_under(tmp_path)
    model = models.load(str(tmp_path / "packed"))
    assert files_under(tmp_path) == before and files_under(cache) == set()
    reference = models.load(str(src)).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    assert not any(t.is_meta for t in state.values())


def test_a_head_other_than_the_saved_one_matches_from_pretrained(tmp_path):
    """A BertModel checkpoint opened with a masked-LM head: names gain the `bert.` prefix; the head keeps its
    initialisation (random like from_pretrained's), its decoder tied to the word embeddings."""
    src = tmp_path / "bert"
    prune_smallest(transformers.BertModel(tiny_model("bert").config), 0.8).save_pretrained(src)
    pack(src, tmp_path / "packed")
    model = models.load(str(tmp_path / "packed"), head="masked-lm")
    reference = models.load(str(src), head="masked-lm")
    assert type(model) is type(reference)
    ref_state = reference.state_dict()
    loaded = [k for k in ref_state if k.startswith("bert.")]
    assert loaded and all(torch.equal(model.state_dict()[k], ref_state[k]) for k in loaded)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert not any(t.is_meta for t in model.state_dict().values())


MEASURE = """
import resource, sys
import torch, transformers, sparselm, sparselm.storage
from accelerate import init_empty_weights
mode, path = sys.argv[1:]
if mode == "skeleton":
    with init_empty_weights(include_buffers=False):
        transformers.LlamaForCausalLM._from_config(transformers.AutoConfig.from_pretrained(path))
else:
    sparselm.load(path)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(mode: str, path: Path) -> int:
    """Peak resident bytes of a fresh interpreter that imports torch, transformers and sparselm, then either builds
    the model with empty weights (`skeleton`: everything a load costs but the weights) or loads it (`load`).

    The allocator keeps its defaults: the load itself hands freed decode buffers back (`loading.heap_trimmer`).
    """
    allocator_defaults = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env = {**allocator_defaults, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_of_a_load_is_the_dense_model_plus_a_tenth(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=6, num_key_value_heads=6,
        vocab_size=1024, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = prune_smallest(transformers.LlamaForCausalLM(config), 0.5)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert 90e6 < dense_bytes < 130e6
    model.save_pretrained(tmp_path / "src")
    del model
    pack(tmp_path / "src", tmp_path / "packed", format="bitmask")
    skeleton = peak_rss("skeleton", tmp_path / "src")
    loading = peak_rss("load", tmp_path / "packed")
    assert loading - skeleton < 1.10 * dense_bytes, (loading - skeleton) / dense_bytes


@pytest.mark.slow
def test_lm_eval_refuses_a_packed_directory(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    src = pruned_dir(tmp_path, "llama")
    vocab = {f"t{i}": i for i in range(96)}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")))
    fast.eos_token = "t2"
    fast.save_pretrained(src)
    pack(src, tmp_path / "packed")
    with pytest.raises(ValueError, match=r"sparselm unpack.*sparselm\.load"):
        HFLM(pretrained=str(tmp_path / "packed"), device="cpu", batch_size=1)
