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
from typing import TYPE_CHECKING

import torch

from ..analysis.stats import Histogram, order_statistics
from ..masks import NM, Block, Pattern, apply_keep, expand_tiles, keep_mask, keep_n_of_m, prune_count, tile_scores
from ..weights import Matrix
from .registry import Pruner, register

if TYPE_CHECKING:
    from .settings import PruneSettings

SAMPLE_SIZE = 1 << 20
CHUNK = 1 << 20  # scores compared and counted at a time (float32 counts are exact below 2**24)

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
    Tensors from `source` are only read while they are current, so a source may reuse one buffer.
    """
    if n_prune <= 0:
        return Cut(-math.inf, 0, ())
    rank = n_prune - 1
    stride = max(1, total // SAMPLE_SIZE)
    sampler = sampler or (lambda k: (s.reshape(-1)[::k].clone() for s in source()))
    lo, hi = _bracket(torch.cat(list(sampler(stride))), total, rank)
    below, within = 0, 0
    inside: list[torch.Tensor] = []
    scratch = MarkScratch()
    for s in source():
        under_lo, values, count = _split_at_bracket(s.reshape(-1), lo, hi, scratch)
        below += under_lo
        within += count
        inside.append(values)
    middle = torch.cat(inside)
    if not below <= rank < below + within:
        return _exact_cut(source, rank, n_prune)
    t = middle.kthvalue(rank - below + 1).values
    under = below + int(torch.count_nonzero(middle < t))
    return Cut(float(t), n_prune - under, tuple(int(torch.count_nonzero(v == t)) for v in inside))


class MarkScratch:
    """Two reusable float32 buffers of at most CHUNK marks: allocating them per matrix costs as much as filling them."""

    def __init__(self) -> None:
        self._buffers = torch.empty(0), torch.empty(0)

    def pair(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = like.numel()
        if self._buffers[0].numel() < n or self._buffers[0].device != like.device:
            self._buffers = torch.empty(n, device=like.device), torch.empty(n, device=like.device)
        return self._buffers[0][:n], self._buffers[1][:n]


def _split_at_bracket(
    flat: torch.Tensor, lo: float, hi: float, scratch: MarkScratch
) -> tuple[int, torch.Tensor, int]:
    """How many scores are < lo; the scores within [lo, hi], among NaN fillers (order statistics put NaN above every
    score, and no comparison holds for it); how many scores are within [lo, hi].

    Comparisons are written as float 0/1 marks: torch vectorises a float-output comparison several times better than
    a boolean one, and a float sum counts the marks (exactly, as a chunk holds fewer than 2²⁴ of them). Chunks keep
    the marks in cache.
    """
    below, within, inside = 0, 0, []
    for part in flat.split(CHUNK):
        lower, upper = scratch.pair(part)
        torch.lt(part, lo, out=lower)
        torch.le(part, hi, out=upper)
        below += int(lower.sum())
        upper -= lower
        values, marks = _marked_words(part, upper)
        within += int(marks.sum())
        inside.append(values.masked_fill_(marks == 0, math.nan))
    return below, torch.cat(inside) if inside else flat.new_empty(0), within


def _marked_words(part: torch.Tensor, marks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores and marks of every pair of neighbours holding a 1.0-mark (and of an odd last score).

    Few scores are marked, so the marks are scanned as 64-bit words, two marks each, and only the words with a mark
    are gathered (`index_select`, several times faster than advanced indexing).
    """
    whole = part.numel() - part.numel() % 2
    words = torch.nonzero(marks[:whole].view(torch.int64)).squeeze(1)
    values = torch.index_select(part[:whole].view(-1, 2), 0, words).reshape(-1)
    picked = torch.index_select(marks[:whole].view(-1, 2), 0, words).reshape(-1)
    return torch.cat([values, part[whole:]]), torch.cat([picked, marks[whole:]])


def _bracket(sample: torch.Tensor, total: int, rank: int) -> tuple[float, float]:
    """Scores that enclose the one at `rank` with near certainty, from an evenly strided sample of them."""
    sample = sample.float()
    m = sample.numel()
    margin = int(4 * math.sqrt(m)) + 16
    at = rank / total * m
    low, high = int(at) - margin, math.ceil(at) + margin
    lo = float(sample.kthvalue(low + 1).values) if low >= 0 else -math.inf
    hi = float(sample.kthvalue(high + 1).values) if high < m else math.inf
    return lo, hi


def _exact_cut(source: ScoreSource, rank: int, n_prune: int) -> Cut:
    """The slow, always-exact path: streamed order statistic, then counts at the threshold."""
    hist = Histogram()
    for s in source():
        hist.add_tensor(s)
    t = order_statistics(source, hist, [rank])[rank]
    under = sum(int(torch.count_nonzero(s < t)) for s in source())
    return Cut(t, n_prune - under, tuple(int(torch.count_nonzero(s == t)) for s in source()))


