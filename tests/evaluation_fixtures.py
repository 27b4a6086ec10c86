"""Tiny character-level tokenizers matching conftest's VOCAB, and tiny model directories that carry one.

Shared by the evaluation and fine-tuning tests (test_perplexity, test_classification, test_evaluation,
test_finetune, test_cli_eval): a tokenizer is needed to evaluate a model directory, and the real ones have vocabularies
far larger than the tiny models' 96 entries. Also the spies and independent recomputations those tests share.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from conftest import DECODER_ONLY, VOCAB, tiny_config
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS, PAD, EOS = 0, 1, 2
CHARS = "\n " + string.ascii_letters + string.digits + string.punctuation[: VOCAB - 64 - len(SPECIALS)]
HEAD_CLASSES = {
    "base": transformers.AutoModel,
    "causal-lm": transformers.AutoModelForCausalLM,
    "masked-lm": transformers.AutoModelForMaskedLM,
    "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
    "sequence-classification": transformers.AutoModelForSequenceClassification,
}


def tiny_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """One token per character; specials placed as the family's real tokenizer places them."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if family in ("gpt2", "opt"):
        single, pair = "$A", "$A </s> $B"
    elif family == "llama":
        single, pair = "<s> $A", "<s> $A </s> $B"
    else:
        single, pair = "<s> $A </s>", "<s> $A </s> $B </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=128,
    )


def tiny_lm(family: str, head: str = "auto", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model whose special-token ids agree with tiny_tokenizer."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.bos_token_id, config.pad_token_id, config.eos_token_id = BOS, PAD, EOS
    if config.is_encoder_decoder:
        config.decoder_start_token_id = BOS
    for key, value in overrides.items():
        setattr(config, key, value)
    if head == "auto":
        head = "causal-lm" if family in DECODER_ONLY else "masked-lm" if family in ("bert", "roberta") else "seq2seq-lm"
    return HEAD_CLASSES[head].from_config(config).eval()


def save_tiny(out: Path, family: str, head: str = "auto", seed: int = 0, **overrides) -> Path:
    """A tiny model directory with its tokenizer, as `sparselm eval` and `sparselm finetune` expect."""
    tiny_lm(family, head, seed, **overrides).save_pretrained(out)
    tiny_tokenizer(family).save_pretrained(out)
    return out


SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n\n"
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow (again).\n"
) * 6


def spy_on(monkeypatch, owner, name: str) -> list[dict]:
    """Replace owner.name by a wrapper that records each call's arguments, then calls the original."""
    original, calls = getattr(owner, name), []

    def spy(*args, **kwargs):
        calls.append({"args": args, "kwargs": kwargs})
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def predictions_one_by_one(model: torch.nn.Module, tokenizer, examples, max_length: int = 128) -> list[int]:
    """The argmax of the model's logits per example, one example at a time (no padding, no batching).

    Segment ids go to models with a segment embedding table (BERT: type_vocab_size 2) and to no other.
    """
    segments = (getattr(model.config, "type_vocab_size", None) or 0) > 1
    predictions = []
    with torch.no_grad():
        for ex in examples:
            enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_length, return_tensors="pt")
            inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask") or segments}
            predictions.append(int(model(**inputs).logits[0].argmax()))
    return predictions


def accuracy_and_f1(predictions: list[int], labels: list[int], num_labels: int) -> tuple[float, float]:
    """Accuracy, and F1 as GLUE reports it (binary: the positive class; else macro over the classes seen)."""
    pairs = list(zip(predictions, labels, strict=True))
    accuracy = sum(p == y for p, y in pairs) / len(pairs)

    def f1(c: int) -> float:
        tp = sum(p == c == y for p, y in pairs)
        wrong = sum((p == c) != (y == c) for p, y in pairs)
        return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0

    classes = [1] if num_labels == 2 else sorted(set(predictions) | set(labels))
    return accuracy, sum(f1(c) for c in classes) / len(classes)
