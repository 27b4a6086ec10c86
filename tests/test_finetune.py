"""Mask-keeping fine-tuning: pruned weights, their gradients and optimizer state stay exactly zero."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from evaluation_fixtures import SAMPLE, predictions_one_by_one, save_tiny, spy_on, state_of, tiny_lm
from test_perplexity import sparsegpt_token_ppl

import sparselm
from sparselm import finetune as finetune_module
from sparselm.errors import SparselmError
from sparselm.evaluation import evaluate
from sparselm.evaluation import run as run_module
from sparselm.finetune import MaskKeeper, SparsityCallback, finetune, make_optimizer
from sparselm.models import load
from sparselm.sources import read_provenance
from sparselm.weights import select_matrices


def prune_half(model: torch.nn.Module) -> torch.nn.Module:
    """Zero the smaller half of |w| in every block matrix (a plain layer-wise magnitude prune)."""
    with torch.no_grad():
        for matrix in select_matrices(model):
            w = matrix.weight()
            w[w.abs() <= w.abs().flatten().median()] = 0
    return model


def zero_masks(model: torch.nn.Module, include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Where each block matrix (with `include_embeddings`, every weight matrix) holds an exact zero."""
    return {m.name: (m.weight() == 0).clone() for m in select_matrices(model, include_embeddings)}


def masked_names(zeros: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, where in zeros.items() if where.any()}


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
    assert report.sparsity_identical and report.steps == 4
    assert report.sparsity_before == report.sparsity_after
    assert report.masked_matrices >= len(before)
    tuned = load(str(out))
    after = zero_masks(tuned)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    original = {m.name: m.weight().clone() for m in select_matrices(load(str(src)))}
    assert any(not torch.equal(original[m.name], m.weight()) for m in select_matrices(tuned))  # it did train
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["sparsity_before"] == saved["sparsity_after"] and saved["settings"]["optimizer"] == optimizer
    assert read_provenance(out)["finetuned_task"] == "wiki-pair"
    tuned_everywhere = zero_masks(tuned, include_embeddings=True)  # the classifier: its head is not the source's
    everywhere = {k: v for k, v in zero_masks(load(str(src)), include_embeddings=True).items() if k in tuned_everywhere}
    assert report.masked_matrices == len(masked_names(everywhere))  # the pruned ones + embeddings' padding rows
    assert all(report.sparsity_after[k]["zeros"] == int(everywhere[k].sum()) for k in everywhere)
    assert all(torch.equal(everywhere[k], tuned_everywhere[k]) for k in everywhere)


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
def test_finetune_covers_every_head_kind(tmp_path, family, monkeypatch):
    """The evaluated classifier is the trained one, weight for weight, and its accuracy is recomputed from logits."""
    src = pruned_dir(tmp_path, family)
    saves = spy_on(monkeypatch, finetune_module, "_save")
    report = finetune(str(src), "wiki-topic", tmp_path / "ft", max_steps=2, batch_size=4, max_examples=8, lr=1e-2)
    assert report.sparsity_identical
    trained = state_of(saves[0]["args"][0])
    scored = spy_on(monkeypatch, run_module, "classify")
    result = evaluate(str(tmp_path / "ft"), "wiki-topic", max_examples=8)
    assert result.settings["head_trained"] and not result.notes
    assert result.sparsity == pytest.approx(0.5, abs=0.05)
    evaluated_model, tokenizer, examples = scored[0]["args"][:3]
    evaluated = state_of(evaluated_model)
    assert evaluated.keys() == trained.keys()
    assert all(torch.equal(evaluated[k], trained[k]) for k in trained)
    untrained = state_of(scored_model(monkeypatch, src))  # the same source with a fresh head (seed 0)
    head = [k for k in trained if k in untrained and not torch.equal(trained[k], untrained[k])]
    assert any("classif" in k for k in head)  # the head itself moved in training
    predictions = predictions_one_by_one(evaluated_model, tokenizer, examples)
    assert result.metrics.accuracy == sum(p == ex.label for p, ex in zip(predictions, examples, strict=True)) / 8
    assert result.metrics.examples == len(examples) == 8


