"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity.

A block's outlier ratio is the fraction of its Wanda scores above M × the block's mean score (M = 5). Ratios are
rescaled to [0, 2λ] (λ = 0.08), and each block's density is its rescaled ratio, shifted so that the mean density
is 1 − s: blocks with more outliers are pruned less. The centring is weighted by each block's number of weights,
which equals the paper's plain mean when blocks are the same size and keeps the whole model at the requested
sparsity when they are not (encoder-decoder models).

The allocation is measured on the dense model in one read-only calibration pass (`owl_allocation`); it depends only
on the dense model, the windows, the target sparsity and the OWL parameters, so several methods can share it. Under
an N:M pattern a block's sparsity moves N and keeps M (mixed N:M, `block_pattern`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import BlockRef, BlockStream, collect_inputs, run_blocks, total_blocks
from ..masks import NM, Pattern
from ..weights import by_block, select_matrices
from ..progress import SILENT, Progress
from .wanda import ColumnNorms, wanda_scores

if TYPE_CHECKING:
    from .settings import PruneSettings

MAX_SPARSITY = 0.99


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Fraction of all scores of one block above `threshold` × their mean (no concatenation)."""
    total = sum(float(s.sum(dtype=torch.float64)) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0 or total == 0:
        return 0.0
    cut = threshold * total / count
    return sum(int((s > cut).sum()) for s in scores) / count


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios, averaging (weighted by `sizes`) to `target`."""
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if float(spread) > 0 else torch.zeros_like(r)
    density = scaled - (scaled * n).sum() / n.sum() + (1 - target)
    return [min(MAX_SPARSITY, max(0.0, 1 - float(d))) for d in density]


def block_pattern(pattern: Pattern, sparsity: float) -> Pattern:
    """The pattern a block is pruned with at its own sparsity: N:M keeps M and moves N to round(M·(1 − s)) (at
    least 1, at most M); other patterns are unchanged (they take the sparsity as it is)."""
    if isinstance(pattern, NM):
        n = min(pattern.m, max(1, round((1 - sparsity) * pattern.m)))
        return NM(n, pattern.m)
    return pattern


@dataclass(frozen=True)
class OwlAllocation:
    """Per-block target sparsities and the outlier ratios of the dense model's Wanda scores behind them."""

    block_sparsity: dict[str, float]
    outlier_ratio: dict[str, float]

    def target(self, block: str | None, default: float) -> float:
        """The sparsity of a block (matrices outside blocks, and blocks OWL did not see, get `default`)."""
        return self.block_sparsity.get(block, default) if block is not None else default

    def block_patterns(self, pattern: Pattern) -> dict[str, str]:
        """The pattern each block is pruned with under this allocation (for N:M, OWL moves N and keeps M)."""
        return {name: str(block_pattern(pattern, s)) for name, s in self.block_sparsity.items()}


def owl_allocation(
    model: nn.Module, settings: PruneSettings, windows: torch.Tensor, progress: Progress = SILENT,
    stream: BlockStream | None = None,
) -> OwlAllocation:
    """Per-block sparsities from the dense model's Wanda-score outlier ratios (one read-only calibration pass)."""
    groups = by_block(select_matrices(model, settings.include_embeddings))
    ratios: dict[str, float] = {}
    sizes: dict[str, int] = {}

    def visit(ref: BlockRef, run: Callable[[], object]) -> None:
        mats = groups.get(ref.name, [])
        if not mats:
            return
        stats = collect_inputs(mats, ColumnNorms, run)
        scores = [wanda_scores(m.weight(), stats[m.name].sum_sq) for m in mats]  # type: ignore[attr-defined]
        ratios[ref.name] = outlier_ratio(scores, settings.owl_threshold)
        sizes[ref.name] = sum(m.numel for m in mats)

    progress.start("OWL outlier ratios", total_blocks(model))
    run_blocks(model, windows, visit, lambda _ref: progress.advance(), read_only=True, stream=stream)
    names = list(ratios)
    spars = owl_sparsities(
        [ratios[n] for n in names], [sizes[n] for n in names], settings.target_sparsity, settings.owl_lambda
    )
    return OwlAllocation(dict(zip(names, spars)), ratios)
