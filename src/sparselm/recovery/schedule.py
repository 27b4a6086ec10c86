"""Gradual pruning's cubic sparsity schedule (Zhu & Gupta 2017, "To prune, or not to prune").

Round t of K targets s_t = s_f + (s_i − s_f)(1 − t/K)³: large steps while the model still has redundant weights,
small ones near the end, where each weight removed costs more. The last round is s_f exactly.
"""

from __future__ import annotations


def cubic_schedule(target: float, rounds: int, initial: float = 0.0) -> list[float]:
    """Per-round sparsity targets s_1 … s_K, strictly increasing from above `initial` to exactly `target`."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"a sparsity schedule needs a whole number of rounds ≥ 1, got {rounds!r}")
    if not 0.0 <= initial < target <= 1.0:
        raise ValueError(
            f"a sparsity schedule needs 0 ≤ initial < target ≤ 1, got initial={initial} and target={target}"
        )
    return [target + (initial - target) * (1 - t / rounds) ** 3 for t in range(1, rounds + 1)]
