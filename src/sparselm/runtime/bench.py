"""`bench()`: file size and forward speed, dense against accelerated, measured side by side.

Prefill is timed as generation runs it (logits for the last position only); decode is timed as one-token steps
with the KV cache. Dense and accelerated runs alternate round by round (runtime.timing), so load from other
processes affects both alike; each row reports the median milliseconds with their range over the rounds, and the
speed-up as the median of the per-round ratios with its range and a within-noise verdict.

Two dense baselines run in the same rounds: the model as loaded (fp32, the `dense_*` and `speedup*` fields) and the
same model in bf16 (`dense_bf16_*`, `speedup_over_bf16*`), which is nearly lossless and on CPUs with native bf16
(avx512_bf16/AMX) much faster than fp32, so it is the baseline a user would otherwise pick. Dense int8 with dynamic
activation quantisation (w8a8, `dense_w8a8_*`, `speedup_over_w8a8*`) is a third baseline only where its perplexity
stays within 2% of the model as given (runtime.quality, measured first with the model's tokenizer; `w8a8_quality`);
otherwise a note gives the measured change and its fields are None. `--dtype w8a8` itself is refused beyond 2%.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import SparselmError
from ..facts import context_length, is_causal_lm
from ..models import load, load_tokenizer
from ..progress import SILENT, Progress
from ..sources import resolve
from ..storage import is_packed, read_manifest
from ..storage.pack import FORMATS, choose_encoding
from .accelerate import AccelerateReport, DType, LayerChoice, Policy, accelerate, check_settings
from . import quality
from .inputs import random_prefill
from .timing import Sampler, Timing, alternating, sampler, speedup

PROMPT_FOR_DECODE = 32


@dataclass(frozen=True)
class SpeedRow:
    """One timed shape: milliseconds of each side (median, low, high over rounds), the paired speed-up with its
    range and verdict, and tokens per second."""

    tokens: int
    dense_ms: float
    dense_ms_low: float
    dense_ms_high: float
    accelerated_ms: float
    accelerated_ms_low: float
    accelerated_ms_high: float
    speedup: float
    speedup_low: float
    speedup_high: float
    within_noise: bool
    dense_tokens_per_s: float
    accelerated_tokens_per_s: float
    dense_bf16_ms: float | None  # None: dense bf16 was not timed (`bench(bf16_baseline=False)`)
    dense_bf16_ms_low: float | None
    dense_bf16_ms_high: float | None
    speedup_over_bf16: float | None
    speedup_over_bf16_low: float | None
    speedup_over_bf16_high: float | None
    within_noise_over_bf16: bool | None
    dense_w8a8_ms: float | None  # None: dense w8a8 was not timed (not within 2% in perplexity, or not measured)
    dense_w8a8_ms_low: float | None
    dense_w8a8_ms_high: float | None
    speedup_over_w8a8: float | None
    speedup_over_w8a8_low: float | None
    speedup_over_w8a8_high: float | None
    within_noise_over_w8a8: bool | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecodeRow(SpeedRow):
    """Decode: one-token steps with the KV cache after a prompt (`tokens` is 1)."""

    steps: int
    prompt_tokens: int


@dataclass(frozen=True)
class SizeInfo:
    """Bytes of the weights dense and packed, and where the packed size comes from."""

    dense_bytes: int
    packed_bytes: int
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchResult:
    """`bench`'s measurements; `to_json()` is what `sparselm bench --json` prints."""

    model: str
    rounds: int
    prefill: list[SpeedRow]
    decode: DecodeRow | None
    report: AccelerateReport
    size: SizeInfo | None
    notes: tuple[str, ...] = ()
    w8a8_quality: quality.QualityCheck | None = None  # None: not measured (no tokenizer, or not asked for)

    @property
    def dtype(self) -> str:
        return self.report.dtype

    def to_json(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "threads": self.report.threads,
            "policy": self.report.policy,
            "rounds": self.rounds,
            "prefill": [row.to_json() for row in self.prefill],
            "decode": self.decode.to_json() if self.decode else None,
            "layers": {
                "replaced": self.report.replaced,
                "total": self.report.layers_total,
                "choices": self.report.choices,
                "fused_groups": len(self.report.fused_groups),
            },
            "per_layer": [layer.to_json() for layer in self.report.layers],
        }
        if self.size is not None:
            out["size"] = self.size.to_json()
        out["dtype"] = self.report.dtype
        out["notes"] = list(self.notes)
        out["w8a8_quality"] = self.w8a8_quality.to_json() if self.w8a8_quality else None
        return out

    @property
    def per_layer(self) -> list[LayerChoice]:
        return self.report.layers


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


