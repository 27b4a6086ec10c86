"""Streamed, exact statistics of weight magnitudes.

Every tensor is read in chunks and reduced into one fixed histogram keyed by the float32 bit pattern of |w|:
bin 0 holds exact zeros and bin b ≥ 1 holds |w| whose bits lie in ((b−1)·2¹⁶, b·2¹⁶], i.e. 128 bins per octave
with upper edges that are exactly representable. Because powers of two are bin edges, "fraction with |w| ≤ 2^-k"
is exact from the histogram alone; quantiles are exact order statistics, refined by a second pass that gathers
only the values inside the bins that hold the wanted ranks. Memory stays at one chunk on top of the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

N_ABS_BINS = 32769  # bin 0 = exact zero, bins 1..32768 by the high 16 bits of (bits(|w|) − 1)
CHUNK = 1 << 17
QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
POW2_EXPONENTS: tuple[int, ...] = tuple(range(21))

TensorSource = Callable[[], Iterable[torch.Tensor]]


def abs_bin_keys(chunk: torch.Tensor) -> torch.Tensor:
    """Histogram key of each |w| (int64): 0 for zero, ((bits−1) >> 16) + 1 otherwise."""
    bits = chunk.float().abs().contiguous().view(torch.int32)
    return ((bits - 1) >> 16).add_(1).long()


def bin_upper_edges() -> np.ndarray:
    """Upper edge of each |w| bin (float64); bin 0 is the zero bin with edge 0; the NaN bin has edge inf."""
    keys = np.arange(N_ABS_BINS, dtype=np.int64)
    finite = keys < 0x7F80
    bits = np.where(finite, keys << 16, 0).astype(np.uint32)
    edges = bits.view(np.float32).astype(np.float64)
    edges[~finite] = np.inf
    return edges


def _chunks(t: torch.Tensor) -> Iterable[torch.Tensor]:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start : start + CHUNK]


@dataclass
class Histogram:
    """Counts of |w| per bin for positive (first half) and negative (second half) weights, plus float64 moments."""

    signed: torch.Tensor = field(default_factory=lambda: torch.zeros(2 * N_ABS_BINS, dtype=torch.int64))
    total: float = 0.0
    total_abs: float = 0.0
    total_sq: float = 0.0

    def add_tensor(self, t: torch.Tensor) -> None:
        for chunk in _chunks(t):
            c = chunk.float()
            keys = abs_bin_keys(c)
            keys += (c < 0).long() * N_ABS_BINS
            self.signed += torch.bincount(keys, minlength=2 * N_ABS_BINS)
            c64 = c.double()
            self.total += float(c64.sum())
            self.total_abs += float(c64.abs().sum())
            self.total_sq += float(torch.dot(c64, c64))

    @property
    def positive(self) -> torch.Tensor:
        return self.signed[:N_ABS_BINS]

    @property
    def negative(self) -> torch.Tensor:
        return self.signed[N_ABS_BINS:]

    def merge(self, other: Histogram) -> None:
        self.signed += other.signed
        self.total += other.total
        self.total_abs += other.total_abs
        self.total_sq += other.total_sq

    @property
    def abs_counts(self) -> torch.Tensor:
        return self.positive + self.negative

    @property
    def count(self) -> int:
        return int(self.abs_counts.sum())

    def cdf(self) -> tuple[np.ndarray, np.ndarray]:
        return cdf_from_counts(self.abs_counts)


def cdf_from_counts(abs_counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(upper edge of |w| bin, fraction of weights with |w| ≤ edge) over non-empty bins."""
    counts = abs_counts.numpy()
    keep = counts > 0
    cum = np.cumsum(counts) / max(1, counts.sum())
    return bin_upper_edges()[keep], cum[keep]


