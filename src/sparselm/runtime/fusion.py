"""Sibling fusion: sparse layers that read the same activations (q/k/v, gate/up) run as one sparse product.

Fused, the activations are transposed once and the sparse library is called once per group instead of once per
layer. Groups are found by tracing one forward pass, for any architecture: modules under the same parent that
receive the very same input tensor.

Members of a group inside an attention module return token-major (contiguous) outputs. Attention's fused kernels
(SDPA's flash path on CPU) need unit stride along the head dimension; handed the feature-major views the sparse
product makes, they fall back to the math path, which costs more than the transposes (smollm2-135m at 0.95, 128
tokens: 257 → 237 ms per forward with token-major q/k/v, 225 ms fused as well).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .kernels import KERNELS

if TYPE_CHECKING:
    from .modules import SparseLinear


def shared_input_groups(model: nn.Module, names: list[str], inputs: dict[str, Any]) -> list[list[str]]:
    """Names of modules (among `names`) with the same parent that were called on the same tensor, in call order."""
    callers: dict[int, list[str]] = {}
    seen: list[torch.Tensor] = []  # held so that no id is reused during the trace

    def recorder(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.append(args[0])
                callers.setdefault(id(args[0]), []).append(name)

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    grouped: set[str] = set()
    for called in callers.values():
        by_parent: dict[str, list[str]] = {}
        for name in dict.fromkeys(called):
            by_parent.setdefault(name.rpartition(".")[0], []).append(name)
        for members in by_parent.values():
            if len(members) > 1 and not grouped.intersection(members):
                groups.append(members)
                grouped.update(members)
    return groups


def is_attention(module: nn.Module) -> bool:
    """transformers names every attention implementation *Attention (LlamaAttention, BertSelfAttention, …)."""
    return "Attention" in type(module).__name__


def version_of(x: torch.Tensor) -> int:
    """x's in-place write counter; inference tensors have none, and then the same object means the same values."""
    return -1 if x.is_inference() else x._version


class SiblingGroup:
    """Sparse layers fed the same activations: one product for all of them, each member then takes its rows.

    The fused result is kept only until every member has taken its part (or the input changes), so at most one
    set of outputs per group is alive beyond what the model itself holds.
    """

    def __init__(self, members: list[SparseLinear], token_major: bool) -> None:
        self.members = members
        self.token_major = token_major
        self.sizes = [m.out_features for m in members]
        self._kernel_by_tokens: dict[int, str | None] = {}
        self.fused: dict[str, torch.Tensor] = {}
        shared = set.intersection(*(set(m.choices.values()) for m in members)) - {"dense"}
        if shared:
            stacked = torch.cat([m.out_in().detach() for m in members])
            self.fused = {kernel: KERNELS[kernel].build(stacked) for kernel in shared}
        self._input: torch.Tensor | None = None
        self._version = -2
        self._parts: list[torch.Tensor] = []
        self._pending: set[int] = set()
        for index, member in enumerate(members):
            member.group, member.group_index = self, index

    def kernel_for(self, tokens: int) -> str | None:
        """The sparse kernel every member runs at this token count, or None when they differ (or one is dense)."""
        if tokens not in self._kernel_by_tokens:
            kernels = {m.kernel_for(tokens) for m in self.members}
            kernel = kernels.pop() if len(kernels) == 1 else None
            self._kernel_by_tokens[tokens] = kernel if kernel in self.fused else None
        return self._kernel_by_tokens[tokens]

    def part(self, index: int, x: torch.Tensor, kernel: str) -> torch.Tensor:
        """Member `index`'s output (tokens × out) for input x, computing the fused product when x is new."""
        if self._input is not x or self._version != version_of(x) or index not in self._pending:
            self._compute(x, kernel)
        self._pending.discard(index)
        part = self._parts[index]
        if not self._pending:
            self._input, self._parts = None, []
        return part

    def _compute(self, x: torch.Tensor, kernel: str) -> None:
        stacked = KERNELS[kernel].matmul(self.fused[kernel], x.reshape(-1, x.shape[-1]))  # tokens × Σ out, a view
        parts = stacked.split(self.sizes, dim=1)
        self._parts = [p.contiguous() for p in parts] if self.token_major else list(parts)
        self._input, self._version = x, version_of(x)
        self._pending = set(range(len(self.members)))
