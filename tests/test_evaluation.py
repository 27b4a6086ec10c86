"""`sparselm.evaluation.evaluate` over every family and objective, and the embedded models with small budgets."""

from __future__ import annotations

import math
import re

import pytest
import torch
from evaluation_fixtures import BOS, SAMPLE, predictions_one_by_one, save_tiny, spy_on, state_of
from test_perplexity import first_token_loglikelihood, rolling_loglikelihood, sparsegpt_token_ppl

from sparselm.data import joined_text, ptb_text
from sparselm.errors import SparselmError
from sparselm.evaluation import evaluate
from sparselm.evaluation import run as run_module
from sparselm.evaluation.objectives import load_language_model
from sparselm.models import load, load_tokenizer

FAMILY_NOTES = {"bert": "is_decoder=True", "roberta": "is_decoder=True", "bart": "decoder alone", "pegasus": "decoder alone"}


@pytest.fixture
def text_task(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE)
    return f"text:{path}"


def test_causal_perplexity_for_every_family(family, tmp_path, text_task):
    model_dir = save_tiny(tmp_path / family, family)
    if family == "t5":
        with pytest.raises(SparselmError, match="no causal-LM"):
            evaluate(str(model_dir), text_task, seqlen=32)
        return
    result = evaluate(str(model_dir), text_task, seqlen=32, max_windows=4)
    assert result.metrics.windows == 4 and result.metrics.token_ppl > 1 and result.metrics.word_ppl > 1
    lm = load_language_model(str(model_dir))
    assert result.metrics.token_ppl == pytest.approx(sparsegpt_token_ppl(lm.model, lm.tokenizer, SAMPLE, 32, 4), rel=1e-5)
    # word_ppl over the text the 4 windows cover (one character per token): 128 predictions after <s>, or 128 after
    # the first character plus the first character itself (given BOS) when the tokenizer adds nothing in front
    text_ids = lm.tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    if lm.tokenizer(SAMPLE)["input_ids"][0] == BOS:
        covered, ll = SAMPLE[:128], rolling_loglikelihood(lm.model, text_ids[:128], BOS, 32)
    else:
        covered = SAMPLE[:129]
        ll = first_token_loglikelihood(lm.model, BOS, text_ids[0])
        ll += rolling_loglikelihood(lm.model, text_ids[:129], None, 32)
    assert result.metrics.scored_text_tokens == len(covered)
    assert result.metrics.word_ppl == pytest.approx(math.exp(-ll / len(re.split(r"\s+", covered))), rel=1e-5)
    assert result.objective == "clm" and result.settings["head"] == "causal-lm"
    if family in FAMILY_NOTES:
        assert FAMILY_NOTES[family] in result.notes[0]
    else:
        assert result.notes == []


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "bart"])
def test_masked_lm_perplexity_for_encoders_only(family, tmp_path, text_task):
    model_dir = save_tiny(tmp_path / family, family)
    if family not in ("bert", "roberta"):
        with pytest.raises(SparselmError, match="encoder-only"):
            evaluate(str(model_dir), text_task, objective="mlm")
        return
    first = evaluate(str(model_dir), text_task, objective="mlm", seqlen=42)
    again = evaluate(str(model_dir), text_task, objective="mlm", seqlen=42)
    other_seed = evaluate(str(model_dir), text_task, objective="mlm", seqlen=42, seed=1)
    assert first.metrics.mlm_ppl == again.metrics.mlm_ppl != other_seed.metrics.mlm_ppl
    assert first.metrics.masked_tokens == first.metrics.windows * round(0.15 * 40)  # 40 text tokens between <s> and </s>
    model = load_language_model(str(model_dir), "mlm").model
    tok = load_language_model(str(model_dir), "mlm").tokenizer
    assert first.metrics.windows == len(SAMPLE) // 40
    for result, seed in ((first, 0), (other_seed, 1)):
        expected = direct_mlm_ppl(model, tok, SAMPLE, 42, first.metrics.windows, seed)
        assert result.metrics.mlm_ppl == pytest.approx(expected, rel=1e-5)


