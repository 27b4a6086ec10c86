"""`bench()`: file size and forward speed, dense against accelerated, measured side by side.

Prefill is timed as generation runs it (logits for the last position only); decode is timed as one-token steps
with the KV cache. Dense and accelerated runs alternate round by round (runtime.timing), so load from other
processes affects both alike; each row reports the median milliseconds with their range over the rounds, and the
speed-up as the median of the per-round ratios with its range and a within-noise verdict.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SparselmError
from ..facts import context_length, is_causal_lm
from ..models import load
from ..sources import resolve
from ..storage import is_packed, read_manifest
from ..storage.pack import FORMATS, choose_encoding
from .accelerate import Policy, accelerate, check_settings
from .inputs import random_prefill
from .timing import Sampler, Timing, alternating, sampler, speedup

PROMPT_FOR_DECODE = 32


def cache_argument(model: nn.Module) -> str:
    """transformers 5 calls the KV cache `cache`; earlier versions call it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_sampler(model: nn.Module, prompt: torch.Tensor, steps: int) -> Sampler:
    """Seconds per one-token forward with the KV cache, over `steps` steps after an untimed prefill of `prompt`."""
    name = cache_argument(model)

    def sample() -> float:
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{name: past})
            past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps

    return sample


def size_info(model_or_dir: str, model: nn.Module) -> dict[str, Any]:
    """Dense and packed bytes: read from the manifest of a packed directory, else by coding the weights in memory."""
    path = resolve(model_or_dir).path
    if is_packed(path):
        summary = read_manifest(path)["summary"]
        return {"dense_bytes": summary["dense_bytes"], "packed_bytes": summary["packed_bytes"], "source": "manifest"}
    dense = packed = 0
    for tensor in model.state_dict().values():
        dense += tensor.numel() * tensor.element_size()
        packed += choose_encoding(tensor, FORMATS["auto"], use_zstd=True).nbytes
    return {"dense_bytes": dense, "packed_bytes": packed, "source": "coded in memory (auto)"}


def bench(
    model_or_dir: str,
    tokens: Iterable[int] = (1, 128, 512),
    threads: int | None = None,
    policy: Policy = "auto",
    rounds: int = 5,
    steps: int = 16,
    measure_size: bool = True,
    progress: Callable[[str], None] | None = None,
    remeasure: bool = False,
) -> dict[str, Any]:
    """Latency and throughput of prefill at each token count and of decode steps, dense vs accelerated.

    `remeasure` makes the dispatch measure every layer again instead of using its cached decisions."""
    tokens = sorted({int(t) for t in tokens})
    if not tokens or tokens[0] < 1:
        raise SparselmError(f"--tokens needs positive integers, got {tokens}")
    if rounds < 1 or steps < 1:
        raise SparselmError(f"--rounds and decode steps must be at least 1, got rounds={rounds}, steps={steps}")
    check_settings(policy, threads)
    previous_threads = torch.get_num_threads()
    try:
        dense = load(model_or_dir)
        limit = context_length(dense)
        if limit and tokens[-1] > limit:
            raise SparselmError(f"--tokens {tokens[-1]} exceeds the model's {limit} positions; use smaller counts")
        accelerated = copy.deepcopy(dense)
        report = accelerate(
            accelerated, policy, tokens=sorted(set(tokens) | {1}), threads=threads, remeasure=remeasure,
            progress=progress,
        )
        return run_timings(model_or_dir, dense, accelerated, report, tokens, rounds, steps, measure_size, progress)
    finally:
        torch.set_num_threads(previous_threads)


def run_timings(
    model_or_dir: str,
    dense: nn.Module,
    accelerated: nn.Module,
    report: dict[str, Any],
    tokens: list[int],
    rounds: int,
    steps: int,
    measure_size: bool,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    vocab = dense.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefill = []
    with torch.inference_mode():
        for t in tokens:
            kw = random_prefill(dense, t, generator)
            samplers = {"dense": sampler(lambda: dense(**kw)), "accelerated": sampler(lambda: accelerated(**kw))}
            prefill.append(speed_row(t, alternating(samplers, rounds)))
            if progress:
                progress(f"prefill {t}")
        decode = None
        if is_causal_lm(dense):
            prompt = torch.randint(3, vocab, (1, PROMPT_FOR_DECODE), generator=generator)
            models = {"dense": dense, "accelerated": accelerated}
            decoders = {side: decode_sampler(model, prompt, steps) for side, model in models.items()}
            decode = speed_row(1, alternating(decoders, rounds))
            decode["steps"] = steps
            decode["prompt_tokens"] = PROMPT_FOR_DECODE
    out = {
        "model": model_or_dir,
        "threads": report["threads"],
        "policy": report["policy"],
        "rounds": rounds,
        "prefill": prefill,
        "decode": decode,
        "layers": {
            "replaced": report["replaced"],
            "total": report["layers_total"],
            "choices": report["choices"],
            "fused_groups": len(report["fused_groups"]),
        },
        "per_layer": report["layers"],
    }
    if measure_size:
        out["size"] = size_info(model_or_dir, dense)
    return out


def speed_row(tokens: int, timed: dict[str, Timing]) -> dict[str, Any]:
    """Milliseconds (median, low, high over rounds) of each side, the paired speed-up and its verdict."""
    dense, accelerated = timed["dense"], timed["accelerated"]
    return {
        "tokens": tokens,
        "dense_ms": dense.median * 1e3,
        "dense_ms_low": dense.low * 1e3,
        "dense_ms_high": dense.high * 1e3,
        "accelerated_ms": accelerated.median * 1e3,
        "accelerated_ms_low": accelerated.low * 1e3,
        "accelerated_ms_high": accelerated.high * 1e3,
        **speedup(dense, accelerated).as_dict(),
        "dense_tokens_per_s": tokens / dense.median,
        "accelerated_tokens_per_s": tokens / accelerated.median,
    }
