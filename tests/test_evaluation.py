"""`sparselm.evaluation.evaluate` over every family and objective, and the embedded models with small budgets."""

from __future__ import annotations

import pytest
from evaluation_fixtures import SAMPLE, save_tiny
from test_perplexity import sparsegpt_token_ppl

from sparselm.data import ptb_text
from sparselm.errors import SparselmError
from sparselm.evaluation import evaluate
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
    assert result["windows"] == 4 and result["token_ppl"] > 1 and result["word_ppl"] > 1
    assert result["objective"] == "clm" and result["settings"]["head"] == "causal-lm"
    if family in FAMILY_NOTES:
        assert FAMILY_NOTES[family] in result["notes"][0]
    else:
        assert result["notes"] == []


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
    assert first["mlm_ppl"] == again["mlm_ppl"] != other_seed["mlm_ppl"]
    assert first["masked_tokens"] == first["windows"] * round(0.15 * 40)  # 40 text tokens between <s> and </s>


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
    assert result["token_ppl"] == pytest.approx(sparsegpt_token_ppl(model, tok, path.read_text(), 128, 3), rel=1e-4)
    assert 10 < result["token_ppl"] < 1000 and result["quantized_from"] == "GGUF Q4_1"
    assert result["word_ppl"] > result["token_ppl"]  # PTB words are longer than SmolLM2 tokens


@pytest.mark.slow
def test_minilm_masked_lm_and_classification_small_budget(tmp_path):
    mlm = evaluate("minilm-l6", "wiki", objective="mlm", seqlen=64, max_windows=2)
    assert mlm["mlm_ppl"] > 1 and "newly initialised" in mlm["notes"][0]
    before = evaluate("minilm-l6", "wiki-pair", max_examples=16)
    assert not before["settings"]["head_trained"]
    from sparselm.finetune import finetune

    report = finetune("minilm-l6", "wiki-pair", tmp_path / "ft", max_steps=2, batch_size=8, max_examples=16)
    assert report["sparsity_identical"]
    after = evaluate(str(tmp_path / "ft"), "wiki-pair", max_examples=16)
    assert after["settings"]["head_trained"] and after["notes"] == []