def direct_mlm_ppl(model, tokenizer, text: str, seqlen: int, windows: int, seed: int) -> float:
    """Masked-LM perplexity written out: [CLS] + seqlen - 2 text tokens + [SEP] per window, 15% of the text tokens
    (drawn by a generator seeded once) replaced by [MASK] and scored, one window at a time."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body, generator, nll, count = seqlen - 2, torch.Generator().manual_seed(seed), 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = torch.tensor([tokenizer.cls_token_id, *ids[w * body : (w + 1) * body], tokenizer.sep_token_id])
            chosen = torch.randperm(body, generator=generator)[: round(0.15 * body)] + 1
            masked = window.clone()
            masked[chosen] = tokenizer.mask_token_id
            logits = model(input_ids=masked[None]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[chosen].double(), window[chosen], reduction="sum").item()
            count += len(chosen)
    return math.exp(nll / count)


def test_unknown_objective_and_split(tmp_path, text_task):
    model_dir = save_tiny(tmp_path / "gpt2", "gpt2")
    with pytest.raises(SparselmError, match="unknown objective"):
        evaluate(str(model_dir), text_task, objective="seq2seq")
    with pytest.raises(SparselmError, match="unknown split"):
        evaluate(str(model_dir), "ptb", split="dev2")


@pytest.mark.slow
def test_smollm2_on_ptb_text_matches_the_sparsegpt_transcription(tmp_path):
    """The yardstick: dense smollm2-135m on text: of PTB's test split, a few windows."""
    path = tmp_path / "ptb-test.txt"
    path.write_text(ptb_text("test"))
    result = evaluate("smollm2-135m", f"text:{path}", seqlen=128, max_windows=3)
    model, tok = load("smollm2-135m"), load_tokenizer("smollm2-135m")
    assert result.metrics.token_ppl == pytest.approx(sparsegpt_token_ppl(model, tok, path.read_text(), 128, 3), rel=1e-4)
    assert 10 < result.metrics.token_ppl < 1000 and result.quantized_from == "GGUF Q4_1"
    assert result.metrics.word_ppl > result.metrics.token_ppl  # PTB words are longer than SmolLM2 tokens


@pytest.mark.slow
def test_minilm_masked_lm_and_classification_small_budget(tmp_path, monkeypatch):
    from sparselm import finetune as finetune_module

    measured = spy_on(monkeypatch, run_module, "masked_perplexity")
    mlm = evaluate("minilm-l6", "wiki", objective="mlm", seqlen=64, max_windows=2)
    assert mlm.metrics.mlm_ppl > 1 and "newly initialised" in mlm.notes[0]
    model, tokenizer, text = measured[0]["args"][:3]  # the head is new at every load: score the one evaluated
    assert text == joined_text("wiki", "test")
    assert mlm.metrics.mlm_ppl == pytest.approx(direct_mlm_ppl(model, tokenizer, text, 64, 2, 0), rel=1e-4)
    before = evaluate("minilm-l6", "wiki-pair", max_examples=16)
    assert not before.settings["head_trained"]
    with pytest.raises(SparselmError, match="encoder-only .*not a causal LM"):
        finetune_module.finetune("minilm-l6", "ptb", tmp_path / "lm", max_steps=1)
    saves = spy_on(monkeypatch, finetune_module, "_save")
    report = finetune_module.finetune("minilm-l6", "wiki-pair", tmp_path / "ft", max_steps=2, batch_size=8,
                                      max_examples=16)
    assert report.sparsity_identical
    scored = spy_on(monkeypatch, run_module, "classify")
    after = evaluate(str(tmp_path / "ft"), "wiki-pair", max_examples=16)
    assert after.settings["head_trained"] and after.notes == []
    trained, evaluated = state_of(saves[0]["args"][0]), state_of(scored[0]["args"][0])
    assert evaluated.keys() == trained.keys() and all(torch.equal(evaluated[k], trained[k]) for k in trained)
    model, tokenizer, examples = scored[0]["args"][:3]
    predictions = predictions_one_by_one(model, tokenizer, examples)
    assert after.metrics.accuracy == sum(p == ex.label for p, ex in zip(predictions, examples, strict=True)) / 16
    assert not (tmp_path / "lm").exists()