def keep_after_cut(
    scores: torch.Tensor, threshold: float, equal: int, ties: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask of one score tensor: all scores above the threshold, and those of its `equal` scores at the
    threshold that come after the first `ties` (which are pruned)."""
    compare = torch.ge if ties == 0 else torch.gt
    keep = compare(scores, threshold, out=out) if out is not None else compare(scores, threshold)
    if 0 < ties < equal:
        flat = (scores == threshold).reshape(-1)
        keep.reshape(-1)[flat & (torch.cumsum(flat, 0) > ties)] = True
    return keep


def prune_global(weights: list[torch.Tensor], sparsity: float, pattern: Pattern) -> None:
    """Zero the lowest-magnitude weights (or tiles) of all matrices ranked together, in place.

    `weights` are out × in views into the model. N:M is a per-group rule, so it is applied per matrix. No mask is
    kept beyond the matrix being written, so memory stays at one matrix's scores on top of the model.
    """
    if isinstance(pattern, NM):
        for w in weights:
            apply_keep(w, keep_n_of_m(magnitude_scores(w, pattern), pattern.n, pattern.m))
        return
    if isinstance(pattern, Block):
        _prune_global_tiles(weights, sparsity, pattern)
        return
    largest = max((w.numel() for w in weights), default=0)
    buffer, keep_buffer = torch.empty(largest), torch.empty(largest, dtype=torch.bool)

    def source() -> Iterable[torch.Tensor]:  # |w| of each matrix in turn, written into one reused buffer
        return (_abs_into(buffer[: w.numel()], w) for w in weights)

    def sampler(stride: int) -> Iterable[torch.Tensor]:
        return (w.reshape(-1)[::stride].abs() for w in weights)

    total = sum(w.numel() for w in weights)
    cut = global_cut(source, total, prune_count(total, sparsity), sampler)
    for w, equal, ties in zip(weights, cut.equal_per_source, cut.prune_plan()):
        apply_cut(w, cut.threshold, equal, ties, buffer, keep_buffer)


def apply_cut(
    w: torch.Tensor, threshold: float, equal: int, ties: int, buffer: torch.Tensor, keep_buffer: torch.Tensor
) -> None:
    """Prune one matrix at a global cut: below `threshold`, and the first `ties` of its `equal` scores at it."""
    if w.dtype == torch.float32 and ties in (0, equal):
        _shrink(w, threshold, prune_equal=ties == equal)
    else:
        scores = _abs_into(buffer[: w.numel()], w)
        apply_keep(w, keep_after_cut(scores, threshold, equal, ties, out=keep_buffer[: w.numel()]).view(w.shape))


def _shrink(weight: torch.Tensor, threshold: float, prune_equal: bool) -> None:
    """Zero |w| < threshold (and |w| == threshold if `prune_equal`) in place, as one vectorised pass.

    `hardshrink(x, λ)` is exactly "x where |x| > λ, else +0.0"; a float32 λ one step below the threshold turns ">"
    into "≥".
    """
    lam = torch.tensor(threshold, dtype=torch.float32)
    if not prune_equal:
        lam = torch.nextafter(lam, torch.tensor(-math.inf))
    torch.hardshrink(weight, float(lam), out=weight)


def _prune_global_tiles(weights: list[torch.Tensor], sparsity: float, pattern: Block) -> None:
    """Global magnitude over tiles: rank every tile's L2 norm across all matrices, zero whole tiles."""

    def source() -> Iterable[torch.Tensor]:
        return (magnitude_scores(w, pattern) for w in weights)

    total = sum((w.shape[0] // pattern.rows) * (w.shape[1] // pattern.cols) for w in weights)
    cut = global_cut(source, total, prune_count(total, sparsity))
    for w, scores, equal, ties in zip(weights, source(), cut.equal_per_source, cut.prune_plan()):
        apply_keep(w, expand_tiles(keep_after_cut(scores, cut.threshold, equal, ties), pattern.rows, pattern.cols))


def _abs_into(buffer: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|w| flattened into a float32 buffer, without allocating."""
    if weight.dtype == torch.float32:
        return torch.abs(weight.reshape(-1), out=buffer)
    return buffer.copy_(weight.reshape(-1)).abs_()


def prune_by_magnitude(weight: torch.Tensor, pattern: Pattern, sparsity: float) -> None:
    """Zero the lowest-|w| weights of one out × in matrix in place (also the fallback of calibrated methods)."""
    apply_keep(weight, keep_mask(weight.abs().float(), pattern, sparsity))


@register
class Magnitude(Pruner[None]):
    name = "magnitude"
    needs_calibration = False
    ranks_globally = True

    def prune_matrix(
        self, matrix: Matrix, stats: None, pattern: Pattern, sparsity: float, settings: PruneSettings
    ) -> None:
        prune_by_magnitude(matrix.weight(), pattern, sparsity)

    def prune_together(self, matrices: list[Matrix], sparsity: float, pattern: Pattern) -> None:
        prune_global([m.weight() for m in matrices], sparsity, pattern)