def size_info(model_or_dir: str, model: nn.Module) -> SizeInfo:
    """Dense and packed bytes: read from the manifest of a packed directory, else by coding the weights in memory."""
    path = resolve(model_or_dir).path
    if is_packed(path):
        summary = read_manifest(path)["summary"]
        return SizeInfo(summary["dense_bytes"], summary["packed_bytes"], "manifest")
    dense = packed = 0
    for tensor in model.state_dict().values():
        dense += tensor.numel() * tensor.element_size()
        packed += choose_encoding(tensor, FORMATS["auto"], use_zstd=True).nbytes
    return SizeInfo(dense, packed, "coded in memory (auto)")


def bench(
    model_or_dir: str,
    tokens: Iterable[int] = (1, 128, 512),
    threads: int | None = None,
    policy: Policy = "auto",
    rounds: int = 5,
    steps: int = 16,
    measure_size: bool = True,
    progress: Progress = SILENT,
    remeasure: bool = False,
    dtype: DType = "fp32",
    bf16_baseline: bool = True,
    w8a8_baseline: bool = True,
) -> BenchResult:
    """Latency and throughput of prefill at each token count and of decode steps, dense (fp32, bf16 and w8a8 where
    its perplexity allows) vs accelerated in `dtype` (see `accelerate`).

    `remeasure` makes the dispatch measure every layer again instead of using its cached decisions. Without
    `bf16_baseline` dense bf16 is not timed (its fields are None): a sweep on a CPU that only emulates bf16
    (`native_bf16()` is False) saves the time of a baseline that cannot be the fastest there. With `w8a8_baseline`
    the perplexity change of dense w8a8 is measured first (runtime.quality; a causal LM with a tokenizer) and dense
    w8a8 is timed only when it is within 2%. `dtype="w8a8"` always measures it and refuses a change above 2%."""
    tokens = sorted({int(t) for t in tokens})
    if not tokens or tokens[0] < 1:
        raise SparselmError(f"--tokens needs positive integers, got {tokens}")
    if rounds < 1 or steps < 1:
        raise SparselmError(f"--rounds and decode steps must be at least 1, got rounds={rounds}, steps={steps}")
    check_settings(policy, threads, dtype)
    if dtype == "w8a8":
        quality.require_measurable(model_or_dir)
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        dense = load(model_or_dir)
        limit = context_length(dense)
        if limit and tokens[-1] > limit:
            raise SparselmError(f"--tokens {tokens[-1]} exceeds the model's {limit} positions; use smaller counts")
        check, w8a8, notes = None, None, ()
        if w8a8_baseline or dtype == "w8a8":
            check, w8a8, notes = w8a8_baseline_of(model_or_dir, dense, progress)
        if dtype == "w8a8":
            quality.require_acceptable(check)
        accelerated = copy.deepcopy(dense)
        report = accelerate(
            accelerated, policy, tokens=sorted(set(tokens) | {1}), threads=threads, remeasure=remeasure,
            progress=progress, dtype=dtype,
        )
        models = {"dense": dense, "accelerated": accelerated}
        if bf16_baseline:
            models["dense_bf16"] = copy.deepcopy(dense).to(torch.bfloat16)
        if w8a8 is not None:
            models["dense_w8a8"] = w8a8
        result = run_timings(model_or_dir, models, report, tokens, rounds, steps, measure_size, progress)
        return replace(result, notes=(*result.notes, *notes), w8a8_quality=check)
    finally:
        torch.set_num_threads(previous_threads)


