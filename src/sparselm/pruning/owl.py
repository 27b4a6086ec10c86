"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity.

A block's outlier ratio is the fraction of its Wanda scores above M × the block's mean score (M = 5). Ratios are
rescaled to [0, 2λ] (λ = 0.08), and each block's density is its rescaled ratio, shifted so that the mean density
is 1 − s: blocks with more outliers are pruned less. The centring is weighted by each block's number of weights,
which equals the paper's plain mean when blocks are the same size and keeps the whole model at the requested
sparsity when they are not (encoder-decoder models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
