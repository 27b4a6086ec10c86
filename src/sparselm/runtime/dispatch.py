"""Measured per-layer dispatch: time dense and each sparse kernel on this machine, remember the winner.

Timings are interleaved (dense, sparse, dense, sparse, …), so a long burst of load from other processes does not
favour either side. A sparse kernel must beat dense by MARGIN both in its fastest block (load only ever adds time,
so the minimum is the steadiest estimate of a kernel's cost) and in its median block (so one lucky block does not
decide); when the two disagree the layer stays dense, which keeps the accelerated model from being slower.
Decisions are cached in a JSON file under
$SPARSELM_CACHE keyed by shape, sparsity bucket, mask structure, token count, threads and torch version.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io import atomic_write_json
from .kernels import KERNELS

MARGIN = 0.90
ROUNDS = 7
MIN_BLOCK_SECONDS = 0.002
SPARSITY_BUCKET = 0.02
CACHE_FILE = "runtime-dispatch.json"
CACHE_SCHEMA = 2


def cache_path() -> Path:
    from ..models import cache_dir

    return cache_dir() / CACHE_FILE


def load_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cache)


def cache_key(shape: tuple[int, int], sparsity: float, structure: str, tokens: int, threads: int) -> str:
    bucket = round(int(sparsity / SPARSITY_BUCKET) * SPARSITY_BUCKET, 2)
    return (
        f"v{CACHE_SCHEMA}|{shape[0]}x{shape[1]}|s{bucket:.2f}|{structure}|T{tokens}|threads{threads}"
        f"|torch{torch.__version__}"
    )


def time_call(fn: Callable[[], Any], iterations: int, cuda: bool = False) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def iterations_for(fn: Callable[[], Any], cuda: bool) -> int:
    """Enough calls that one timed block lasts MIN_BLOCK_SECONDS (timer noise stays small)."""
    fn()
    once = time_call(fn, 1, cuda)
    return max(1, int(MIN_BLOCK_SECONDS / max(once, 1e-7)))


def measure(weight: torch.Tensor, built: dict[str, torch.Tensor], tokens: int) -> dict[str, dict[str, float]]:
    """Seconds per call (fastest and median block) of dense F.linear and each sparse form, on random inputs."""
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
    calls: dict[str, Callable[[], Any]] = {"dense": lambda: F.linear(x, weight)}
    for name, sparse in built.items():
        calls[name] = lambda k=name, w=sparse: KERNELS[k].matmul(w, x)
    cuda = weight.device.type == "cuda"
    with torch.inference_mode():
        iterations = {name: iterations_for(fn, cuda) for name, fn in calls.items()}
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(ROUNDS):
            for name, fn in calls.items():
                samples[name].append(time_call(fn, iterations[name], cuda))
    return {
        "min": {name: min(s) for name, s in samples.items()},
        "median": {name: statistics.median(s) for name, s in samples.items()},
    }


def decide(times: dict[str, dict[str, float]]) -> str:
    """The fastest sparse kernel (by its minimum) if it beats dense by MARGIN in minimum and median, else dense."""
    fastest, typical = times["min"], times["median"]
    sparse = [k for k in fastest if k != "dense"]
    if not sparse:
        return "dense"
    best = min(sparse, key=fastest.__getitem__)
    wins = all(stat[best] < MARGIN * stat["dense"] for stat in (fastest, typical))
    return best if wins else "dense"