def scored_model(monkeypatch, model_dir) -> torch.nn.Module:
    scored = spy_on(monkeypatch, run_module, "classify")
    evaluate(str(model_dir), "wiki-topic", max_examples=8)
    return scored[0]["args"][0]


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_causal_lm_finetuning_on_a_text_file(tmp_path, family):
    src = pruned_dir(tmp_path, family)
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE)
    before = zero_masks(load(str(src)))
    report = finetune(str(src), f"text:{text}", tmp_path / "ft", max_steps=3, batch_size=2, seqlen=32, lr=1e-2)
    assert report.sparsity_identical and report.settings["seqlen"] == 32
    result = evaluate(str(tmp_path / "ft"), f"text:{text}", seqlen=32)
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ft")
    assert result.metrics.token_ppl == pytest.approx(sparsegpt_token_ppl(saved, tok, SAMPLE, 32), rel=1e-5)
    assert result.metrics.token_ppl != pytest.approx(evaluate(str(src), f"text:{text}", seqlen=32).metrics.token_ppl, rel=1e-4)
    after = {m.name: (m.weight() == 0) for m in select_matrices(saved)}
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)
    assert sum(k in after for k in before) >= 8  # the decoder's matrices are all there (BART: decoder alone)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoders_are_refused_as_causal_lms_before_loading(tmp_path, family, monkeypatch):
    src = save_tiny(tmp_path / family, family)
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE)
    loads = spy_on(monkeypatch, finetune_module, "_prepare")
    with pytest.raises(SparselmError, match=r"encoder-only .*not a causal LM.*--task wiki-pair"):
        finetune(str(src), f"text:{text}", tmp_path / "out", max_steps=1)
    assert not loads and not (tmp_path / "out").exists()


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


