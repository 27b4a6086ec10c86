"""ADMM weight update for a pruned matrix (Boža 2024, "Fast and Optimal Weight Update for Pruned LLMs").

Problem: for an out × in weight W and the Gram matrix G = XXᵀ of its calibration inputs, find Ŵ that keeps only
the entries of a keep-mask and minimises ‖(W − Ŵ)X‖² = tr((W − Ŵ) G (W − Ŵ)ᵀ). Any positive multiple of XXᵀ gives the
same result (e.g. `HessianAccumulator.hessian`, which holds 2·Σxxᵀ), because of the scaling below.

Conditioning, as SparseGPT does it: inputs that never fired get a unit diagonal, then `percdamp` × the mean diagonal
is added to every diagonal entry (a ridge that also keeps kept weights near their dense values when few tokens were
seen). Every input column is then scaled by d_j = sqrt(G_jj), so the scaled Gram has a unit diagonal: the penalty ρ
means the same for every matrix, and |weight| in these coordinates is the input-norm-scaled magnitude
|W_ij|·‖X_j‖ that Wanda ranks by.

One factorisation of (G + ρI) serves every row; an ADMM iteration on all rows at once is one out × in × in product:
    V ← (W G + ρ(Z − U)) (G + ρI)⁻¹,   Z ← keep ⊙ (V + U),   U ← U + V − Z   (Z starts as keep ⊙ W).
With a sparsity target, the keep-mask is re-chosen on |V + U| during the first `grow_iters` iterations and grown
on a cubic schedule: iteration t prunes the lowest-scoring share f_t of the entries the target pattern would prune
(f_t follows `cubic_schedule`, ending at exactly all of them), so the last growth step is exactly the pattern's mask.
Inputs that never fired score 0 and are pruned first: their weights never reach the output.

Final step: an exact masked least-squares refit on the final mask, by conjugate gradient batched over rows and
warm-started at ADMM's last projection, run until every row's residual is below `refit_tol` of its right-hand side
(or `refit_iters` products). It is chosen over returning ADMM's projection because, for a fixed mask, ADMM nears the
optimum only linearly: on SmolLM2-135M activations its projection after 20 iterations is 0.2–0.6% above the optimal
objective, which the refit closes in 20–40 products (the default 1e-3 residual leaves it ~1e-6 above). Pruned
entries of the result are exactly +0.0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..masks import NM, Pattern, Unstructured, apply_keep, check_shape, keep_mask, keep_top, prune_count
from ..pruning.sparsegpt import dampened_hessian
from .schedule import cubic_schedule

KeepChooser = Callable[[torch.Tensor, int], torch.Tensor]  # (scores |V + U|, iteration) -> keep-mask


@dataclass(frozen=True)
class AdmmSettings:
    """ADMM's knobs; the defaults are the reference's (20 iterations, the mask grown over 15, ρ = 1) except
    `percdamp`, which is SparseGPT's 1% so both methods solve the same dampened problem, and the refit's."""

    iters: int = 20
    grow_iters: int = 15
    rho: float = 1.0
    percdamp: float = 0.01
    refit_iters: int = 50
    refit_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.iters < 1 or not 0 <= self.grow_iters <= self.iters:
            raise ValueError(
                f"ADMM needs iters ≥ 1 and 0 ≤ grow_iters ≤ iters, got {self.iters} and {self.grow_iters}"
            )
        if self.rho <= 0 or self.percdamp < 0 or self.refit_iters < 0 or self.refit_tol <= 0:
            raise ValueError("ADMM needs rho > 0, percdamp ≥ 0, refit_iters ≥ 0 and refit_tol > 0")


@dataclass(frozen=True)
class _Scaled:
    """The problem in input-norm-scaled coordinates: weights W·D, Gram D⁻¹GD⁻¹, right-hand side W·D·D⁻¹GD⁻¹."""

    weight: torch.Tensor
    gram: torch.Tensor
    rhs: torch.Tensor
    scale: torch.Tensor
    dead: torch.Tensor


def admm_update(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, settings: AdmmSettings = AdmmSettings()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best out × in weight (float32) on a fixed keep-mask, and that mask; `weight` itself is not modified."""
    _check_problem(weight, gram)
    if keep.shape != weight.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep-mask must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    problem = _scaled_problem(weight, gram, settings.percdamp)
    return _solve(problem, settings, lambda _scores, _t: keep)