def order_statistics(source: TensorSource, hist: Histogram, ranks: Sequence[int]) -> dict[int, float]:
    """Exact values of |w| at the given 0-based ranks (ascending), using one extra pass over the tensors."""
    cum = torch.cumsum(hist.abs_counts, 0)
    wanted: dict[int, tuple[int, int]] = {}
    for r in sorted(set(ranks)):
        b = int(torch.searchsorted(cum, torch.tensor(r), right=True))
        wanted[r] = (b, r - (int(cum[b - 1]) if b > 0 else 0))
    bins = sorted({b for b, _ in wanted.values() if b > 0})
    # the histogram says exactly how many values each wanted bin holds: fill preallocated buffers (no fragmentation)
    buffers = {b: torch.empty(int(hist.abs_counts[b]), dtype=torch.float32) for b in bins}
    filled = dict.fromkeys(bins, 0)
    if bins:
        wanted_bin = torch.zeros(N_ABS_BINS, dtype=torch.bool)
        wanted_bin[bins] = True
        for t in source():
            for chunk in _chunks(t):
                a = chunk.float().abs()
                keys = abs_bin_keys(a)
                hit = wanted_bin[keys]
                if not hit.any():
                    continue
                hit_keys, hit_values = keys[hit], a[hit]
                for b in torch.unique(hit_keys).tolist():
                    v = hit_values[hit_keys == b]
                    buffers[b][filled[b] : filled[b] + v.numel()] = v
                    filled[b] += v.numel()
    sorted_bins = {b: torch.sort(buf).values for b, buf in buffers.items()}
    return {r: 0.0 if b == 0 else float(sorted_bins[b][i]) for r, (b, i) in wanted.items()}


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's interpolation, including its choice of formula for t ≥ 0.5, so results match it exactly."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def exact_quantiles(source: TensorSource, hist: Histogram, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """Quantiles of |w| with numpy's default ('linear') definition, computed without concatenating tensors."""
    n = hist.count
    if n == 0:
        return {f"{q:g}": math.nan for q in qs}
    positions = [q * (n - 1) for q in qs]
    ranks = {int(math.floor(p)) for p in positions} | {min(int(math.floor(p)) + 1, n - 1) for p in positions}
    values = order_statistics(source, hist, sorted(ranks))
    out = {}
    for q, p in zip(qs, positions):
        lo = int(math.floor(p))
        hi = min(lo + 1, n - 1)
        out[f"{q:g}"] = _lerp(values[lo], values[hi], p - lo)
    return out


def pow2_fractions(hist: Histogram, exponents: Sequence[int] = POW2_EXPONENTS) -> dict[str, float]:
    """Fraction of weights with |w| ≤ 2^-k: exact, because 2^-k is a bin's upper edge."""
    counts = hist.abs_counts
    n = max(1, int(counts.sum()))
    cum = torch.cumsum(counts, 0)
    out = {}
    for k in exponents:
        bits = int(np.array([2.0**-k], dtype=np.float32).view(np.int32)[0])
        last_bin = ((bits - 1) >> 16) + 1
        out[str(k)] = int(cum[last_bin]) / n
    return out


def summarize(source: TensorSource, hist: Histogram | None = None) -> tuple[dict[str, object], Histogram]:
    """All statistics of a set of tensors: counts, zero fraction, moments, exact |w| quantiles and 2^-k fractions."""
    if hist is None:
        hist = Histogram()
        for t in source():
            hist.add_tensor(t)
    n = hist.count
    zeros = int(hist.abs_counts[0])
    mean = hist.total / n if n else math.nan
    var = max(0.0, hist.total_sq / n - mean * mean) if n else math.nan
    quantiles = exact_quantiles(source, hist, (*QUANTILES, 1.0))
    largest = quantiles.pop("1")
    stats: dict[str, object] = {
        "count": n,
        "zeros": zeros,
        "zero_fraction": zeros / n if n else math.nan,
        "mean": mean,
        "std": math.sqrt(var) if n else math.nan,
        "mean_abs": hist.total_abs / n if n else math.nan,
        "max_abs": largest,
        "abs_quantiles": quantiles,
        "fraction_abs_le_2pow_minus_k": pow2_fractions(hist),
    }
    return stats, hist
