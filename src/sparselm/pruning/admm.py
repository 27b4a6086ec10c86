"""ADMM (Boža 2024, "Fast and Optimal Weight Update for Pruned LLMs"): choose the mask and re-solve the kept weights
by ADMM on the same Hessian statistics SparseGPT collects (`HessianAccumulator`, 2·Σxxᵀ; the scale cancels).

The maths is `sparselm.recovery.admm.admm_prune`: the mask is grown inside ADMM on a cubic schedule over the
input-norm-scaled weights, then the kept weights get an exact masked least-squares refit. Unstructured masks compare
the whole matrix (the reference's default, `per_out=False`); N:M and block patterns are held exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..masks import Pattern
from ..recovery.admm import AdmmSettings, admm_prune
from ..weights import Matrix
from .registry import Pruner, register
from .sparsegpt import HessianAccumulator

if TYPE_CHECKING:
    from .settings import PruneSettings


@register
class Admm(Pruner[HessianAccumulator]):
    name = "admm"
    updates_weights = True

    def collector(self, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features)

    def prune_matrix(
        self, matrix: Matrix, stats: HessianAccumulator, pattern: Pattern, sparsity: float, settings: PruneSettings
    ) -> None:
        pruned, _keep = admm_prune(matrix.weight(), stats.hessian, pattern, sparsity, settings=AdmmSettings())
        matrix.set_weight(pruned)
