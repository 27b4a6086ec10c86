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
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..calibration import Call, hidden_state
from ..masks import apply_keep

Decay = Literal["none", "linear", "cosine"]


@dataclass(frozen=True)
class ReconstructSettings:
    """Adam's learning rate, passes over the batches, batches per optimiser step, how the learning rate decays to 0
    over the run, whether the loss is divided by the targets' variance (so 1.0 means "as far off as predicting the
    mean"; comparable across blocks), whether unmasked parameters (norms, biases) train, the seed of the batch order,
    and how many tokens the calibration driver puts in one batch when it reconstructs (one optimiser step each).

    The defaults are what `benchmarks/recovery_quality.py` measured best on smollm2-135m for a fixed budget: many
    small steps (1024-token batches) at a learning rate of 1e-3 decayed on a cosine, norms trained too, one pass."""

    lr: float = 1e-3
    epochs: int = 1
    accumulate: int = 1
    decay: Decay = "cosine"
    normalise: bool = True
    train_unmasked: bool = True
    seed: int = 0
    batch_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.accumulate < 1 or self.batch_tokens < 1:
            raise ValueError(f"reconstruction needs lr > 0 and epochs, accumulate, batch_tokens ≥ 1, got {self}")
        if self.decay not in ("none", "linear", "cosine"):
            raise ValueError(f"unknown learning-rate decay '{self.decay}'; use none, linear or cosine")


@dataclass(frozen=True)
class ReconstructResult:
    """`before`: the loss over all batches with the masks applied, before training; `epochs`: the mean training loss
    of each epoch (measured during the epoch, as the weights moved); `after`: the loss over all batches after
    training. `kept` is False when training ended above `before` and the untrained weights were put back (Adam's
    first steps can overshoot weights SparseGPT or ADMM already solved), so reconstruction never makes a block worse
    on its own data. `outputs`: the block's outputs per batch with the weights it was left with, which the caller
    feeds to the next block instead of running this one again."""

    before: float
    epochs: tuple[float, ...]
    after: float
    kept: bool
    outputs: list[torch.Tensor] = field(repr=False, compare=False)

    @property
    def losses(self) -> tuple[float, ...]:
        """The loss before training, then each epoch's mean training loss."""
        return (self.before, *self.epochs)


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
    elements = sum(t.numel() for t in targets)

    def forward(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        args, kwargs = calls[index]
        output = hidden_state(block(inputs[index], *args, **kwargs))
        if output.shape != targets[index].shape:
            raise ValueError(f"block output {tuple(output.shape)} does not match target {tuple(targets[index].shape)}")
        return output, scale * (output.float() - targets[index].float()).pow(2).mean()

    with _training(block, trainable):
        _zero_pruned(masks)
        untrained = {p: p.detach().clone() for p in trainable}
        before, outputs_before = _loss_and_outputs(forward, targets)
        optimizer = torch.optim.Adam(trainable, lr=settings.lr)
        steps = settings.epochs * math.ceil(len(inputs) / settings.accumulate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _decay_factor(settings.decay, steps))
        generator = torch.Generator().manual_seed(settings.seed)
        epochs = []
        for _ in range(settings.epochs):
            total = 0.0
            for group in torch.randperm(len(inputs), generator=generator).split(settings.accumulate):
                optimizer.zero_grad(set_to_none=True)
                for index in group.tolist():
                    loss = forward(index)[1]
                    (loss / len(group)).backward()
                    total += float(loss.detach()) * targets[index].numel()
                _mask_gradients(masks)
                optimizer.step()
                schedule.step()
                _zero_pruned(masks)
            epochs.append(total / elements)
        after, outputs = _loss_and_outputs(forward, targets)
        kept = after <= before
        if not kept:
            with torch.no_grad():
                for param, value in untrained.items():
                    param.copy_(value)
            outputs = outputs_before
    return ReconstructResult(before, tuple(epochs), after, kept, outputs)


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
def _loss_and_outputs(
    forward: Callable[[int], tuple[torch.Tensor, torch.Tensor]], targets: Sequence[torch.Tensor]
) -> tuple[float, list[torch.Tensor]]:
    """The loss over all batches together (each batch's mean weighted by its number of elements) and the outputs."""
    results = [forward(i) for i in range(len(targets))]
    total = sum(t.numel() for t in targets)
    loss = sum(float(batch_loss) * t.numel() for (_, batch_loss), t in zip(results, targets)) / total
    return loss, [output.detach() for output, _ in results]


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
