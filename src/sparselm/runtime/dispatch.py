"""Measured per-layer dispatch: time dense and each sparse kernel on this machine, remember only clear winners.

Three rules keep one noisy measurement from deciding for good:
- a bound from first principles (`min_winning_sparsity`): below it a kernel is never measured nor chosen, and a
  dense (0-sparsity) layer is never put on a sparse kernel (a dense form in another precision, torch's weight-only
  int8 GEMM, stores no index and is measured at any sparsity);
- a sparse kernel wins only clearly: its median speed-up over dense (rounds alternate dense and sparse, see
  runtime.timing) is at least 1/MARGIN and the speed-up is not within noise (every round agrees sparse is faster).
  An apparent win the rounds disagree on is measured again in more rounds, up to MAX_ROUNDS; if it stays unclear
  the layer stays dense for this run and nothing is cached, so a later run measures it again;
- a cached decision is used only if it still satisfies both rules (else it is measured again), and `remeasure`
  ignores what was cached before (the new decisions replace the old ones). Within one accelerate() call, layers
  with the same key share one measurement.
Decisions are cached in a JSON file under $SPARSELM_CACHE keyed by shape, dtype, precision (fp32|bf16|int8: what
dense and sparse compute in), device, sparsity bucket, mask structure, token count, threads, torch version and the
kernels measured (the C++ sources' hash and code path: a changed kernel is measured again).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import atomic_write_json
from ..sources import cache_dir
from . import extension
from .kernels import KERNELS
from .timing import Sampler, Speedup, Timing, alternating, repeats_for, sampler, speedup

MARGIN = 0.90
ROUNDS = 7
MAX_ROUNDS = 21
MIN_SAMPLE_SECONDS = 0.002
SPARSITY_BUCKET = 0.02
CACHE_FILE = "runtime-dispatch.json"
CACHE_SCHEMA = 5


def min_winning_sparsity(kernel: str, value_bytes: int) -> float:
    """The sparsity at or below which `kernel` cannot beat dense `F.linear` on the same weight, whatever a timer says.

    A sparse product must read every stored value and its index: at least (1 - s)·(v + i) + b bytes per weight (v
    value bytes, i index bytes per stored value, b index bytes per weight, stored or not: a bitmap's 1/8), where
    dense reads v. With few tokens both are bound by memory bandwidth, so sparse can win only if
    (1 - s)·(v + i) + b < v, i.e. s > (i + b) / (v + i): 0.5 for fp32 CSR (int32 indices), 0.5 for bf16 CSR16,
    0.06 for a bf16 bitmap, under 0.01–0.03 for 8×8/16×16 BSR (one int64 index per tile). With many tokens the work
    per stored weight decides instead, and a sparse product does more of it than dense GEMM (an index load and
    a gathered activation row per multiply-add, which GEMM reuses from registers), so the real crossover is higher
    still (measured about 0.7–0.9 for CSR on 2 CPU cores, depending on tokens and shape). The bound is therefore
    below every real crossover: it never rules out a real win, and it rules out every "win" on a dense or lightly
    sparse layer.
    """
    kernel_of = KERNELS[kernel]
    index = kernel_of.index_bytes
    return (index + kernel_of.index_bytes_per_weight) / (value_bytes + index)


def can_win(kernel: str, sparsity: float, value_bytes: int) -> bool:
    """Above the bound; a kernel that stores no index (a dense form in another precision) can win at any sparsity."""
    bound = min_winning_sparsity(kernel, value_bytes)
    return sparsity > bound or bound == 0


def clear_win(gain: Speedup) -> bool:
    """Faster than dense by the margin at the median, and faster in every round."""
    return gain.median >= 1 / MARGIN and not gain.within_noise


@dataclass(frozen=True)
class Decision:
    choice: str
    confident: bool  # a clear winner, or dense with no sparse kernel even appearing to win
    seconds: dict[str, float]  # median seconds per call of dense and each sparse kernel
    speedups: dict[str, Speedup]  # each sparse kernel over dense

    def cache_entry(self) -> dict[str, Any]:
        return {
            "choice": self.choice,
            "seconds": self.seconds,
            "ratios": {kernel: list(gain.values) for kernel, gain in self.speedups.items()},
        }


def decide(timed: dict[str, Timing]) -> Decision:
    """The fastest sparse kernel among clear winners, else dense (not confident if some kernel only seemed to win)."""
    speedups = {k: speedup(timed["dense"], t) for k, t in timed.items() if k != "dense"}
    seconds = {k: t.median for k, t in timed.items()}
    winners = [k for k, gain in speedups.items() if clear_win(gain)]
    if winners:
        return Decision(max(winners, key=lambda k: speedups[k].median), True, seconds, speedups)
    apparent = any(gain.median >= 1 / MARGIN for gain in speedups.values())
    return Decision("dense", not apparent, seconds, speedups)


def trusted(entry: Any, allowed: list[str]) -> bool:
    """A cached decision that still holds: dense, or an allowed sparse kernel whose stored rounds show a clear win."""
    if not isinstance(entry, dict) or not isinstance(entry.get("seconds"), dict):
        return False
    choice = entry.get("choice")
    if choice == "dense":
        return True
    ratios = entry.get("ratios", {}).get(choice)
    return choice in allowed and bool(ratios) and clear_win(Speedup(tuple(ratios)))


def kernel_samplers(
    weight: torch.Tensor, built: dict[str, Any], tokens: int, dense: tuple[str, Any] | None = None
) -> dict[str, Sampler]:
    """Samplers of dense (F.linear, or `dense`: a kernel name and its built form) and each sparse form on random
    inputs, each sample lasting MIN_SAMPLE_SECONDS."""
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
    calls: dict[str, Callable[[], Any]] = {"dense": lambda: F.linear(x, weight)}
    if dense is not None:
        calls["dense"] = lambda: KERNELS[dense[0]].matmul(dense[1], x)
    for name, sparse in built.items():
        calls[name] = lambda k=name, w=sparse: KERNELS[k].matmul(w, x)
    synchronize = torch.cuda.synchronize if weight.device.type == "cuda" else None
    return {
        name: sampler(fn, repeats_for(fn, MIN_SAMPLE_SECONDS, synchronize=synchronize), synchronize=synchronize)
        for name, fn in calls.items()
    }


def measure_and_decide(
    weight: torch.Tensor, built: dict[str, Any], tokens: int, dense: tuple[str, Any] | None = None
) -> Decision:
    """ROUNDS alternating rounds, more (up to MAX_ROUNDS) while a sparse kernel only seems to win."""
    with torch.inference_mode():
        samplers = kernel_samplers(weight, built, tokens, dense)
        timed = alternating(samplers, ROUNDS, warmup=False)  # repeats_for has warmed each up
        decision = decide(timed)
        while not decision.confident and timed["dense"].rounds < MAX_ROUNDS:
            more = alternating(samplers, ROUNDS, warmup=False)
            timed = {name: t.extended(more[name]) for name, t in timed.items()}
            decision = decide(timed)
    return decision


@dataclass
class Decisions:
    """The decisions one accelerate() call works with: the persistent cache (mutated in place, saved by the caller)
    and those made during this call, which layers of the same key reuse (noisy ones included, as dense)."""

    cache: dict[str, Any]
    remeasure: bool = False  # ignore what the cache held before this call
    made: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lookup(self, key: str, allowed: list[str]) -> dict[str, Any] | None:
        if key in self.made:
            return self.made[key]
        entry = None if self.remeasure else self.cache.get(key)
        return entry if trusted(entry, allowed) else None

    def record(self, key: str, decision: Decision) -> dict[str, Any]:
        entry = self.made[key] = decision.cache_entry()
        if decision.confident:
            self.cache[key] = entry
        else:
            self.cache.pop(key, None)
        return entry


def choose(
    weight: torch.Tensor,
    kernels: list[str],
    tokens: list[int],
    sparsity: float,
    structure: str,
    decisions: Decisions,
    built: dict[str, Any],
    precision: str = "fp32",
    value_bytes: int | None = None,
    dense_kernel: str | None = None,
) -> tuple[dict[int, str], dict[int, dict[str, Any]], bool]:
    """Per token count: the kernel to use, the decision behind it (choice, median seconds, per-round speed-ups) and
    whether nothing had to be measured. Sparse forms are built once into `built`, for the SparseLinear that will use
    them. A cached decision contradicting the bound is dropped: nothing can beat dense there. `dense_kernel` (with
    the bytes of a stored value) is the dense baseline of a precision other than the weight's own (int8)."""
    allowed = [k for k in kernels if can_win(k, sparsity, value_bytes or weight.element_size())]
    choices: dict[int, str] = {}
    basis: dict[int, dict[str, Any]] = {}
    measured = False
    for t in tokens:
        key = cache_key(weight, sparsity, structure, t, torch.get_num_threads(), precision)
        if not allowed:
            decisions.cache.pop(key, None)
            choices[t] = "dense"
            continue
        entry = decisions.lookup(key, allowed)
        if entry is None:
            measured = True
            built.update({k: KERNELS[k].build(weight) for k in allowed if k not in built})
            dense = None
            if dense_kernel is not None:
                built.setdefault(dense_kernel, KERNELS[dense_kernel].build(weight))
                dense = (dense_kernel, built[dense_kernel])
            entry = decisions.record(key, measure_and_decide(weight, {k: built[k] for k in allowed}, t, dense))
        choices[t], basis[t] = entry["choice"], entry
    return choices, basis, not measured


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def load_cache(path: Path) -> dict[str, Any]:
    """The cached decisions of this schema ({} for a missing or unreadable file)."""
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if k.startswith(f"v{CACHE_SCHEMA}|")}


def save_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cache)


def cache_key(
    weight: torch.Tensor, sparsity: float, structure: str, tokens: int, threads: int, precision: str = "fp32"
) -> str:
    bucket = round(int(sparsity / SPARSITY_BUCKET) * SPARSITY_BUCKET, 2)
    rows, cols = weight.shape
    dtype = str(weight.dtype).removeprefix("torch.")
    return (
        f"v{CACHE_SCHEMA}|{rows}x{cols}|{dtype}|{precision}|{weight.device.type}|s{bucket:.2f}|{structure}|T{tokens}"
        f"|threads{threads}|torch{torch.__version__}|kernels-{extension.kernels_id()}"
    )
