"""Mask-keeping fine-tuning: pruned weights, their gradients and optimizer state stay exactly zero."""

from __future__ import annotations

import json

import pytest
import torch
from evaluation_fixtures import SAMPLE, save_tiny, tiny_lm

from sparselm.errors import SparselmError
from sparselm.evaluation import evaluate
from sparselm.finetune import MaskKeeper, finetune, make_optimizer
from sparselm.models import load, read_provenance
from sparselm.weights import select_matrices


def prune_half(model: torch.nn.Module) -> torch.nn.Module:
    """Zero the smaller half of |w| in every block matrix (a plain layer-wise magnitude prune)."""
    with torch.no_grad():
        for matrix in select_matrices(model):
            w = matrix.weight()
            w[w.abs() <= w.abs().flatten().median()] = 0
    return model


def zero_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {m.name: (m.weight() == 0).clone() for m in select_matrices(model)}


def pruned_dir(tmp_path, family: str, head: str = "auto"):
    out = save_tiny(tmp_path / f"{family}-dense", family, head)
    model = load(str(out))
    prune_half(model).save_pretrained(out)
    return out


@pytest.mark.parametrize(("family", "optimizer"), [("llama", "adamw"), ("llama", "sgd"), ("bert", "sgd")])
def test_sparsity_is_identical_after_finetuning(tmp_path, family, optimizer):
    src = pruned_dir(tmp_path, family)
    before = zero_masks(load(str(src)))
    out = tmp_path / "ft"
    report = finetune(str(src), "wiki-pair", out, max_steps=4, batch_size=4, max_examples=16, optimizer=optimizer, lr=1e-2)
    assert report["sparsity_identical"] and report["steps"] == 4
    assert report["sparsity_before"] == report["sparsity_after"]
    assert report["masked_matrices"] >= len(before)
    tuned = load(str(out))
    after = zero_masks(tuned)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    original = {m.name: m.weight().clone() for m in select_matrices(load(str(src)))}
    assert any(not torch.equal(original[m.name], m.weight()) for m in select_matrices(tuned))  # it did train
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["sparsity_before"] == saved["sparsity_after"] and saved["settings"]["optimizer"] == optimizer
    assert read_provenance(out)["finetuned_task"] == "wiki-pair"


def test_without_the_keeper_training_revives_pruned_weights():
    """The negative control: a plain AdamW step on a pruned model moves its zeros."""
    model = prune_half(tiny_lm("llama", "causal-lm"))
    before = zero_masks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(5, 96, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in zero_masks(model).items())


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_keeper_zeroes_gradients_and_stale_optimizer_state(name):
    model = tiny_lm("llama", "causal-lm")
    opt = make_optimizer(model, name, 1e-2)
    ids = torch.randint(5, 96, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # dense step: every entry now has momentum
    opt.zero_grad()
    prune_half(model)
    keeper = MaskKeeper(model)
    with keeper.attached(opt):
        keeper.apply(opt)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            for _, param, keep in keeper.masks:
                assert not param.grad[~keep].any()
            opt.step()
            opt.zero_grad()
    for _, param, keep in keeper.masks:
        assert not param[~keep].any()
        for value in opt.state[param].values():
            if torch.is_tensor(value) and value.shape == param.shape:
                assert not value[~keep].any()


def test_keeper_writes_positive_zeros_even_over_infinities():
    model = prune_half(tiny_lm("llama", "causal-lm"))
    keeper = MaskKeeper(model)
    _, param, keep = keeper.masks[0]
    with torch.no_grad():
        leaked = param.detach().clone()
        leaked[~keep] = -1.0
        leaked.view(-1)[(~keep).view(-1).nonzero()[0]] = float("-inf")
        param.copy_(leaked)
    keeper.apply()
    pruned = param.detach()[~keep]
    assert torch.equal(pruned, torch.zeros_like(pruned)) and not pruned.signbit().any()
    assert torch.equal(param.detach()[keep], leaked[keep])


@pytest.mark.parametrize("family", ["bart", "pegasus", "t5"])
def test_finetune_covers_every_head_kind(tmp_path, family):
    src = pruned_dir(tmp_path, family)
    report = finetune(str(src), "wiki-topic", tmp_path / "ft", max_steps=2, batch_size=4, max_examples=8)
    assert report["sparsity_identical"]
    result = evaluate(str(tmp_path / "ft"), "wiki-topic", max_examples=8)
    assert result["settings"]["head_trained"] and not result["notes"]
    assert result["sparsity"] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("family", ["llama", "bert", "bart"])
def test_causal_lm_finetuning_on_a_text_file(tmp_path, family):
    src = pruned_dir(tmp_path, family)
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE)
    report = finetune(str(src), f"text:{text}", tmp_path / "ft", max_steps=3, batch_size=2, seqlen=32)
    assert report["sparsity_identical"] and report["settings"]["seqlen"] == 32
    result = evaluate(str(tmp_path / "ft"), f"text:{text}", seqlen=32)
    assert result["token_ppl"] > 1
    if family == "bert":
        assert "fine-tuned on text:" in result["notes"][0]


def test_bad_budget_and_failures_leave_nothing(tmp_path):
    src = save_tiny(tmp_path / "m", "gpt2")
    with pytest.raises(SparselmError, match="--epochs"):
        finetune(str(src), "wiki-pair", tmp_path / "out", epochs=0)
    with pytest.raises(SparselmError, match="unknown task"):
        finetune(str(src), "nope", tmp_path / "out")
    with pytest.raises(SparselmError, match="unknown optimizer"):
        finetune(str(src), "wiki-pair", tmp_path / "out", optimizer="lion")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
