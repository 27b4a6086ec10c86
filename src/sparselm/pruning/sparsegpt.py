"""SparseGPT (Frantar & Alistarh, 2023): prune with second-order error compensation (IST-DASLab/sparsegpt).

For one layer with calibration inputs X: H = 2·XXᵀ, dampened by 1% of its mean diagonal; the upper Cholesky factor
of H⁻¹ drives a column sweep in blocks of 128. In each block the mask keeps the weights with the largest
w²/[H⁻¹]ᵢᵢ² (the whole block at once for unstructured, every M columns for N:M), and each pruned column's
error is spread over the columns not yet visited. One deliberate difference from the reference: it prunes exactly
floor(s·n) weights per block (the reference's `<= threshold` prunes one more, plus ties), so the sparsity is exact.
H is summed rather than averaged over sequences (a constant factor that cancels out of every step), and for N:M
the blocksize is rounded down to a multiple of M, so that N:M groups never straddle two blocks (where the
reference's groups, counted from each block's start, would break the pattern). Tests: tests/test_pruning.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..masks import NM, Pattern, keep_n_of_m, keep_top, prune_count
from ..weights import Matrix
from .registry import Pruner, register

if TYPE_CHECKING:
    from .settings import PruneSettings


class HessianAccumulator:
    """Running 2·Σ x xᵀ over calibration tokens, in float32 as the reference accumulates it (float64 doubles the
    cost of the largest matrix product of calibration): one in-place matrix product per batch. Matrices that read
    the same inputs (q/k/v, gate/up) share one accumulator, and with it one inverse factor (`inverse_factor`)."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.tokens = 0
        self._factors: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if self.hessian.device != x.device:
            self.hessian = self.hessian.to(x.device)
        self.hessian.addmm_(x.t(), x, alpha=2)
        self.tokens += x.shape[0]
        self._factors.clear()

    def inverse_factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`inverse_hessian_factor` of this Hessian, computed once per dampening for every matrix that shares it."""
        if percdamp not in self._factors:
            self._factors[percdamp] = inverse_hessian_factor(self.hessian, percdamp)
        return self._factors[percdamp]


def dampened_hessian(
    hessian: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(copy of H in `dtype` with dead inputs, those that never fired, given a unit diagonal and then `percdamp` × the
    mean diagonal added to every diagonal entry; mask of the dead inputs). ADMM conditions its problem the same way."""
    h = hessian.to(dtype, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    return h, dead


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened H⁻¹ as float32, mask of dead inputs that never fired).

    Factorised in float32, as the reference does; only a Hessian that float32 cannot factorise (not positive definite
    at that precision) is factorised again in float64.
    """
    for dtype in (torch.float32, torch.float64):
        h, dead = dampened_hessian(hessian, percdamp, dtype)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper.float(), dead
    torch.linalg.cholesky(h)  # float64 failed too: raise torch's own error, which names the failing minor
    raise AssertionError("unreachable: a failed Cholesky factorisation raises")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: NM | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned out × in weight (float32) and its keep-mask; `weight` itself is not modified. `factor` is
    `inverse_hessian_factor(hessian, percdamp)` when already computed (shared by matrices with one Hessian)."""
    w = weight.detach().clone().float()
    hinv, dead = factor if factor is not None else inverse_hessian_factor(hessian, percdamp)
    w[:, dead] = 0
    cols = w.shape[1]
    if nm is not None:
        blocksize = max(nm.m, blocksize // nm.m * nm.m)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w[:, i1:i2], keep[:, i1:i2], errors = _sweep_block(w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], sparsity, nm)
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return w, keep


def _sweep_block(
    w1: torch.Tensor, hinv1: torch.Tensor, sparsity: float, nm: NM | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of columns: choose the mask, prune column by column, update later columns of the block."""
    count = w1.shape[1]
    diag = torch.diag(hinv1).reshape(1, -1)
    if nm is None:
        keep1 = keep_top(w1**2 / diag**2, prune_count(w1.numel(), sparsity))
    else:
        keep1 = torch.ones_like(w1, dtype=torch.bool)
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    for i in range(count):
        if nm is not None and i % nm.m == 0:
            group = slice(i, i + nm.m)
            keep1[:, group] = keep_n_of_m(w1[:, group] ** 2 / diag[:, group] ** 2, nm.n, nm.m)
        column = w1[:, i]
        q = column * keep1[:, i]
        q1[:, i] = q
        err = (column - q) / hinv1[i, i]
        w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # rank-1 update in place (BLAS ger), no temporary
        err1[:, i] = err
    return q1, keep1, err1


@register
class SparseGPT(Pruner[HessianAccumulator]):
    name = "sparsegpt"
    updates_weights = True
    block_patterns = False  # the column sweep compensates within rows; whole tiles are not part of the algorithm

    def collector(self, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features)

    def prune_matrix(
        self, matrix: Matrix, stats: HessianAccumulator, pattern: Pattern, sparsity: float, settings: PruneSettings
    ) -> None:
        nm = pattern if isinstance(pattern, NM) else None
        percdamp = settings.sparsegpt_percdamp
        pruned, _keep = sparsegpt_prune(
            matrix.weight(), stats.hessian, sparsity, nm, settings.sparsegpt_blocksize, percdamp,
            stats.inverse_factor(percdamp),
        )
        matrix.set_weight(pruned)
