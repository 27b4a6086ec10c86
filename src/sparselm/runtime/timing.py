"""The one timing harness for side-by-side measurements: the dispatch's per-layer choice, `bench`, the study.

Callables are timed in alternating rounds: every round takes one sample of each, in an order that rotates from one
round to the next (A B C, B C A, C A B, …; with two callables A B, B A, …), so drifting load from other processes
and any advantage of going first affect all sides alike. With three or more no callable ever runs twice in a row (a
reversed order would repeat the last one across rounds and never let the middle one go first or follow itself). A
speed-up is computed per round from the paired samples (the baseline's seconds over the candidate's, same round);
the median over rounds is the result and the range over rounds (min–max) its spread. A speed-up whose spread reaches
1.0× is *within noise*: the rounds do not agree on which side is faster. Fewer than MIN_ROUNDS_FOR_VERDICT rounds
cannot show agreement, so such a speed-up is always within noise.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MIN_ROUNDS_FOR_VERDICT = 3

Sampler = Callable[[], float]
"""Takes one timing sample and returns its seconds (per call, for samplers that repeat a call)."""


@dataclass(frozen=True)
class Spread:
    """Values measured once per round, in round order: their median and range."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def rounds(self) -> int:
        return len(self.values)


class Timing(Spread):
    """Seconds of one callable, one sample per round."""

    def extended(self, later: Timing) -> Timing:
        """This timing followed by more rounds of the same callable."""
        return Timing(self.values + later.values)


class Speedup(Spread):
    """Per-round ratios baseline seconds / candidate seconds: above 1 the candidate is faster."""

    @property
    def within_noise(self) -> bool:
        """The rounds disagree on which side is faster (or there are too few of them to tell)."""
        return self.rounds < MIN_ROUNDS_FOR_VERDICT or self.low <= 1.0 <= self.high

    def as_dict(self) -> dict[str, Any]:
        return {
            "speedup": self.median,
            "speedup_low": self.low,
            "speedup_high": self.high,
            "within_noise": self.within_noise,
        }


def speedup(baseline: Timing, candidate: Timing) -> Speedup:
    """The candidate's speed-up over the baseline, paired round by round (both timed by the same `alternating`)."""
    if baseline.rounds != candidate.rounds:
        raise ValueError(f"paired timings need the same rounds, got {baseline.rounds} and {candidate.rounds}")
    return Speedup(tuple(b / c for b, c in zip(baseline.values, candidate.values, strict=True)))


def sampler(
    fn: Callable[[], Any],
    repeat: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] | None = None,
) -> Sampler:
    """A sampler of `fn`: seconds per call over `repeat` back-to-back calls (`synchronize` waits for a GPU)."""

    def sample() -> float:
        if synchronize:
            synchronize()
        start = clock()
        for _ in range(repeat):
            fn()
        if synchronize:
            synchronize()
        return (clock() - start) / repeat

    return sample


def repeats_for(
    fn: Callable[[], Any],
    min_seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] | None = None,
) -> int:
    """Back-to-back calls of `fn` that take at least `min_seconds`, so the clock's resolution stays negligible."""
    fn()  # warm-up: the first call pays for allocations and lazy initialisation
    once = sampler(fn, 1, clock, synchronize)()
    return max(1, math.ceil(min_seconds / max(once, 1e-9)))


def alternating(samplers: Mapping[str, Sampler], rounds: int, warmup: bool = True) -> dict[str, Timing]:
    """`rounds` samples of each sampler, one of each per round, the order rotated by one every round."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(samplers)
    if warmup:
        for name in names:
            samplers[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(samplers[name]())
    return {name: Timing(tuple(values)) for name, values in samples.items()}


@dataclass(frozen=True)
class Comparison:
    """A baseline and a candidate timed side by side."""

    baseline: Timing
    candidate: Timing

    @property
    def speedup(self) -> Speedup:
        return speedup(self.baseline, self.candidate)


def compare(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    rounds: int,
    min_seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] | None = None,
) -> Comparison:
    """Time two plain callables in alternating rounds; each sample repeats its call to last `min_seconds`."""
    samplers = {
        side: sampler(fn, repeats_for(fn, min_seconds, clock, synchronize), clock, synchronize)
        for side, fn in (("baseline", baseline), ("candidate", candidate))
    }
    timed = alternating(samplers, rounds, warmup=False)  # repeats_for has warmed both up
    return Comparison(timed["baseline"], timed["candidate"])
