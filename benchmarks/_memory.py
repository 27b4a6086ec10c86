"""Peak resident memory over a baseline while a piece of work runs (Linux).

The kernel's own high-water mark is used where the process may reset it (`/proc/self/clear_refs`), so nothing runs
beside the measured work; otherwise a thread samples /proc every 2 ms.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sparselm.models import resident_bytes

T = TypeVar("T")


def rss_bytes() -> int:
    now = resident_bytes()
    if now is None:
        raise RuntimeError("peak memory is read from /proc/self, which this OS does not have (Linux only)")
    return now


def peak_rss_during(fn: Callable[[], T], interval: float = 0.002) -> tuple[T, int, int]:
    """Run fn; return (its result, baseline RSS before, peak RSS during)."""
    if _reset_high_water_mark():
        baseline = rss_bytes()
        result = fn()
        return result, baseline, _high_water_mark()
    return _sampled_peak(fn, interval)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _sampled_peak(fn: Callable[[], T], interval: float) -> tuple[T, int, int]:
    baseline = rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, baseline, max(peak, rss_bytes())
