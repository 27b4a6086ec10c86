"""Causal-LM perplexity in one pass: the papers' token perplexity and the harness's word/byte perplexity together.

Two protocols are in use and their numbers are not comparable (protocols.md):

* **token_ppl** (SparseGPT/Wanda): the text is tokenised once as one stream, exactly as `tokenizer(text)` returns it
  (special tokens included), cut into non-overlapping windows of `seqlen` tokens with the remainder dropped; each
  window contributes the mean cross-entropy of its `seqlen - 1` shifted predictions; token_ppl = exp(mean over
  windows).
* **word_ppl / byte_ppl / bits_per_byte** (lm-evaluation-harness `loglikelihood_rolling`): the summed log-likelihood
  of every text token, the first conditioned on BOS (else EOS), the rest in disjoint windows of at most `seqlen`
  tokens, normalised by the words (`re.split(r"\\s+")`, as the harness's wikitext task counts) or UTF-8 bytes of the
  text.

How one pass yields both: each window's logits are scored against the *next* token at every position, including the
last position, which predicts the first token of the following window. The window's first `seqlen - 1` predictions
give token_ppl exactly; together with the last-position predictions they give the log-likelihood of every token
after the first one up to the end of the last window. Two small extra forwards complete the harness's sum: the first
text token given the BOS/EOS prefix (only when the tokenizer does not put a special token in front by itself), and
one tail window for the remainder the papers drop (context of up to `seqlen` earlier tokens, as the harness's last
window has). Each text token is therefore predicted once, from at most `seqlen` tokens of context. When the tokenizer
puts BOS in front of the text (Llama-style) these are exactly the harness's windows; otherwise ours are shifted by one
token against the harness's (which puts BOS before its first window's context), an effect at window starts that
shrinks with the number of tokens per window (benchmarks/eval_parity.py). The whole evaluated text is treated as one
document (for `ptb` and `text:` it is one; for `wiki` the articles joined with blank lines). With `max_windows` the
harness metrics cover the same prefix of the text the windows cover, and words and bytes are counted in that prefix
only.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import input_device
from ..errors import SparselmError
from ..facts import context_length as model_context  # run.py and finetune.py read it under this name
from ..facts import evaluating
from ..progress import SILENT, Progress
from .loop import forward_batches

DEFAULT_SEQLEN = 2048
LOGITS_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class TokenStream:
    """The text as one token stream; `ids[text_start:text_end]` are the text's own tokens (no added specials)."""

    ids: torch.Tensor
    text_start: int
    text_end: int
    offsets: list[tuple[int, int]] | None


@dataclass(frozen=True)
class Perplexity:
    """token_ppl (SparseGPT/Wanda protocol), word_ppl, byte_ppl and bits_per_byte (harness), with what they cover."""

    token_ppl: float
    word_ppl: float
    byte_ppl: float
    bits_per_byte: float
    seqlen: int
    windows: int
    windows_available: int
    tokens: int
    token_ppl_predictions: int
    loglikelihood: float
    scored_text_tokens: int
    first_token_scored: bool
    words: int
    bytes: int
    text_truncated: bool
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_seqlen(model: nn.Module, seqlen: int | None) -> int:
    """The window length: as asked (checked against the context) or the context clamped to DEFAULT_SEQLEN."""
    context = model_context(model)
    if seqlen is None:
        return min(context or DEFAULT_SEQLEN, DEFAULT_SEQLEN)
    if seqlen < 2:
        raise SparselmError(f"--seqlen must be at least 2 tokens, got {seqlen}")
    if context is not None and seqlen > context:
        raise SparselmError(
            f"--seqlen {seqlen} is above the model's context of {context} tokens; use --seqlen {context} or less"
        )
    return seqlen


def tokenize_stream(tokenizer: Any, text: str) -> TokenStream:
    """Tokenise once as the papers do, and locate the text's own tokens inside the stream."""
    full = tokenizer(text, return_attention_mask=False)["input_ids"]
    plain_enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, **_offsets_kwargs(tokenizer))
    plain = plain_enc["input_ids"]
    start = find_run(full, plain)
    offsets = [tuple(o) for o in plain_enc["offset_mapping"]] if "offset_mapping" in plain_enc else None
    return TokenStream(torch.tensor(full, dtype=torch.long), start, start + len(plain), offsets)


def _offsets_kwargs(tokenizer: Any) -> dict[str, bool]:
    return {"return_offsets_mapping": True} if getattr(tokenizer, "is_fast", False) else {}


def find_run(full: list[int], plain: list[int]) -> int:
    """Where the special-token-free tokens sit inside the full stream (after a BOS/CLS prefix, typically)."""
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start
    raise SparselmError(
        "the tokenizer splits the text differently with and without special tokens; evaluate with a standard "
        "Hugging Face tokenizer"
    )


