"""`bench()`: file size and forward speed, dense against accelerated, measured side by side.

Prefill is timed as generation runs it (logits for the last position only); decode is timed as one-token steps
with the KV cache. Each round times the dense model then the accelerated one and the medians are compared, so load
from other processes affects both alike.
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SparselmError
from ..facts import context_length
from .accelerate import Policy, accelerate
from .inputs import is_causal_lm, random_prefill

PROMPT_FOR_DECODE = 32


def timings(fn: Callable[[], Any], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def side_by_side(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, timed in interleaved rounds after one warm-up call each."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += timings(fn, 1)
    return {k: statistics.median(v) for k, v in samples.items()}


def cache_argument(model: nn.Module) -> str:
    """transformers 5 calls the KV cache `cache`; earlier versions call it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per one-token forward with the KV cache, after an untimed prefill of `prompt`."""
    name = cache_argument(model)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{name: past})
        past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def size_info(model_or_dir: str, model: nn.Module) -> dict[str, Any]:
    """Dense and packed bytes: read from the manifest of a packed directory, else by coding the weights in memory."""
    from ..models import resolve
    from ..storage import is_packed, read_manifest
    from ..storage.pack import FORMATS, choose_encoding

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
) -> dict[str, Any]:
    """Latency and throughput of prefill at each token count and of decode steps, dense vs accelerated."""
    from ..models import load_with_source

    tokens = sorted({int(t) for t in tokens})
    previous_threads = torch.get_num_threads()
    try:
        dense, source = load_with_source(model_or_dir)
        limit = context_length(dense)
        if limit and tokens[-1] > limit:
            raise SparselmError(f"--tokens {tokens[-1]} exceeds the model's {limit} positions; use smaller counts")
        accelerated = copy.deepcopy(dense)
        report = accelerate(accelerated, policy, tokens=sorted(set(tokens) | {1}), threads=threads, progress=progress)
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
            sec = side_by_side({"dense": lambda: dense(**kw), "accelerated": lambda: accelerated(**kw)}, rounds)
            prefill.append(speed_row(t, sec))
            if progress:
                progress(f"prefill {t}")
        decode = None
        if is_causal_lm(dense):
            prompt = torch.randint(3, vocab, (1, PROMPT_FOR_DECODE), generator=generator)
            decode_seconds(dense, prompt, 1), decode_seconds(accelerated, prompt, 1)  # warm-up
            samples: dict[str, list[float]] = {"dense": [], "accelerated": []}
            for _ in range(rounds):
                samples["dense"].append(decode_seconds(dense, prompt, steps))
                samples["accelerated"].append(decode_seconds(accelerated, prompt, steps))
            decode = speed_row(1, {k: statistics.median(v) for k, v in samples.items()})
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


def speed_row(tokens: int, seconds: dict[str, float]) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "dense_ms": seconds["dense"] * 1e3,
        "accelerated_ms": seconds["accelerated"] * 1e3,
        "speedup": seconds["dense"] / seconds["accelerated"],
        "dense_tokens_per_s": tokens / seconds["dense"],
        "accelerated_tokens_per_s": tokens / seconds["accelerated"],
    }

