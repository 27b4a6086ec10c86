"""Magnitude pruning: per matrix, or with one exact global threshold found without concatenating all weights.

The global cut is the k-th smallest score over every matrix. A strided sample of all scores brackets it; one
streamed pass counts the scores below the bracket and gathers only those inside it (≈1% of the weights), which
pins the exact k-th value. Equal scores at the cut are pruned in matrix order, then flat-index order, so the
achieved sparsity is exact and the result deterministic. If the bracket misses (a pathological distribution), the
exact streamed order statistic of `sparselm.analysis.stats` is used instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..analysis.stats import Histogram, order_statistics
from ..masks import NM, Block, Pattern, expand_tiles, keep_n_of_m, prune_count, tile_scores

SAMPLE_SIZE = 1 << 20

ScoreSource = Callable[[], Iterable[torch.Tensor]]
Sampler = Callable[[int], Iterable[torch.Tensor]]


def magnitude_scores(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """|w| per weight, or the L2 norm of each tile for block patterns (N:M ranks plain |w| within groups)."""
    scores = weight.detach().abs() if weight.dtype == torch.float32 else weight.detach().float().abs()
    if isinstance(pattern, Block):
        return tile_scores(scores, pattern.rows, pattern.cols)
    return scores


@dataclass(frozen=True)
class Cut:
    """Prune every score < threshold, and the first `ties` scores equal to it (of `equal` in all), in order."""

    threshold: float
    ties: int
    equal_per_source: tuple[int, ...]

    def prune_plan(self) -> list[int]:
        """How many of each source's scores equal to the threshold are pruned (earlier sources first)."""
        left, plan = self.ties, []
        for equal in self.equal_per_source:
            plan.append(min(left, equal))
            left -= plan[-1]
        return plan


def global_cut(source: ScoreSource, total: int, n_prune: int, sampler: Sampler | None = None) -> Cut:
    """The exact cut that prunes `n_prune` of the `total` scores of `source` (each ≥ 0).

    `sampler(stride)` may yield every stride-th score of each source tensor more cheaply than `source` can.
    """
    if n_prune <= 0:
        return Cut(-math.inf, 0, ())
    rank = n_prune - 1
    stride = max(1, total // SAMPLE_SIZE)
    sampler = sampler or (lambda k: (s.reshape(-1)[::k].clone() for s in source()))
    lo, hi = _bracket(torch.cat(list(sampler(stride))), total, rank)
    below = 0
    inside: list[torch.Tensor] = []
    for s in source():
        flat = s.reshape(-1)
        below += int(torch.count_nonzero(flat < lo))
        inside.append(flat[(flat >= lo) & (flat <= hi)])
    middle = torch.sort(torch.cat(inside)).values
    if not below <= rank < below + middle.numel():
        return _exact_cut(source, rank, n_prune)
    t = middle[rank - below]
    under = below + int(torch.count_nonzero(middle < t))
    return Cut(float(t), n_prune - under, tuple(int(torch.count_nonzero(v == t)) for v in inside))


def _bracket(sample: torch.Tensor, total: int, rank: int) -> tuple[float, float]:
    """Scores that enclose the one at `rank` with near certainty, from an evenly strided sample of them."""
    sample = torch.sort(sample.float()).values
    m = sample.numel()
    margin = int(4 * math.sqrt(m)) + 16
    at = rank / total * m
    lo = float(sample[int(at) - margin]) if int(at) - margin >= 0 else -math.inf
    hi = float(sample[math.ceil(at) + margin]) if math.ceil(at) + margin < m else math.inf
    return lo, hi


def _exact_cut(source: ScoreSource, rank: int, n_prune: int) -> Cut:
    """The slow, always-exact path: streamed order statistic, then counts at the threshold."""
    hist = Histogram()
    for s in source():
        hist.add_tensor(s)
    t = order_statistics(source, hist, [rank])[rank]
    under = sum(int(torch.count_nonzero(s < t)) for s in source())
    return Cut(t, n_prune - under, tuple(int(torch.count_nonzero(s == t)) for s in source()))


def apply_cut(scores: torch.Tensor, threshold: float, equal: int, ties: int) -> torch.Tensor:
    """Prune-mask (True = prune) of one score tensor: all scores < threshold and the first `ties` of its `equal`."""
    if ties == equal:
        return scores <= threshold
    prune = scores < threshold
    if ties > 0:
        flat = (scores == threshold).reshape(-1)
        prune.reshape(-1)[flat & (torch.cumsum(flat, 0) <= ties)] = True
    return prune


def prune_global(weights: list[torch.Tensor], sparsity: float, pattern: Pattern) -> None:
    """Zero the lowest-magnitude weights (or tiles) of all matrices ranked together, in place.

    `weights` are out × in views into the model. N:M is a per-group rule, so it is applied per matrix. No mask is
    kept beyond the matrix being written, so memory stays at one matrix's scores on top of the model.
    """
    if isinstance(pattern, NM):
        for w in weights:
            w.masked_fill_(~keep_n_of_m(magnitude_scores(w, pattern), pattern.n, pattern.m), 0)
        return

    def source() -> Iterable[torch.Tensor]:
        return (magnitude_scores(w, pattern) for w in weights)

    def sampler(stride: int) -> Iterable[torch.Tensor]:
        return (w.reshape(-1)[::stride].abs() for w in weights)

    total = sum(_score_count(w, pattern) for w in weights)
    cut = global_cut(source, total, prune_count(total, sparsity), None if isinstance(pattern, Block) else sampler)
    for w, equal, ties in zip(weights, cut.equal_per_source, cut.prune_plan()):
        prune = apply_cut(magnitude_scores(w, pattern), cut.threshold, equal, ties)
        if isinstance(pattern, Block):
            prune = expand_tiles(prune, pattern.rows, pattern.cols)
        w.masked_fill_(prune, 0)


def _score_count(weight: torch.Tensor, pattern: Pattern) -> int:
    rows, cols = weight.shape
    if isinstance(pattern, Block):
        return (rows // pattern.rows) * (cols // pattern.cols)
    return rows * cols
