"""The weight view: every family's matrices, out × in orientation, labels and prunability."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY, tiny_model
from sparselm.errors import SparselmError
from sparselm.facts import family as model_family
from sparselm.weights import by_block, find_block_lists, iter_matrices, select_matrices, sparsity_of


def test_family_is_detected(family):
    expected = "decoder-only" if family in DECODER_ONLY else "encoder-only" if family in ENCODER_ONLY else "encoder-decoder"
    assert model_family(tiny_model(family)) == expected


def test_blocks_and_prunable_matrices(family):
    model = tiny_model(family)
    lists = find_block_lists(model)
    assert [b.side for b in lists] == (["encoder", "decoder"] if family in ENCODER_DECODER else
                                       ["encoder"] if family in ENCODER_ONLY else ["decoder"])
    assert all(len(b.blocks) == 2 for b in lists)
    prunable = select_matrices(model)
    assert prunable and all(m.prunable and m.block in (0, 1) for m in prunable)
    assert {m.component for m in prunable} == {"attention", "mlp"}
    # every Linear/Conv1D inside a block is covered exactly once
    in_blocks = {
        f"{b.path}.{name}.weight"
        for b in lists
        for name, mod in b.blocks.named_modules()
        if isinstance(mod, (torch.nn.Linear, Conv1D))
    }
    assert {m.name for m in prunable} == in_blocks


def test_cross_attention_is_labelled(family):
    sides = {m.side for m in select_matrices(tiny_model(family))}
    if family in ENCODER_DECODER:
        assert sides == {"encoder", "decoder", "cross-attention"}
    else:
        assert "cross-attention" not in sides


def test_embeddings_only_when_asked(family):
    model = tiny_model(family)
    assert not any(m.component == "embedding" for m in select_matrices(model))
    with_emb = select_matrices(model, include_embeddings=True)
    assert any(m.component == "embedding" and not m.prunable for m in with_emb)


def test_tied_weights_appear_once():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [m.name for m in iter_matrices(model)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_conv1d_is_presented_out_by_in():
    model = tiny_model("gpt2")
    fc = next(m for m in select_matrices(model) if m.name.endswith("mlp.c_fc.weight"))
    assert fc.kind == "conv1d" and fc.module.weight.shape == (32, 128)
    assert fc.shape == (128, 32)  # out × in like nn.Linear(32 → 128)
    x = torch.randn(3, 32)
    assert torch.allclose(fc.module(x), x @ fc.weight().T + fc.module.bias, atol=1e-6)


def test_set_weight_reaches_the_module_in_its_orientation():
    model = tiny_model("gpt2")
    fc = next(m for m in select_matrices(model) if m.name.endswith("mlp.c_fc.weight"))
    new = torch.arange(128 * 32, dtype=torch.float32).reshape(128, 32)
    fc.set_weight(new)
    assert torch.equal(fc.module.weight, new.T)
    fc.weight()[0, 1] = 0.0  # the view writes through
    assert fc.module.weight[1, 0] == 0
    with pytest.raises(ValueError):
        fc.set_weight(new.T)


def test_sparsity_of_counts_exact_zeros():
    model = tiny_model("opt")
    mats = select_matrices(model)
    mats[0].weight().zero_()
    assert sparsity_of(mats) == pytest.approx(mats[0].numel / sum(m.numel for m in mats))


def test_model_without_blocks_has_nothing_to_prune():
    with pytest.raises(SparselmError, match="no Linear/Conv1D"):
        select_matrices(torch.nn.Sequential(torch.nn.Embedding(10, 4)))


def test_matrices_grouped_by_block_name(family):
    model = tiny_model(family)
    groups = by_block(select_matrices(model, include_embeddings=True))
    stacks = find_block_lists(model)
    assert list(groups) == [f"{s.path}.{i}" for s in stacks for i in range(len(s.blocks))]
    for name, mats in groups.items():
        block = model.get_submodule(name)
        inside = {id(module) for module in block.modules()}
        assert all(m.block_name == name and id(m.module) in inside for m in mats)
    outside = [m for m in select_matrices(model, include_embeddings=True) if m.block_name is None]
    assert outside and all(m.block is None for m in outside)
    assert sum(len(v) for v in groups.values()) + len(outside) == len(select_matrices(model, include_embeddings=True))