def w8a8_baseline_of(
    model_or_dir: str, dense: nn.Module, progress: Progress
) -> tuple[quality.QualityCheck | None, nn.Module | None, tuple[str, ...]]:
    """The perplexity check of dense w8a8, the w8a8 model when it passes (else None), and a note when it does not
    or could not be measured."""
    tokenizer = load_tokenizer(model_or_dir, required=False) if is_causal_lm(dense) else None
    if tokenizer is None:
        return None, None, ("dense w8a8 (int8 weights and activations) is not a baseline here: its perplexity change "
                            "needs a causal LM with a tokenizer to be measured",)
    w8a8 = quality.w8a8_model(dense)
    check = quality.w8a8_check(dense, w8a8, tokenizer, progress=progress)
    if check.acceptable:
        return check, w8a8, ()
    return check, None, (f"dense w8a8 is not a baseline here: {check.describe()}, more than the "
                         f"{quality.MAX_PERPLEXITY_CHANGE:.0%} allowed",)


def run_timings(
    model_or_dir: str,
    models: dict[str, nn.Module],
    report: AccelerateReport,
    tokens: list[int],
    rounds: int,
    steps: int,
    measure_size: bool,
    progress: Progress,
) -> BenchResult:
    """Time each of `models` (dense, accelerated, dense_bf16, dense_w8a8) in the same alternating rounds."""
    dense = models["dense"]
    vocab = dense.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefill = []
    causal = is_causal_lm(dense)
    progress.start("timing dense vs accelerated", len(tokens) + int(causal))
    with torch.inference_mode():
        for t in tokens:
            kw = random_prefill(dense, t, generator)
            samplers = {side: sampler(lambda m=model: m(**kw)) for side, model in models.items()}
            prefill.append(SpeedRow(**speed_fields(t, alternating(samplers, rounds))))
            progress.advance()
        decode = None
        if causal:
            prompt = torch.randint(3, vocab, (1, PROMPT_FOR_DECODE), generator=generator)
            decoders = {side: decode_sampler(model, prompt, steps) for side, model in models.items()}
            fields = speed_fields(1, alternating(decoders, rounds))
            decode = DecodeRow(**fields, steps=steps, prompt_tokens=PROMPT_FOR_DECODE)
            progress.advance()
    size = size_info(model_or_dir, dense) if measure_size else None
    notes = (*report.notes, baseline_note())
    return BenchResult(model_or_dir, rounds, prefill, decode, report, size, notes)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (avx512_bf16), so dense bf16 can beat dense fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported())


def baseline_note() -> str:
    """Which dense configuration is the honest baseline on this CPU."""
    if native_bf16():
        return "this CPU computes bf16 natively (avx512_bf16): dense bf16 is the baseline to beat"
    return (
        "this CPU has no avx512_bf16, so dense bf16 is emulated here and slower than dense fp32: the honest baseline "
        "on this machine is the faster dense column of equal quality (usually fp32)"
    )


def speed_fields(tokens: int, timed: dict[str, Timing]) -> dict[str, Any]:
    """A SpeedRow's fields: milliseconds (median, low, high over rounds) of each side, the paired speed-ups over
    dense fp32, dense bf16 and dense w8a8 (None where not timed) and their verdicts."""
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
        **baseline_fields("bf16", timed.get("dense_bf16"), accelerated),
        **baseline_fields("w8a8", timed.get("dense_w8a8"), accelerated),
    }


def baseline_fields(name: str, baseline: Timing | None, accelerated: Timing) -> dict[str, Any]:
    """`dense_{name}_ms*` and `speedup_over_{name}*` of an extra dense baseline; all None when it was not timed."""
    keys = (f"dense_{name}_ms", f"dense_{name}_ms_low", f"dense_{name}_ms_high", f"speedup_over_{name}",
            f"speedup_over_{name}_low", f"speedup_over_{name}_high", f"within_noise_over_{name}")
    if baseline is None:
        return dict.fromkeys(keys)
    over = speedup(baseline, accelerated)
    values = (baseline.median * 1e3, baseline.low * 1e3, baseline.high * 1e3, over.median, over.low, over.high,
              over.within_noise)
    return dict(zip(keys, values, strict=True))
