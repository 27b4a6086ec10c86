"""Tokens per second of sparselm's perplexity evaluation vs a plain Hugging Face loop over the same windows.

The plain loop is the SparseGPT/Wanda evaluation code: one window at a time, `model(x).logits`, shifted
cross-entropy. Ours is `sparselm.evaluation.perplexity.perplexity` with `max_windows` set to the same windows (so no
tail window), batched, computing the harness metrics too, and including its own tokenisation (twice: with and
without special tokens). Runs alternate, best of `--repeats`. Target: ratio ≥ 1.0.
Run: .venv/bin/python benchmarks/eval_speed.py [--windows N] [--seqlen L] [--batch-size B] [--threads T]
"""

from __future__ import annotations

import argparse
import time

import torch

from sparselm.data import ptb_text
from sparselm.evaluation.perplexity import perplexity
from sparselm.models import load, load_tokenizer


def plain_loop(model, tokenizer, text: str, seqlen: int, windows: int) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (windows * seqlen)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    text = ptb_text("test")[: args.windows * args.seqlen * 8]  # enough characters for the windows, little more
    tokens = args.windows * args.seqlen
    best_ours, best_plain = float("inf"), float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = perplexity(model, tokenizer, text, args.seqlen, max_windows=args.windows, batch_size=args.batch_size)
        best_ours = min(best_ours, time.perf_counter() - t)
        t = time.perf_counter()
        plain = plain_loop(model, tokenizer, text, args.seqlen, args.windows)
        best_plain = min(best_plain, time.perf_counter() - t)
    assert abs(ours.token_ppl / plain - 1) < 1e-4, (ours.token_ppl, plain)
    print(f"{args.model}: {args.windows} windows × {args.seqlen} tokens, batch {ours.batch_size}, "
          f"torch threads {torch.get_num_threads()}; token_ppl {ours.token_ppl:.4f} (plain loop {plain:.4f})")
    print(f"ours  {tokens / best_ours:8.1f} tokens/s  ({best_ours:.2f} s, with word/byte perplexity too)")
    print(f"plain {tokens / best_plain:8.1f} tokens/s  ({best_plain:.2f} s)")
    print(f"ratio ours/plain: {best_plain / best_ours:.2f}× (target ≥ 1.0×)")


if __name__ == "__main__":
    main()
