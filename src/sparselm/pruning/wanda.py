"""Wanda (Sun et al., 2023): score |W_ij| · ‖X_j‖₂, compared within each output row (locuslab/wanda).

The collector only accumulates the squared norm of every input feature over all calibration tokens; the score is a
pure function of the weight and those norms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..masks import Pattern, apply_keep, keep_mask
from ..weights import Matrix
from .registry import Pruner, register

if TYPE_CHECKING:
    from .settings import PruneSettings


class ColumnNorms:
    """Running Σ x_j² over every token that reaches a layer, in float64 (exact products, so batching the same tokens
    differently changes nothing but the order of the sums). Converted a slice of tokens at a time, so the float64
    copy stays in cache instead of doubling the batch in memory."""

    ROWS = 256  # tokens converted to float64 at a time

    def __init__(self, in_features: int) -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for rows in x.split(self.ROWS):
            wide = rows.to(torch.float64, copy=True)  # squared in place: never the caller's tensor
            total += wide.mul_(wide).sum(dim=0)
        self.sum_sq += total.cpu()
        self.tokens += x.shape[0]


def wanda_scores(weight: torch.Tensor, sum_sq: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ for an out × in weight and the per-input sums of squares (float64 scores)."""
    return weight.detach().abs().to(torch.float64) * sum_sq.to(weight.device).sqrt().reshape(1, -1)


@register
class Wanda(Pruner[ColumnNorms]):
    name = "wanda"

    def collector(self, in_features: int) -> ColumnNorms:
        return ColumnNorms(in_features)

    def prune_matrix(
        self, matrix: Matrix, stats: ColumnNorms, pattern: Pattern, sparsity: float, settings: PruneSettings
    ) -> None:
        w = matrix.weight()
        keep = keep_mask(wanda_scores(w, stats.sum_sq), pattern, sparsity, per_row=True)
        apply_keep(w, keep.to(w.device))
