"""Block reconstruction: train a pruned block's kept weights so it reproduces the dense block.

As in "A Free Lunch in LLM Compression" (2025), EBFT and Wanda++'s regional optimisation: after a block is masked, its
kept weights are trained with Adam, masks fixed, to minimise the MSE between the block's output on the inputs the
*pruned* model feeds it and the *dense* block's output on the dense model's inputs. Training on the pruned inputs
lets each block also absorb the errors of the blocks before it.

Inputs come in batches, as `sparselm.calibration` captures them: per batch a hidden-state tensor, the rest of the
block's call (positional arguments after the hidden state, keyword arguments: attention masks, rotary position
embeddings, T5's position bias, the encoder output for cross-attention), passed through untouched, and the dense
target. Because the rest of the call is opaque, batches are never re-cut: an optimiser step sees `accumulate`
consecutive batches of a shuffled order (gradient accumulation).

Masks stay fixed: each masked parameter's gradient is multiplied by its keep-mask before the step, so Adam's moments of
pruned entries stay exactly zero and never move them, and the pruned entries are zeroed again after every step as
+0.0. The masked entries are zeroed once before training too. Parameters without a mask (norms, biases, matrices not
in the mapping) are frozen unless `train_unmasked`, which trains them all, unconstrained. The block runs in eval mode
(no dropout: the targets were computed without it); its modes and `requires_grad` flags are restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..calibration import Call, hidden_state
from ..masks import apply_keep

Decay = Literal["none", "linear", "cosine"]


@dataclass(frozen=True)
class ReconstructSettings:
    """Adam's learning rate (EBFT's 2e-4 by default), passes over the batches, batches per optimiser step, how the
    learning rate decays to 0 over the run, whether the loss is divided by the targets' variance (so 1.0 means "as
    far off as predicting the mean"; comparable across blocks), whether unmasked parameters train, and the seed of
    the batch order."""

    lr: float = 2e-4
    epochs: int = 2
    accumulate: int = 1
    decay: Decay = "none"
    normalise: bool = True
    train_unmasked: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.accumulate < 1:
            raise ValueError(f"reconstruction needs lr > 0, epochs ≥ 1 and accumulate ≥ 1, got {self}")
        if self.decay not in ("none", "linear", "cosine"):
            raise ValueError(f"unknown learning-rate decay '{self.decay}'; use none, linear or cosine")


@dataclass(frozen=True)
class ReconstructResult:
    """The loss over all batches before training (`losses[0]`) and after each epoch."""

    losses: tuple[float, ...]

    @property
    def before(self) -> float:
        return self.losses[0]

    @property
    def after(self) -> float:
        return self.losses[-1]


def reconstruct_block(
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    calls: Sequence[Call],
    targets: Sequence[torch.Tensor],
    keep: Mapping[nn.Parameter, torch.Tensor],
    settings: ReconstructSettings = ReconstructSettings(),
) -> ReconstructResult:
    """Train `block`'s kept weights in place towards the targets; `keep` maps each masked parameter to its keep-mask
    in the parameter's own orientation (a GPT-2 `Conv1D` weight's mask is in × out)."""
    _check_batches(inputs, calls, targets)
    masks = _checked_masks(block, keep)
    trainable = [p for p in block.parameters() if settings.train_unmasked or p in masks]
    scale = 1 / _target_variance(targets) if settings.normalise else 1.0

    def loss_of(index: int) -> torch.Tensor:
        args, kwargs = calls[index]
        output = hidden_state(block(inputs[index], *args, **kwargs))
        if output.shape != targets[index].shape:
            raise ValueError(f"block output {tuple(output.shape)} does not match target {tuple(targets[index].shape)}")
        return scale * (output.float() - targets[index].float()).pow(2).mean()

    with _training(block, trainable):
        _zero_pruned(masks)
        optimizer = torch.optim.Adam(trainable, lr=settings.lr)
        steps = settings.epochs * math.ceil(len(inputs) / settings.accumulate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _decay_factor(settings.decay, steps))
        generator = torch.Generator().manual_seed(settings.seed)
        losses = [_mean_loss(loss_of, targets)]
        for _ in range(settings.epochs):
            for group in torch.randperm(len(inputs), generator=generator).split(settings.accumulate):
                optimizer.zero_grad(set_to_none=True)
                for index in group.tolist():
                    (loss_of(index) / len(group)).backward()
                _mask_gradients(masks)
                optimizer.step()
                schedule.step()
                _zero_pruned(masks)
            losses.append(_mean_loss(loss_of, targets))
    return ReconstructResult(tuple(losses))


def _check_batches(inputs: Sequence[torch.Tensor], calls: Sequence[Call], targets: Sequence[torch.Tensor]) -> None:
    if not inputs or not len(inputs) == len(calls) == len(targets):
        raise ValueError(
            f"reconstruction needs one call and one target per input batch, got {len(inputs)} input batches, "
            f"{len(calls)} calls and {len(targets)} targets"
        )


def _checked_masks(block: nn.Module, keep: Mapping[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    names = {param: name for name, param in block.named_parameters()}
    masks = {}
    for param, mask in keep.items():
        if param not in names:
            raise ValueError("a keep-mask was given for a parameter that is not in this block")
        if mask.dtype != torch.bool or mask.shape != param.shape:
            raise ValueError(
                f"the keep-mask of {names[param]} must be bool of the parameter's own shape {tuple(param.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        masks[param] = mask.to(param.device)
    return masks


def _target_variance(targets: Sequence[torch.Tensor]) -> float:
    """Variance of every target element together (float64 sums, one pass)."""
    count, total, squares = 0, 0.0, 0.0
    for t in targets:
        t = t.detach().to(torch.float64)
        count += t.numel()
        total += float(t.sum())
        squares += float((t * t).sum())
    variance = squares / count - (total / count) ** 2
    if variance <= 0:
        raise ValueError("the targets are constant; a variance-normalised loss is undefined (set normalise=False)")
    return variance


def _decay_factor(decay: Decay, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier after `step` optimiser steps: constant, or falling to 0 at the last step."""
    if decay == "linear":
        return lambda step: 1 - step / steps
    if decay == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    return lambda step: 1.0


@torch.no_grad()
def _mean_loss(loss_of: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """The loss over all batches together: each batch's mean weighted by its number of elements."""
    total = sum(t.numel() for t in targets)
    return sum(float(loss_of(i)) * t.numel() for i, t in enumerate(targets)) / total


def _mask_gradients(masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
    for param, mask in masks.items():
        if param.grad is not None:
            param.grad.mul_(mask)


@torch.no_grad()
def _zero_pruned(masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
    for param, mask in masks.items():
        apply_keep(param.data, mask)


@contextmanager
def _training(block: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Only `trainable` requires gradients, the block is in eval mode and autograd is on; all restored after."""
    flags = {p: p.requires_grad for p in block.parameters()}
    modes = {m: m.training for m in block.modules()}
    chosen = set(trainable)
    for param in flags:
        param.requires_grad_(param in chosen)
    block.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for module, mode in modes.items():
            module.train(mode)