def window_logits_batch(seqlen: int, vocab: int, batch_size: int) -> int:
    """Windows per forward: as asked, but small enough that the float32 logits stay within LOGITS_BUDGET_BYTES."""
    per_window = seqlen * vocab * 4 * 2  # logits and the log-softmax inside cross_entropy
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // per_window))


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    seqlen: int | None,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: Progress = SILENT,
) -> Perplexity:
    """token_ppl (SparseGPT/Wanda protocol) and word_ppl, byte_ppl, bits_per_byte (harness) in one pass.

    The model is used as it is (a causal LM whose output has `.logits`); it is not modified and its train/eval
    mode is restored afterwards. `progress` advances by one per window.
    """
    if not text:
        raise SparselmError("the text to evaluate is empty; give a source with text in it")
    if max_windows is not None and max_windows < 1:
        raise SparselmError(f"--max-windows must be at least 1, got {max_windows}")
    seqlen = resolve_seqlen(model, seqlen)
    stream = tokenize_stream(tokenizer, text)
    n = len(stream.ids)
    available = n // seqlen
    if available == 0:
        raise SparselmError(f"the text has {n} tokens, fewer than one window of {seqlen}; use a smaller --seqlen")
    windows = available if max_windows is None else min(available, max_windows)
    device = input_device(model)
    with evaluating(model):
        nll, micro = _window_nll(model, stream.ids, seqlen, windows, batch_size, device, progress)
        token_nll = nll[:, : seqlen - 1].double().mean(dim=1)
        per_token = torch.full((n,), math.nan, dtype=torch.float64)
        covered = min(windows * seqlen, n - 1)
        per_token[1 : covered + 1] = nll.double().flatten()[:covered]
        truncated = windows < available
        first_scored = _score_first_token(model, tokenizer, stream, per_token, device)
        if not truncated:
            _score_tail(model, stream, per_token, covered, seqlen, device)
    text_end = stream.text_end if not truncated else min(stream.text_end, covered + 1)
    scored = per_token[stream.text_start if first_scored else stream.text_start + 1 : text_end]
    loglikelihood = -float(scored.sum())
    covered_text = text if not truncated else _text_prefix(tokenizer, stream, text_end, text)
    words = len(re.split(r"\s+", covered_text))
    n_bytes = len(covered_text.encode("utf-8"))
    return Perplexity(
        token_ppl=math.exp(float(token_nll.mean())),
        word_ppl=math.exp(-loglikelihood / words),
        byte_ppl=math.exp(-loglikelihood / n_bytes),
        bits_per_byte=-loglikelihood / n_bytes / math.log(2),
        seqlen=seqlen,
        windows=windows,
        windows_available=available,
        tokens=n,
        token_ppl_predictions=windows * (seqlen - 1),
        loglikelihood=loglikelihood,
        scored_text_tokens=int(scored.numel()),
        first_token_scored=first_scored,
        words=words,
        bytes=n_bytes,
        text_truncated=truncated,
        batch_size=micro,
    )


def _window_nll(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    windows: int,
    batch_size: int,
    device: torch.device,
    progress: Progress,
) -> tuple[torch.Tensor, int]:
    """Per-position NLL of the next token for each window (the last position predicts the next window's first)."""
    n = len(ids)
    inputs = ids[: windows * seqlen].view(windows, seqlen)
    labels = torch.full((windows * seqlen,), -100, dtype=torch.long)
    stop = min(windows * seqlen + 1, n)
    labels[: stop - 1] = ids[1:stop]
    labels = labels.view(windows, seqlen)
    vocab = _vocab_size(model)
    micro = window_logits_batch(seqlen, vocab, batch_size)
    out = torch.empty(windows, seqlen, dtype=torch.float32)
    for batch in forward_batches(model, windows, micro, f"perplexity ({windows}×{seqlen} tokens)", progress):
        logits = model(input_ids=inputs[batch].to(device)).logits
        out[batch] = _next_token_nll(logits, labels[batch].to(device)).cpu()
    return out, micro


def _next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position in float32; positions labelled -100 get 0."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(getattr(model.config, "vocab_size", 50_000))


def prefix_token_id(tokenizer: Any) -> int | None:
    """What the harness conditions the first token on: BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def _score_first_token(
    model: nn.Module, tokenizer: Any, stream: TokenStream, per_token: torch.Tensor, device: torch.device
) -> bool:
    """The first text token's NLL given the BOS/EOS prefix, unless the stream already has a special token before it."""
    if stream.text_start > 0 or stream.text_end == 0:
        return stream.text_end > stream.text_start
    prefix = prefix_token_id(tokenizer)
    if prefix is None:
        return False
    logits = model(input_ids=torch.tensor([[prefix]], device=device)).logits
    per_token[0] = _next_token_nll(logits[:, -1:], stream.ids[:1].view(1, 1).to(device)).double().cpu().item()
    return True


def _score_tail(
    model: nn.Module, stream: TokenStream, per_token: torch.Tensor, covered: int, seqlen: int, device: torch.device
) -> None:
    """The text tokens after the last full window, predicted from up to `seqlen` earlier tokens (harness style)."""
    end = stream.text_end
    remaining = end - 1 - covered
    if remaining <= 0:
        return
    start = max(0, end - 1 - seqlen)
    x = stream.ids[start : end - 1].view(1, -1).to(device)
    logits = model(input_ids=x).logits[:, -remaining:]
    y = stream.ids[end - remaining : end].view(1, -1).to(device)
    per_token[end - remaining : end] = _next_token_nll(logits, y).double().cpu().flatten()


def _text_prefix(tokenizer: Any, stream: TokenStream, text_end: int, text: str) -> str:
    """The part of the original text covered by the stream's tokens before `text_end`."""
    last = text_end - stream.text_start
    if last <= 0:
        return ""
    if stream.offsets is not None:
        return text[: stream.offsets[last - 1][1]]
    return tokenizer.decode(stream.ids[stream.text_start : text_end].tolist())
