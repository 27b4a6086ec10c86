"""Distillation with the mask kept: the pruned student moves towards its dense teacher, pruned weights stay zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from evaluation_fixtures import SAMPLE, save_tiny, spy_on, tiny_tokenizer
from test_cli_eval import fails, run_json
from test_finetune import prune_half, zero_masks

from sparselm import finetune as finetune_module
from sparselm.distill import (
    Distillation, TokenBudget, budget_steps, distillation_trainer, kl_to_teacher, squarehead_loss,
)
from sparselm.errors import SparselmError
from sparselm.finetune import finetune
from sparselm.models import load

# Text the student never trains on (SAMPLE is the training text): the distance to the teacher is measured here.
HELD_OUT = (
    "Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly; jackdaws love my big sphinx of "
    "quartz.\n"
) * 3
# Larger than the default 0.02 so that the tiny random models' logits are far from uniform and the KL is sizeable.
INIT = 0.2


def teacher_and_student(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """A tiny dense model directory (the teacher) and its 50%-pruned copy (the student), with tokenizers."""
    dense = save_tiny(tmp_path / f"{family}-dense", family, initializer_range=INIT)
    student = tmp_path / f"{family}-pruned"
    prune_half(load(str(dense))).save_pretrained(student)
    tiny_tokenizer(family).save_pretrained(student)
    return dense, student


def train_text(tmp_path: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(SAMPLE)
    return path


def distance_to_teacher(teacher_dir: Path, student_dir: Path, family: str) -> tuple[float, float]:
    """KL(teacher‖student) per position and the SquareHead ratio averaged over blocks, on HELD_OUT, in float64."""
    teacher, student = (transformers.AutoModelForCausalLM.from_pretrained(d).eval() for d in (teacher_dir, student_dir))
    ids = torch.tensor([tiny_tokenizer(family)(HELD_OUT)["input_ids"][:96]])
    with torch.no_grad():
        t, s = (m(input_ids=ids, output_hidden_states=True) for m in (teacher, student))
    p = t.logits.double().softmax(-1)
    kl = (p * (p.log() - s.logits.double().log_softmax(-1))).sum(-1).mean()
    blocks = list(zip(t.hidden_states[1:], s.hidden_states[1:], strict=True))
    hidden = sum(((a.double() - b.double()) ** 2).mean() / (a.double() ** 2).mean() for a, b in blocks) / len(blocks)
    return float(kl), float(hidden)


def test_kl_to_teacher_is_the_mean_kl_over_kept_positions():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), 3 * torch.randn(2, 5, 11, generator=gen)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    temperature = 2.0
    p = (teacher.double() / temperature).softmax(-1)
    q = (student.double() / temperature).softmax(-1)
    per_position = (p * (p / q).log()).sum(-1)
    expected = per_position[keep.bool()].mean() * temperature**2
    assert float(kl_to_teacher(student, teacher, temperature, keep)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_to_teacher(student, teacher)) == pytest.approx(
        float((teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1).mean()), rel=1e-5
    )
    changed = student.clone()
    changed[0, 3:] = 100.0  # positions outside `keep` do not count
    masked = kl_to_teacher(student, teacher, temperature, keep)
    assert torch.equal(kl_to_teacher(changed, teacher, temperature, keep), masked)
    assert float(kl_to_teacher(teacher, teacher, temperature, keep)) == pytest.approx(0.0, abs=1e-6)


def test_squarehead_loss_is_each_blocks_error_over_the_teachers_square_averaged():
    gen = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, 4, 8, generator=gen) * scale for scale in (1.0, 10.0)]
    student = [t + torch.randn(2, 4, 8, generator=gen) for t in teacher]
    ratios = [((s - t) ** 2).sum() / (t**2).sum() for s, t in zip(student, teacher, strict=True)]
    assert float(squarehead_loss(student, teacher)) == pytest.approx(float(sum(ratios) / 2), rel=1e-5)
    # the same absolute error weighs 100x less in the block whose outputs are 10x larger: each block is normalised
    assert float(ratios[0] / ratios[1]) == pytest.approx(100.0, rel=0.3)
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    rows = keep.bool()
    kept = [((s - t) ** 2)[rows].sum() / (t**2)[rows].sum() for s, t in zip(student, teacher, strict=True)]
    assert float(squarehead_loss(student, teacher, keep)) == pytest.approx(float(sum(kept) / 2), rel=1e-5)
    assert float(squarehead_loss(teacher, teacher)) == 0.0


def test_budget_steps_reach_the_budget_across_epochs():
    """Steps counted against an explicit walk through the batches (the last batch of an epoch is short)."""
    for windows, batch, seqlen, max_tokens in [(31, 2, 32, 100), (3, 2, 32, 160), (3, 2, 32, 161), (8, 4, 16, 128)]:
        seen, steps = 0, 0
        while seen < max_tokens:
            sizes = [min(batch, windows - i) for i in range(0, windows, batch)]
            for size in sizes:
                if seen >= max_tokens:
                    break
                seen, steps = seen + size * seqlen, steps + 1
        assert budget_steps(max_tokens, windows, batch, seqlen) == steps, (windows, batch, seqlen, max_tokens)


def test_token_budget_stops_once_the_budget_is_reached():
    budget = TokenBudget(100)
    for seen, stops in [(99, False), (100, True), (164, True)]:
        state, control = transformers.TrainerState(), transformers.TrainerControl()
        state.num_input_tokens_seen = seen
        budget.on_step_end(None, state, control)
        assert control.should_training_stop is stops


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_distillation_keeps_the_mask_and_brings_the_student_closer_to_the_teacher(tmp_path, family):
    dense, student = teacher_and_student(tmp_path, family)
    before_masks = zero_masks(load(str(student)), include_embeddings=True)
    kl_before, hidden_before = distance_to_teacher(dense, student, family)
    teacher_files = {p.name: p.read_bytes() for p in dense.iterdir()}
    out = tmp_path / "distilled"
    report = finetune(str(student), f"text:{train_text(tmp_path)}", out, max_steps=6, batch_size=4, seqlen=32, lr=5e-3,
                      distillation=Distillation(str(dense), hidden_weight=1.0)).to_json()
    after_masks = zero_masks(load(str(out)), include_embeddings=True)
    assert after_masks.keys() == before_masks.keys()
    assert all(torch.equal(before_masks[k], after_masks[k]) for k in before_masks)  # the same positions
    assert sum(int(m.sum()) for m in before_masks.values()) > 0 and report["sparsity_identical"]
    kl_after, hidden_after = distance_to_teacher(dense, out, family)
    assert kl_after < 0.85 * kl_before, (kl_before, kl_after)
    assert hidden_after < 0.85 * hidden_before, (hidden_before, hidden_after)
    assert {p.name: p.read_bytes() for p in dense.iterdir()} == teacher_files
    assert report["steps"] == 6 and report["tokens_seen"] == 6 * 4 * 32
    assert report["distillation"] == {
        "teacher": str(dense), "logit_loss": "kl(teacher||student)", "temperature": 1.0, "hidden_loss": "squarehead",
        "hidden_weight": 1.0, "label_loss": None,
    }
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["distillation"] == report["distillation"] and saved["tokens_seen"] == 6 * 4 * 32
    assert saved["settings"]["max_tokens"] is None


def test_the_teacher_is_frozen_and_the_labels_are_never_read(tmp_path):
    dense, student_dir = teacher_and_student(tmp_path, "llama")
    distillation = Distillation(str(dense), temperature=2.0, hidden_weight=0.5)
    student = load(str(student_dir), head="causal-lm")
    teacher = finetune_module.load_teacher(distillation, student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    reference = transformers.AutoModelForCausalLM.from_pretrained(dense).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in teacher.state_dict().items())
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True)
    trainer = distillation_trainer(teacher, distillation)(model=student, args=args)
    ids = torch.randint(5, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids}).detach()
    other = trainer.compute_loss(student, {"input_ids": ids, "labels": torch.randint(5, 96, (2, 16))}).detach()
    assert torch.equal(loss, other) and float(loss) > 0
    with torch.no_grad():
        s, t = (m(input_ids=ids, output_hidden_states=True) for m in (student, teacher))
    expected = kl_to_teacher(s.logits, t.logits, 2.0) + 0.5 * squarehead_loss(s.hidden_states[1:], t.hidden_states[1:])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        next_token = float(student(input_ids=ids, labels=ids).loss)
    assert float(loss) != pytest.approx(next_token, rel=1e-3)


def test_a_token_budget_stops_training_after_n_tokens(tmp_path):
    """3 windows of 32 tokens, 2 a step: 161 tokens take 4 steps (96 + 64 + the short batch of 32), 192 seen."""
    _, student = teacher_and_student(tmp_path, "llama")
    text = f"text:{train_text(tmp_path)}"
    report = finetune(str(student), text, tmp_path / "a", epochs=50, max_examples=3, batch_size=2, seqlen=32,
                      max_tokens=161).to_json()
    assert report["steps"] == 4 and report["tokens_seen"] == 192 and report["settings"]["max_tokens"] == 161
    assert report["distillation"] is None and report["sparsity_identical"]
    capped = finetune(str(student), text, tmp_path / "b", max_steps=1, batch_size=2, seqlen=32, max_tokens=161).to_json()
    assert capped["steps"] == 1 and capped["tokens_seen"] == 64


def test_distillation_cli_writes_the_settings_and_protects_the_teacher(tmp_path):
    dense, student = teacher_and_student(tmp_path, "llama")
    text = train_text(tmp_path)
    out = tmp_path / "distilled"
    report = run_json("finetune", str(student), "--task", f"text:{text}", "--out", str(out), "--teacher", str(dense),
                      "--hidden-weight", "0.5", "--temperature", "2", "--max-tokens", "100", "--seqlen", "32",
                      "--batch-size", "2")
    assert report["steps"] == 2 and report["tokens_seen"] == 128 and report["sparsity_identical"]
    assert report["distillation"]["teacher"] == str(dense) and report["distillation"]["temperature"] == 2.0
    assert report["distillation"]["hidden_weight"] == 0.5
    assert json.loads((out / "finetune.json").read_text())["distillation"] == report["distillation"]
    fails("finetune", str(student), "--task", f"text:{text}", "--out", str(dense), "--force", "--teacher", str(dense),
          match=f"output '{dense}' is the input")
    assert (dense / "config.json").is_file()


def other_tokenizer(directory: Path) -> None:
    """Swap the ids of two tokens in a saved tokenizer (same vocabulary size, different mapping)."""
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    path.write_text(json.dumps(spec))


def bad_teachers(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Per case: the extra command-line arguments and the words the one error line must hold."""
    vocab = save_tiny(tmp_path / "vocab128", "llama", vocab_size=128)
    tokens = save_tiny(tmp_path / "swapped", "llama")
    other_tokenizer(tokens)
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    wide = save_tiny(tmp_path / "wide", "llama", hidden_size=64, intermediate_size=128)
    missing = tmp_path / "no-such-model"
    return {
        "other vocabulary": (["--teacher", str(vocab)], "has a vocabulary of 128 tokens and student"),
        "other tokenizer": (["--teacher", str(tokens)], "map tokens to different ids (2 tokens differ)"),
        "other architecture": (["--teacher", str(gpt2)], "is a gpt2 model and student"),
        "missing": (["--teacher", str(missing)], f"--teacher: no model directory at '{missing}'"),
        "other width with the hidden loss": (["--teacher", str(wide), "--hidden-weight", "1"],
                                             "has 2 blocks of width 64 where the student has 2 of width 32"),
        "zero temperature": (["--teacher", str(tmp_path / "llama-dense"), "--temperature", "0"],
                             "--temperature must be a positive number"),
        "loss settings without a teacher": (["--hidden-weight", "1"], "add --teacher"),
        "negative token budget": (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    }


def test_bad_teachers_fail_in_one_line_before_training_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("sparselm.cli.finetune.finetune", lambda *a, **k: pytest.fail("training started"))
    dense, student = teacher_and_student(tmp_path, "llama")
    text = train_text(tmp_path)
    cases = bad_teachers(tmp_path)
    written = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    for name, (extra, match) in cases.items():
        fails("finetune", str(student), "--task", f"text:{text}", "--out", str(out), *extra, match=match)
        assert sorted(tmp_path.rglob("*")) == written, name
    fails("finetune", str(student), "--task", "wiki-pair", "--out", str(out), "--teacher", str(dense),
          match="'wiki-pair' is a classification task")
    fails("finetune", str(student), "--task", "wiki-pair", "--out", str(out), "--max-tokens", "10",
          match="--max-tokens budgets causal-LM training")
    assert sorted(tmp_path.rglob("*")) == written


def test_the_library_refuses_a_bad_teacher_before_loading_anything(tmp_path, monkeypatch):
    dense, student = teacher_and_student(tmp_path, "llama")
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    loads = spy_on(monkeypatch, finetune_module, "_prepare")
    with pytest.raises(SparselmError, match="is a gpt2 model and student") as caught:
        finetune(str(student), f"text:{train_text(tmp_path)}", tmp_path / "out", max_steps=1,
                 distillation=Distillation(str(gpt2)))
    assert "\n" not in str(caught.value) and not loads and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_distilled_from_itself_after_a_magnitude_prune_moves_towards_it(tmp_path):
    """The real model: 50% layer-wise magnitude, 2 steps of 2 PTB-train windows of 256 tokens, KL on PTB test."""
    from sparselm.data import joined_text
    from sparselm.models import load_tokenizer

    student = tmp_path / "smollm2-pruned"
    prune_half(load("smollm2-135m", head="causal-lm")).save_pretrained(student)
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.save_pretrained(student)
    ids = torch.tensor([tokenizer(joined_text("ptb", "test"))["input_ids"][:512]])

    def kl_on_ptb_test(model_dir: Path) -> float:
        teacher = load("smollm2-135m", head="causal-lm")
        with torch.no_grad():
            t = teacher(input_ids=ids).logits.double().log_softmax(-1)
            s = load(str(model_dir), head="causal-lm")(input_ids=ids).logits.double().log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl_on_ptb_test(student)
    out = tmp_path / "distilled"
    report = finetune(str(student), "ptb", out, max_tokens=1024, seqlen=256, batch_size=2, lr=1e-4,
                      distillation=Distillation("smollm2-135m")).to_json()
    assert report["steps"] == 2 and report["tokens_seen"] == 1024 and report["settings"]["split"] == "train"
    pruned, distilled = zero_masks(load(str(student))), zero_masks(load(str(out)))
    assert all(torch.equal(pruned[k], distilled[k]) for k in pruned)
    assert kl_on_ptb_test(out) < 0.95 * before