def admm_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: Pattern = Unstructured(),
    sparsity: float | None = None,
    per_row: bool = False,
    settings: AdmmSettings = AdmmSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an out × in weight to a pattern and sparsity (N:M fixes its own), choosing the mask inside ADMM.

    Unstructured masks compare the whole matrix, or each row with `per_row`. Returns the float32 weight and its
    keep-mask; `weight` itself is not modified.
    """
    _check_problem(weight, gram)
    check_shape(pattern, tuple(weight.shape), "the weight")
    target = pattern.sparsity if isinstance(pattern, NM) else sparsity
    if target is None or not 0 <= target < 1:
        raise ValueError(f"pattern {pattern} needs a sparsity in [0, 1), got {sparsity}")
    problem = _scaled_problem(weight, gram, settings.percdamp)
    fractions = cubic_schedule(1.0, settings.grow_iters) if settings.grow_iters else [1.0]

    def grown(scores: torch.Tensor, t: int) -> torch.Tensor:
        scores[:, problem.dead] = 0
        final = keep_mask(scores, pattern, target, per_row)
        fraction = fractions[min(t, len(fractions) - 1)]
        return keep_top(scores.masked_fill(final, torch.inf), prune_count(int((~final).sum()), fraction))

    return _solve(problem, settings, grown, mask_steps=len(fractions))


def _check_problem(weight: torch.Tensor, gram: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"the weight must be an out × in matrix, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(gram.shape) != (cols, cols):
        raise ValueError(f"the Gram matrix must be in × in = {cols}×{cols} for this weight, got {tuple(gram.shape)}")


def _scaled_problem(weight: torch.Tensor, gram: torch.Tensor, percdamp: float) -> _Scaled:
    """Dampen G as SparseGPT does (dead inputs get a unit diagonal first), then scale it to a unit diagonal."""
    g, dead = dampened_hessian(gram, percdamp)
    scale = torch.diagonal(g).sqrt()
    scaled_gram = (g / scale.reshape(-1, 1) / scale.reshape(1, -1)).float()
    scale = scale.float()
    scaled_weight = weight.detach().float() * scale
    return _Scaled(scaled_weight, scaled_gram, scaled_weight @ scaled_gram, scale, dead)


def _solve(
    problem: _Scaled, settings: AdmmSettings, choose_keep: KeepChooser, mask_steps: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM iterations (the mask re-chosen by `choose_keep(scores, t)` for t < mask_steps), then the refit."""
    inverse = _inverse_plus_ridge(problem.gram, settings.rho)
    pulled = problem.rhs @ inverse  # the V-update's constant part, W G (G + ρI)⁻¹
    v = problem.weight.clone()
    u = torch.zeros_like(v)
    for t in range(settings.iters):
        if t < mask_steps:
            keep = choose_keep((v + u).abs(), t)
        z = v + u
        apply_keep(z, keep)
        u += v - z
        v = torch.addmm(pulled, z - u, inverse, alpha=settings.rho)
    z = v + u
    apply_keep(z, keep)
    refit = _masked_refit(z, problem, keep, settings.refit_iters, settings.refit_tol)
    result = refit / problem.scale
    apply_keep(result, keep)
    return result, keep


def _inverse_plus_ridge(gram: torch.Tensor, rho: float) -> torch.Tensor:
    """(G + ρI)⁻¹ from one Cholesky factorisation, computed in float64 and returned as float32."""
    shifted = gram.to(torch.float64) + rho * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted)).float()


def _masked_refit(start: torch.Tensor, problem: _Scaled, keep: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Per row r, minimise (v − w_r) G (v − w_r)ᵀ over v on keep_r: conjugate gradient on every row at once.

    The normal equations of row r are (G v)_K = (G w_r)_K on its kept columns K; the residual and the search
    directions are kept on K, so each iteration is one product of the search directions with G.
    """
    on = keep.to(start.dtype)
    v = start.clone()
    residual = (problem.rhs - v @ problem.gram) * on
    limit = tol * (problem.rhs * on).norm(dim=1, keepdim=True)
    direction = residual.clone()
    rs = (residual * residual).sum(dim=1, keepdim=True)
    tiny = torch.finfo(start.dtype).tiny
    for _ in range(iters):
        if bool((rs.sqrt() <= limit).all()):
            break
        product = (direction @ problem.gram) * on
        alpha = rs / (direction * product).sum(dim=1, keepdim=True).clamp_min(tiny)
        v += alpha * direction
        residual -= alpha * product
        rs_next = (residual * residual).sum(dim=1, keepdim=True)
        direction = residual + rs_next / rs.clamp_min(tiny) * direction
        rs = rs_next
    return v
