"""Perplexity in one pass: the SparseGPT/Wanda token protocol exactly, the harness's word/byte perplexity closely."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from evaluation_fixtures import BOS, SAMPLE, tiny_lm, tiny_tokenizer

from sparselm.errors import SparselmError
from sparselm.evaluation.perplexity import model_context, perplexity, tokenize_stream


def sparsegpt_token_ppl(model, tokenizer, text: str, seqlen: int, windows: int | None = None) -> float:
    """A plain transcription of the SparseGPT/Wanda evaluation loop (one window at a time)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    nsamples = ids.numel() // seqlen if windows is None else windows
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(batch).logits
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = batch[:, 1:]
            loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_token_ppl_is_the_sparsegpt_protocol(family):
    overrides = {"is_decoder": True} if family == "bert" else {}
    model = tiny_lm(family, "causal-lm", **overrides)
    tok = tiny_tokenizer(family)
    for windows in (None, 3):
        ours = perplexity(model, tok, SAMPLE, seqlen=40, max_windows=windows, batch_size=4)
        assert ours.token_ppl == pytest.approx(sparsegpt_token_ppl(model, tok, SAMPLE, 40, windows), rel=1e-5)
        assert ours.token_ppl_predictions == ours.windows * 39


def harness_loglikelihood(model, tokenizer, text: str, seqlen: int, add_bos_token: bool | None = None) -> float:
    """lm-evaluation-harness's own rolling loglikelihood of one document, through its HFLM wrapper."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=seqlen, device="cpu", batch_size=4,
              add_bos_token=add_bos_token)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    return lm.loglikelihood_rolling([request], disable_tqdm=True)[0]


def rolling_loglikelihood(model, tokens: list[int], prefix: int | None, seqlen: int) -> float:
    """Σ log P of every token of [prefix] + tokens after the first, written as a plain loop, one window at a time.

    The stream is cut into disjoint windows of `seqlen` inputs, each position predicting the next token; the tokens
    after the last full window are predicted by one window of the `seqlen` tokens before the last one. With a prefix
    this is the harness's `loglikelihood_rolling` (its first window is [prefix] + tokens[:seqlen - 1]).
    """
    stream = torch.tensor(([prefix] if prefix is not None else []) + tokens)
    n, total, done = len(stream), 0.0, 0
    with torch.no_grad():
        for k in range(n // seqlen):
            targets = stream[k * seqlen + 1 : (k + 1) * seqlen + 1]
            logits = model(input_ids=stream[None, k * seqlen : (k + 1) * seqlen]).logits[0, : len(targets)]
            total += F.cross_entropy(logits.double(), targets, reduction="sum").item()
            done = k * seqlen + len(targets)
        if done < n - 1:
            logits = model(input_ids=stream[None, max(0, n - 1 - seqlen) : n - 1]).logits[0, done + 1 - n :]
            total += F.cross_entropy(logits.double(), stream[done + 1 :], reduction="sum").item()
    return -total


def first_token_loglikelihood(model, prefix: int, token: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[prefix]])).logits[0, -1]
    return -F.cross_entropy(logits.double()[None], torch.tensor([token])).item()


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_word_and_byte_perplexity_agree_with_the_harness(family):
    model, tok = tiny_lm(family, "causal-lm"), tiny_tokenizer(family)
    ours = perplexity(model, tok, SAMPLE, seqlen=48)
    theirs = harness_loglikelihood(model, tok, SAMPLE, 48)
    words, n_bytes = len(re.split(r"\s+", SAMPLE)), len(SAMPLE.encode("utf-8"))
    assert (ours.words, ours.bytes) == (words, n_bytes)
    assert ours.loglikelihood == pytest.approx(theirs, rel=5e-3)
    assert ours.word_ppl == pytest.approx(math.exp(-theirs / words), rel=0.05)
    assert ours.bits_per_byte == pytest.approx(-theirs / n_bytes / math.log(2), rel=5e-3)
    assert ours.byte_ppl == pytest.approx(2 ** ours.bits_per_byte, rel=1e-9)
    # Where the two differ, exactly: without a BOS in the stream our windows sit one token later than the harness's.
    tokens = tok(SAMPLE)["input_ids"]
    assert theirs == pytest.approx(rolling_loglikelihood(model, tokens, tok.bos_token_id, 48), rel=1e-6)
    expected = first_token_loglikelihood(model, tok.bos_token_id, tokens[0])
    expected += rolling_loglikelihood(model, tokens, None, 48)
    assert ours.loglikelihood == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seqlen", [48, 100, 128])
def test_harness_parity_is_exact_when_the_tokenizer_adds_bos(seqlen):
    """Llama-style tokenizer (`<s>` first): our windows are the harness's windows, so the numbers are the same.

    The harness is run as for such a model (`add_bos_token=False`: the prefix token is the only BOS); with its default
    lm-eval 0.4 encodes the `<s>` the tokenizer adds and puts another in front, scoring P(<s> | <s>) as text.
    """
    model, tok = tiny_lm("llama", "causal-lm"), tiny_tokenizer("llama")
    assert tok(SAMPLE)["input_ids"][0] == BOS and (len(SAMPLE) + 1) % seqlen
    ours = perplexity(model, tok, SAMPLE, seqlen=seqlen, batch_size=3)
    theirs = harness_loglikelihood(model, tok, SAMPLE, seqlen, add_bos_token=False)
    words, n_bytes = len(re.split(r"\s+", SAMPLE)), len(SAMPLE.encode("utf-8"))
    assert ours.first_token_scored and ours.scored_text_tokens == len(SAMPLE)
    assert ours.loglikelihood == pytest.approx(theirs, rel=1e-6)
    assert ours.word_ppl == pytest.approx(math.exp(-theirs / words), rel=1e-5)
    assert ours.byte_ppl == pytest.approx(math.exp(-theirs / n_bytes), rel=1e-6)
    assert ours.bits_per_byte == pytest.approx(-theirs / n_bytes / math.log(2), rel=1e-6)
    text_tokens = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert theirs == pytest.approx(rolling_loglikelihood(model, text_tokens, BOS, seqlen), rel=1e-6)


@pytest.mark.slow
def test_harness_parity_on_the_embedded_trained_model():
    """smollm2-135m (no BOS added, so the windows differ by one token) on PTB text: within the 0.5% we claim."""
    from sparselm.data import joined_text
    from sparselm.models import load, load_tokenizer

    model, tok = load("smollm2-135m"), load_tokenizer("smollm2-135m")
    text = joined_text("ptb", "test")[:8000]
    ours = perplexity(model, tok, text, seqlen=512)
    theirs = harness_loglikelihood(model, tok, text, 512)
    words, n_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
    assert (ours.words, ours.bytes) == (words, n_bytes) and ours.windows >= 3
    assert ours.word_ppl == pytest.approx(math.exp(-theirs / words), rel=5e-3)
    assert ours.byte_ppl == pytest.approx(math.exp(-theirs / n_bytes), rel=5e-3)
    assert ours.bits_per_byte == pytest.approx(-theirs / n_bytes / math.log(2), rel=5e-3)
    assert 20 < ours.word_ppl < 2000  # a trained model on English: far below the vocabulary size


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_every_text_token_is_scored_once(family):
    """Without max_windows, all text tokens (not the added specials) are scored: first, window joins and tail."""
    overrides = {"is_decoder": True} if family == "bert" else {}
    model, tok = tiny_lm(family, "causal-lm", **overrides), tiny_tokenizer(family)
    stream = tokenize_stream(tok, SAMPLE)
    assert stream.text_end - stream.text_start == len(SAMPLE)  # one token per character
    result = perplexity(model, tok, SAMPLE, seqlen=50)
    assert result.scored_text_tokens == len(SAMPLE)
    assert not result.text_truncated and result.first_token_scored
    assert math.isfinite(result.loglikelihood) and result.loglikelihood < 0
    text_ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    if stream.text_start == 1:  # <s> in front: the stream's own windows, <s> conditioning the first character
        expected = rolling_loglikelihood(model, text_ids, BOS, 50)
    else:
        expected = first_token_loglikelihood(model, BOS, text_ids[0]) + rolling_loglikelihood(model, text_ids, None, 50)
    assert result.loglikelihood == pytest.approx(expected, rel=1e-6)


def test_max_windows_counts_words_of_the_covered_prefix_only():
    model, tok = tiny_lm("gpt2", "causal-lm"), tiny_tokenizer("gpt2")
    result = perplexity(model, tok, SAMPLE, seqlen=30, max_windows=2)
    covered = SAMPLE[:60]  # char-level tokenizer: 2 windows of 30 tokens, the last logit scores character 61 too
    assert result.text_truncated and result.windows == 2
    assert result.scored_text_tokens == 61
    assert result.bytes == len(SAMPLE[:61].encode()) and result.words == len(re.split(r"\s+", SAMPLE[:61]))
    assert len(covered) < result.bytes


def test_batch_size_does_not_change_the_numbers():
    model, tok = tiny_lm("llama", "causal-lm"), tiny_tokenizer("llama")
    text = SAMPLE[:400]
    one = perplexity(model, tok, text, seqlen=32, batch_size=1)
    many = perplexity(model, tok, text, seqlen=32, batch_size=7)
    for key in ("token_ppl", "word_ppl", "bits_per_byte"):
        assert getattr(one, key) == pytest.approx(getattr(many, key), rel=1e-5)


def test_the_model_is_not_modified():
    model, tok = tiny_lm("opt", "causal-lm"), tiny_tokenizer("opt")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perplexity(model, tok, SAMPLE, seqlen=32)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_seqlen_above_the_context_and_too_short_texts_fail_clearly():
    model, tok = tiny_lm("gpt2", "causal-lm"), tiny_tokenizer("gpt2")
    assert model_context(model) == 128
    with pytest.raises(SparselmError, match="above the model's context of 128"):
        perplexity(model, tok, SAMPLE, seqlen=129)
    with pytest.raises(SparselmError, match="fewer than one window"):
        perplexity(model, tok, "short text", seqlen=64)
    with pytest.raises(SparselmError, match="empty"):
        perplexity(model, tok, "", seqlen=64)


def test_roberta_context_excludes_the_padding_offset():
    assert model_context(tiny_lm("roberta", "causal-lm", is_decoder=True)) == 128