def pruned_lm_with_embedding_zeros() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny Llama with half of every block matrix and a third of the input embedding pruned; its zero positions."""
    model = prune_half(tiny_lm("llama", "causal-lm"))
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[torch.rand(embedding.shape, generator=torch.Generator().manual_seed(1)) < 1 / 3] = 0
    return model, zero_masks(model, include_embeddings=True)


def user_trainer(model, tmp_path, callbacks, steps: int = 4) -> transformers.Trainer:
    """A Trainer as a user would build it: no optimizer given (the Trainer makes its AdamW), a large lr, decay."""
    ids = torch.randint(5, 96, (16, 24), generator=torch.Generator().manual_seed(2))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
        weight_decay=0.1, gradient_accumulation_steps=2, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)


def test_sparsity_callback_keeps_the_mask_on_a_user_built_trainer(tmp_path):
    model, pruned = pruned_lm_with_embedding_zeros()
    start = {m.name: m.weight().clone() for m in select_matrices(model, include_embeddings=True)}
    callback = sparselm.SparsityCallback()
    trainer = user_trainer(model, tmp_path, [callback])
    assert trainer.train().global_step == 4
    assert isinstance(callback, transformers.TrainerCallback) and sparselm.SparsityCallback is SparsityCallback
    assert {name for name, _, _ in callback.keeper.masks} == masked_names(pruned)  # the embedding's too
    for matrix in select_matrices(model, include_embeddings=True):
        w, was_pruned = matrix.weight(), pruned[matrix.name]
        assert torch.equal(w == 0, was_pruned), matrix.name  # the same positions, no more and no fewer
        assert not w[was_pruned].signbit().any()
        moved = (w != start[matrix.name])[~was_pruned].float().mean()
        assert moved > 0.99, matrix.name  # kept weights did train
    for _, param, keep in callback.keeper.masks:
        moments = [v for v in trainer.optimizer.state[param].values() if torch.is_tensor(v) and v.shape == param.shape]
        assert len(moments) == 2 and all(not m[~keep].any() for m in moments)  # Adam's exp_avg and exp_avg_sq
        assert all(m[keep].any() for m in moments)
    ids = torch.randint(5, 96, (2, 16))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()  # after training the gradient hooks are gone
    _, param, keep = callback.keeper.masks[0]
    assert param.grad[~keep].abs().sum() > 0


def test_the_same_user_trainer_without_the_callback_revives_pruned_weights(tmp_path):
    """The control for the test above: the weights it keeps at zero would otherwise come back."""
    model, pruned = pruned_lm_with_embedding_zeros()
    user_trainer(model, tmp_path, []).train()
    for matrix in select_matrices(model):
        assert (matrix.weight()[pruned[matrix.name]] != 0).float().mean() > 0.9, matrix.name


def test_finetune_keeps_masks_through_the_same_callback(tmp_path, monkeypatch):
    steps = spy_on(monkeypatch, SparsityCallback, "on_optimizer_step")
    begins = spy_on(monkeypatch, SparsityCallback, "on_train_begin")
    src = pruned_dir(tmp_path, "llama")
    report = finetune(str(src), "wiki-pair", tmp_path / "ft", max_steps=3, batch_size=4, max_examples=16)
    assert len(begins) == 1 and len(steps) == report.steps == 3
    callback = begins[0]["args"][0]
    expected = zero_masks(load(str(src)), include_embeddings=True)
    assert [name for name, _, _ in callback.keeper.masks] == sorted(masked_names(expected), key=list(expected).index)
    assert all(torch.equal(~keep, expected[name]) for name, _, keep in callback.keeper.masks)


def test_callback_refuses_sharded_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model, _ = pruned_lm_with_embedding_zeros()
    with pytest.raises(SparselmError, match="FSDP"):
        SparsityCallback().on_train_begin(transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[]),
                                          None, None, model=model, optimizer=None)


def test_only_the_main_process_writes_the_output(tmp_path, monkeypatch):
    """Under torchrun / accelerate launch every rank runs finetune(); a rank other than zero writes nothing."""
    src = pruned_dir(tmp_path, "llama")
    monkeypatch.setattr(transformers.Trainer, "is_world_process_zero", lambda self: False)
    report = finetune(str(src), "wiki-pair", tmp_path / "out", max_steps=2, batch_size=4, max_examples=8)
    assert report.steps == 2 and report.sparsity_identical
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-dense"]
    monkeypatch.setattr(transformers.Trainer, "is_world_process_zero", lambda self: True)
    finetune(str(src), "wiki-pair", tmp_path / "out", max_steps=2, batch_size=4, max_examples=8)
    assert (tmp_path / "out" / "finetune.json").is_file()


RANK_SCRIPT = """
import os, sys
from sparselm import finetune as module
original = module._save
def recording_save(*args, **kwargs):
    with open(sys.argv[3], "a") as log:
        log.write(os.environ["RANK"] + "\\n")
    original(*args, **kwargs)
module._save = recording_save
report = module.finetune(sys.argv[1], "wiki-pair", sys.argv[2], max_steps=2, batch_size=2, max_examples=8)
with open(sys.argv[3] + ".steps", "a") as log:
    log.write(f"{os.environ['RANK']} {os.environ['WORLD_SIZE']} {report.steps} {report.sparsity_identical}\\n")
"""


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_once(tmp_path):
    """A real 2-process run (gloo on CPU): both ranks train, rank 0 alone saves, the masks hold."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = pruned_dir(tmp_path, "llama")
    script, log, out = tmp_path / "rank.py", tmp_path / "saves.log", tmp_path / "out"
    script.write_text(RANK_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--nproc-per-node", "2", str(script), str(src), str(out), str(log)],
                   check=True, env=env, capture_output=True, timeout=600)
    assert log.read_text().split() == ["0"]
    assert sorted(log.with_suffix(".log.steps").read_text().splitlines()) == ["0 2 2 True", "1 2 2 True"]
    before, after = zero_masks(load(str(src))), zero_masks(load(str(out)))
    assert all(torch.equal(before[k], after[k]) for k in before)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["llama-dense", "out", "rank.py", "saves.log", "saves.log.steps"]  # no temp dirs left
