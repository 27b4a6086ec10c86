"""The modules that run sparse products: `SparseLinear` and the `SiblingGroup` of layers sharing one product.

`SparseLinear` is a drop-in for a Linear/Conv1D that picks dense or sparse compute by the number of tokens. It keeps
the original `weight` and `bias` parameters under their original names and orientation (so state_dict, saving and
tied weights are unchanged) and adds sparse copies of the weight for the kernels that measured faster.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import KERNELS, token_major


class SparseLinear(nn.Module):
    def __init__(
        self,
        module: nn.Module,
        transposed: bool,
        choices: dict[int, str],
        built: dict[str, Any] | None = None,
        dense_kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.weight = module.weight
        self.bias = module.bias
        self.transposed = transposed
        self.choices = dict(sorted(choices.items()))
        self._kernel_by_tokens: dict[int, str] = {}
        weight = self.out_in()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        built = built or {}
        kernels = set(self.choices.values()) - {"dense"} | ({dense_kernel} if dense_kernel else set())
        self.sparse = {k: built[k] if k in built else KERNELS[k].build(weight) for k in kernels}
        self.dense_kernel = dense_kernel  # dense compute other than F.linear on `weight` (weight-only int8)
        self.group: SiblingGroup | None = None  # set by SiblingGroup when fused with layers reading the same input
        self.group_index = 0
        self.token_major = False  # contiguous outputs instead of feature-major views (see runtime.fusion)
        self.has_bias = module.bias is not None  # a plain attribute: reading a parameter goes through __getattr__

    def out_in(self) -> torch.Tensor:
        return self.weight.t() if self.transposed else self.weight

    def kernel_for(self, tokens: int) -> str:
        """The choice measured at the token count nearest to this one (on a log scale), remembered per count."""
        kernel = self._kernel_by_tokens.get(tokens)
        if kernel is None:
            nearest = min(self.choices, key=lambda t: abs(math.log2(max(t, 1)) - math.log2(max(tokens, 1))))
            kernel = self._kernel_by_tokens[tokens] = self.choices[nearest]
        return kernel

    def use(self, tokens: int, kernel: str) -> None:
        """Run `kernel` at this measured token count from now on: its sparse form is built if this layer has none,
        and a form no token count uses any more is dropped."""
        if kernel not in self.sparse:
            self.sparse[kernel] = KERNELS[kernel].build(self.out_in())
        self.choices[tokens] = kernel
        self._kernel_by_tokens.clear()
        used = {*self.choices.values(), self.dense_kernel}
        self.sparse = {k: form for k, form in self.sparse.items() if k in used}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        kernel = self.kernel_for(tokens)
        if kernel == "dense" and self.dense_kernel is None:  # as the original module computes it, no extra work
            return F.linear(x, self.out_in(), self.bias)
        if kernel == "dense":
            y = KERNELS[self.dense_kernel].matmul(self.sparse[self.dense_kernel], x)
        elif self.group is not None and self.group.kernel_for(tokens) == kernel:
            y = self.group.part(self.group_index, x, kernel)
        else:
            y = KERNELS[kernel].matmul(self.sparse[kernel], x)
        if self.token_major:
            y = token_major(y)
        return y + self.bias if self.has_bias else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, choices={self.choices}"


def version_of(x: torch.Tensor) -> int:
    """x's in-place write counter; inference tensors have none, and then the same object means the same values."""
    return -1 if x.is_inference() else x._version


class SiblingGroup:
    """Sparse layers fed the same activations: one product for all of them, each member then takes its rows.

    The fused result is kept only until every member has taken its part (or the input changes), so at most one
    set of outputs per group is alive beyond what the model itself holds.
    """

    def __init__(self, members: list[SparseLinear]) -> None:
        self.members = members
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
        """Member `index`'s output ([..., out], feature-major like any sparse product) for input x, computing the
        fused product when x is new."""
        if self._input is not x or self._version != version_of(x) or index not in self._pending:
            self._compute(x, kernel)
        self._pending.discard(index)
        part = self._parts[index]
        if not self._pending:
            self._input, self._parts = None, []
        return part

    def _compute(self, x: torch.Tensor, kernel: str) -> None:
        stacked = KERNELS[kernel].matmul(self.fused[kernel], x)  # [..., Σ out], a view
        self._parts = list(stacked.split(self.sizes, dim=-1))
        self._input, self._version = x, version_of(x)
        self._pending = set(range(len(self.members)))
