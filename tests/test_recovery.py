"""Recovery building blocks: ADMM against closed-form masked least squares and the other pruners, block
reconstruction on real captured inputs of every block family, and the cubic schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from mask_checks import is_block
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparselm.calibration import capture, no_cache
from sparselm.masks import NM, Block, Unstructured, apply_keep, is_n_of_m, keep_mask, prune_count
from sparselm.pruning.sparsegpt import sparsegpt_prune
from sparselm.recovery import (
    AdmmSettings, ReconstructSettings, admm_prune, admm_update, cubic_schedule, reconstruct_block,
)
from sparselm.recovery.reconstruct import _decay_factor
from sparselm.weights import find_block_lists


def _problem(seed: int, out: int = 24, inputs: int = 48, tokens: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and activation-like inputs (low-rank structure, noise, a few outlier channels), in × tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(inputs, 6, generator=gen) @ torch.randn(6, tokens, generator=gen)
    x += 0.5 * torch.randn(inputs, tokens, generator=gen)
    x[:3] *= 8
    return torch.randn(out, inputs, generator=gen), x


def _output_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight.double() - pruned.double()) @ x.double()).norm())


def _masked_least_squares(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, percdamp: float):
    """Row by row in float64: minimise (w − v)ᵀ H (w − v) over v on the row's kept columns, H dampened as SparseGPT."""
    h = gram.double()
    h = h + percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    w = weight.double()
    result = torch.zeros_like(w)
    for r in range(w.shape[0]):
        k = keep[r]
        result[r, k] = torch.linalg.solve(h[k][:, k], (h @ w[r])[k])
    return result


def _assert_pruned_exactly(weight: torch.Tensor, keep: torch.Tensor) -> None:
    pruned = weight[~keep]
    assert torch.equal(pruned, torch.zeros_like(pruned)) and not pruned.signbit().any()


@pytest.mark.parametrize("percdamp", [0.0, 0.01])
def test_admm_on_a_fixed_mask_reaches_the_masked_least_squares_optimum(percdamp):
    weight, x = _problem(0)
    gram = x @ x.T
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    expected = _masked_least_squares(weight, gram, keep, percdamp)
    settings = AdmmSettings(percdamp=percdamp, refit_iters=500, refit_tol=1e-7)
    result, returned_keep = admm_update(weight, gram, keep, settings)
    assert torch.equal(returned_keep, keep)
    _assert_pruned_exactly(result, keep)
    assert float((result.double() - expected).norm() / expected.norm()) < 1e-4
    # ADMM alone (no refit), given enough iterations, converges to the same optimum
    admm_only = AdmmSettings(iters=300, percdamp=percdamp, refit_iters=0)
    approx, _ = admm_update(weight, gram, keep, admm_only)
    assert float((approx.double() - expected).norm() / expected.norm()) < 1e-3


