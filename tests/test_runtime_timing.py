"""The timing harness: alternating rounds, paired speed-ups with their spread, the within-noise verdict.

Every test runs on a fake clock that the timed callables advance, so the numbers are exact, not measured.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sparselm.runtime.timing import Speedup, Timing, alternating, compare, repeats_for, sampler, speedup


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def costs(self, seconds: list[float], log: list[str] | None = None, name: str = "") -> Callable[[], None]:
        """A callable that takes seconds[i] on its i-th call (the last value repeats) and logs its name."""
        calls = iter(seconds)
        last = [seconds[-1]]

        def fn() -> None:
            last[0] = next(calls, last[0])
            self.now += last[0]
            if log is not None:
                log.append(name)

        return fn


def test_rounds_alternate_and_rotate_order():
    clock, log = FakeClock(), []
    samplers = {n: sampler(clock.costs([1.0], log, n), clock=clock) for n in ("a", "b", "c")}
    timed = alternating(samplers, rounds=4)
    assert log == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # warm-up first
    assert all(t.values == (1.0,) * 4 for t in timed.values())
    rounds = log[3:]
    assert all(x != y for x, y in zip(rounds, rounds[1:]))  # nobody runs twice in a row, across rounds either


def test_two_sides_swap_every_round():
    clock, log = FakeClock(), []
    samplers = {n: sampler(clock.costs([1.0], log, n), clock=clock) for n in ("a", "b")}
    alternating(samplers, rounds=3, warmup=False)
    assert log == ["a", "b", "b", "a", "a", "b"]


def test_speedup_is_paired_per_round_with_its_range():
    baseline = Timing((10.0, 20.0, 12.0, 11.0, 30.0))
    candidate = Timing((5.0, 5.0, 6.0, 5.5, 10.0))
    s = speedup(baseline, candidate)
    assert s.values == (2.0, 4.0, 2.0, 2.0, 3.0)
    assert (s.median, s.low, s.high, s.within_noise) == (2.0, 2.0, 4.0, False)
    # the ratio of medians (12 / 5.5 = 2.18) is not what is reported: rounds are compared with their own partner
    assert s.as_dict() == {"speedup": 2.0, "speedup_low": 2.0, "speedup_high": 4.0, "within_noise": False}
    assert (baseline.median, baseline.low, baseline.high) == (12.0, 10.0, 30.0)
    with pytest.raises(ValueError, match="same rounds"):
        speedup(baseline, Timing((1.0,)))


@pytest.mark.parametrize(
    "ratios,noise",
    [
        ((1.3, 1.2, 1.25), False),
        ((0.7, 0.8, 0.75), False),  # clearly slower is a result too
        ((1.3, 0.95, 1.25), True),  # one round disagrees: the spread reaches 1.0
        ((1.0, 1.2, 1.1), True),
        ((5.0, 5.0), True),  # two rounds cannot show agreement
    ],
)
def test_within_noise_when_the_spread_reaches_one(ratios, noise):
    assert Speedup(ratios).within_noise is noise


def test_a_callable_against_itself_reads_one_within_noise():
    clock = FakeClock()
    jitter = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 1.0, 0.92]
    result = compare(clock.costs(jitter), clock.costs(list(reversed(jitter))), rounds=5, clock=clock)
    s = result.speedup
    assert s.low < 1.0 < s.high and s.within_noise
    assert result.baseline.rounds == result.candidate.rounds == 5


def test_compare_repeats_short_calls_and_reports_seconds_per_call():
    clock = FakeClock()
    result = compare(clock.costs([0.001]), clock.costs([0.0005]), rounds=3, min_seconds=0.01, clock=clock)
    assert result.baseline.values == pytest.approx((0.001,) * 3)
    assert result.candidate.values == pytest.approx((0.0005,) * 3)
    assert result.speedup.median == pytest.approx(2.0) and not result.speedup.within_noise
    assert repeats_for(clock.costs([0.001]), 0.01, clock) == 10
    assert repeats_for(clock.costs([0.5]), 0.01, clock) == 1


def test_timings_extend_with_later_rounds():
    assert Timing((1.0, 2.0)).extended(Timing((3.0,))) == Timing((1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        alternating({"a": lambda: 1.0}, rounds=0)