def test_admm_does_not_modify_the_weight_and_ignores_the_gram_scale():
    weight, x = _problem(2)
    original = weight.clone()
    gram = x @ x.T
    first, keep = admm_prune(weight, gram, Unstructured(), 0.5)
    second, keep2 = admm_prune(weight, 2 * gram, Unstructured(), 0.5)  # HessianAccumulator holds 2·Σxxᵀ
    assert torch.equal(weight, original)
    assert torch.equal(keep, keep2)
    assert torch.allclose(first, second, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("per_row", [False, True])
def test_admm_hits_the_exact_unstructured_sparsity(sparsity, per_row):
    weight, x = _problem(3)
    result, keep = admm_prune(weight, x @ x.T, Unstructured(), sparsity, per_row=per_row)
    _assert_pruned_exactly(result, keep)
    if per_row:
        assert ((~keep).sum(dim=1) == prune_count(weight.shape[1], sparsity)).all()
    else:
        assert int((~keep).sum()) == prune_count(weight.numel(), sparsity)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_admm_n_of_m_patterns_hold_exactly(n, m):
    weight, x = _problem(4)
    result, keep = admm_prune(weight, x @ x.T, NM(n, m))
    _assert_pruned_exactly(result, keep)
    assert is_n_of_m(keep, n, m)
    assert (keep.reshape(weight.shape[0], -1, m).sum(dim=2) == n).all()


def test_admm_block_pattern_prunes_whole_tiles():
    weight, x = _problem(5)
    result, keep = admm_prune(weight, x @ x.T, Block(4, 4), 0.5)
    _assert_pruned_exactly(result, keep)
    assert is_block(keep, 4, 4) and float((~keep).float().mean()) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", [Unstructured(), NM(2, 4), NM(4, 8)])
def test_admm_beats_magnitude_and_sparsegpt(seed, pattern):
    weight, x = _problem(seed, out=32, inputs=64)
    gram = x @ x.T
    admm, _ = admm_prune(weight, gram, pattern, 0.5)
    sparsegpt, _ = sparsegpt_prune(weight, 2 * gram, 0.5, nm=pattern if isinstance(pattern, NM) else None)
    magnitude = weight * keep_mask(weight.abs(), pattern, 0.5)
    admm_error = _output_error(weight, admm, x)
    assert admm_error < _output_error(weight, magnitude, x)
    assert admm_error <= _output_error(weight, sparsegpt, x)


def test_admm_prunes_inputs_that_never_fired_first():
    weight, x = _problem(6, inputs=16)
    x[[2, 9]] = 0  # two inputs never fire: their weights cost nothing to prune
    result, keep = admm_prune(weight, x @ x.T, Unstructured(), 2 / 16, per_row=True)
    assert (~keep).nonzero()[:, 1].unique().tolist() == [2, 9]
    assert torch.isfinite(result).all()


def test_admm_rejects_bad_inputs():
    weight, x = _problem(7)
    gram = x @ x.T
    with pytest.raises(ValueError, match="Gram matrix"):
        admm_prune(weight, gram[:-1, :-1], Unstructured(), 0.5)
    with pytest.raises(ValueError, match="keep-mask"):
        admm_update(weight, gram, torch.ones(weight.shape[1], weight.shape[0], dtype=torch.bool))
    with pytest.raises(ValueError, match="sparsity"):
        admm_prune(weight, gram, Unstructured())
    with pytest.raises(ValueError, match="grow_iters"):
        AdmmSettings(iters=10, grow_iters=15)


# ---------------------------------------------------------------- block reconstruction

WINDOW_BATCHES = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(4)]
BLOCKS = [("llama", "decoder"), ("bert", "encoder"), ("bart", "decoder"), ("t5", "decoder"), ("gpt2", "decoder")]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _magnitude_masks(block: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """50% magnitude keep-masks of the block's matrices in each parameter's own orientation, applied."""
    masks = {}
    for module in (m for m in block.modules() if isinstance(m, (nn.Linear, Conv1D))):
        masks[module.weight] = keep_mask(module.weight.detach().abs(), Unstructured(), 0.5)
        apply_keep(module.weight.data, masks[module.weight])
    return masks


def _run(block: nn.Module, hidden: list[torch.Tensor], calls: list) -> list[torch.Tensor]:
    return [_hidden(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls)]


def _block_case(family: str, side: str):
    """Block 1 of a stack, its inputs from the pruned model (block 0 pruned), its calls, and the dense targets."""
    model = tiny_model(family)
    stack = next(s for s in find_block_lists(model) if s.side == side)
    first, second = stack.blocks[0], stack.blocks[1]
    with torch.no_grad(), no_cache(model):
        batches = [capture(model, stack, windows) for windows in WINDOW_BATCHES]  # forward pre-hooks record calls
        hidden = [b.hidden[0] for b in batches]
        first_calls, calls = [b.extra[0][0] for b in batches], [b.extra[1][0] for b in batches]
        targets = _run(second, _run(first, hidden, first_calls), calls)
        _magnitude_masks(first)
        inputs = _run(first, hidden, first_calls)
    return stack, inputs, calls, targets


def _normalised_mse(block, inputs, calls, targets) -> float:
    with torch.no_grad():
        outputs = torch.cat([_hidden(block(h, *a, **k)).flatten() for h, (a, k) in zip(inputs, calls)]).double()
    expected = torch.cat([t.flatten() for t in targets]).double()
    return float(((outputs - expected) ** 2).mean() / expected.var(unbiased=False))


@pytest.mark.parametrize(("family", "side"), BLOCKS)
def test_reconstruction_lowers_the_error_and_never_revives_a_pruned_weight(family, side):
    stack, inputs, calls, targets = _block_case(family, side)
    block = stack.blocks[1]
    masks = _magnitude_masks(block)
    zeros_before = {p: (p == 0).clone() for p in masks}
    frozen_before = {n: p.detach().clone() for n, p in block.named_parameters() if p not in masks}
    flags_before = {n: p.requires_grad for n, p in block.named_parameters()}
    error_before = _normalised_mse(block, inputs, calls, targets)

    result = reconstruct_block(block, inputs, calls, targets, masks, ReconstructSettings(lr=2e-3, epochs=6, train_unmasked=False))

    error_after = _normalised_mse(block, inputs, calls, targets)
    assert result.before == pytest.approx(error_before, rel=1e-4)
    assert result.after == pytest.approx(error_after, rel=1e-4)
    assert len(result.losses) == 7 and error_after < 0.8 * error_before
    for param, keep in masks.items():
        assert torch.equal(param == 0, zeros_before[param])
        _assert_pruned_exactly(param.detach(), keep)
    for name, value in frozen_before.items():
        assert torch.equal(dict(block.named_parameters())[name], value), f"{name} should stay frozen"
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags_before


def test_reconstruction_can_train_unmasked_parameters_too():
    stack, inputs, calls, targets = _block_case("gpt2", "decoder")
    block = stack.blocks[1]
    masks = _magnitude_masks(block)
    norm, bias = block.ln_1.weight.detach().clone(), block.attn.c_attn.bias.detach().clone()
    settings = ReconstructSettings(lr=1e-3, epochs=4, accumulate=2, decay="cosine", train_unmasked=True)
    result = reconstruct_block(block, inputs, calls, targets, masks, settings)
    assert not torch.equal(block.ln_1.weight, norm) and not torch.equal(block.attn.c_attn.bias, bias)
    assert result.after < 0.8 * result.before
    for param, keep in masks.items():
        _assert_pruned_exactly(param.detach(), keep)


def test_reconstruction_is_deterministic_given_the_seed():
    finals = []
    for _ in range(2):
        stack, inputs, calls, targets = _block_case("llama", "decoder")
        block = stack.blocks[1]
        masks = _magnitude_masks(block)
        settings = ReconstructSettings(lr=1e-3, epochs=2, decay="linear", seed=3)
        finals.append((reconstruct_block(block, inputs, calls, targets, masks, settings).losses, block.state_dict()))
    assert finals[0][0] == finals[1][0]
    assert all(torch.equal(finals[0][1][k], finals[1][1][k]) for k in finals[0][1])


def test_reconstruction_rejects_masks_that_do_not_fit():
    stack, inputs, calls, targets = _block_case("gpt2", "decoder")
    block = stack.blocks[1]
    c_attn = block.attn.c_attn.weight  # Conv1D: stored in × out (32 × 96)
    transposed = {c_attn: torch.ones(c_attn.shape[1], c_attn.shape[0], dtype=torch.bool)}
    with pytest.raises(ValueError, match="own shape"):
        reconstruct_block(block, inputs, calls, targets, transposed)
    foreign = {stack.blocks[0].attn.c_attn.weight: torch.ones_like(c_attn, dtype=torch.bool)}
    with pytest.raises(ValueError, match="not in this block"):
        reconstruct_block(block, inputs, calls, targets, foreign)
    with pytest.raises(ValueError, match="one call and one target"):
        reconstruct_block(block, inputs, calls[:-1], targets, {})


def test_learning_rate_decays():
    assert [_decay_factor("none", 4)(s) for s in range(5)] == [1.0] * 5
    assert [_decay_factor("linear", 4)(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = [_decay_factor("cosine", 4)(s) for s in range(5)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine[4] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- schedule

def test_cubic_schedule_follows_the_formula():
    schedule = cubic_schedule(0.6, 4, initial=0.1)
    expected = [0.6 - 0.5 * (1 - t / 4) ** 3 for t in (1, 2, 3, 4)]
    assert schedule == pytest.approx(expected, abs=1e-15)
    assert schedule[0] == pytest.approx(0.6 - 0.5 * 27 / 64) and schedule[-1] == 0.6
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    ten = cubic_schedule(0.7, 10)
    assert ten[-1] == 0.7 and all(a < b for a, b in zip(ten, ten[1:]))


def test_cubic_schedule_single_round_and_bad_rounds():
    assert cubic_schedule(0.5, 1) == [0.5]
    for rounds in (0, -2):
        with pytest.raises(ValueError, match="rounds ≥ 1"):
            cubic_schedule(0.5, rounds)
    with pytest.raises(ValueError, match="initial < target"):
        cubic_schedule(0.5, 3, initial=0.5)
