"""`SparseLinear`: a drop-in for a Linear/Conv1D that picks dense or sparse compute by the number of tokens.

It keeps the original `weight` and `bias` parameters under their original names and orientation (so state_dict,
saving and tied weights are unchanged) and adds sparse copies of the weight for the kernels that measured faster.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import KERNELS, token_major

if TYPE_CHECKING:
    from .fusion import SiblingGroup


class SparseLinear(nn.Module):
    def __init__(
        self, module: nn.Module, transposed: bool, choices: dict[int, str], built: dict[str, torch.Tensor] | None = None
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
        kernels = set(self.choices.values()) - {"dense"}
        self.sparse = {k: built[k] if k in built else KERNELS[k].build(weight) for k in kernels}
        self.group: SiblingGroup | None = None  # set by SiblingGroup when fused with layers reading the same input
        self.group_index = 0
        self.token_major = False  # contiguous outputs instead of feature-major views (see runtime.fusion)

    def out_in(self) -> torch.Tensor:
        return self.weight.t() if self.transposed else self.weight

    def kernel_for(self, tokens: int) -> str:
        """The choice measured at the token count nearest to this one (on a log scale), remembered per count."""
        kernel = self._kernel_by_tokens.get(tokens)
        if kernel is None:
            nearest = min(self.choices, key=lambda t: abs(math.log2(max(t, 1)) - math.log2(max(tokens, 1))))
            kernel = self._kernel_by_tokens[tokens] = self.choices[nearest]
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        kernel = self.kernel_for(tokens)
        if kernel == "dense":  # as the original module computes it, with no extra work on this path
            return F.linear(x, self.out_in(), self.bias)
        if self.group is not None and self.group.kernel_for(tokens) == kernel:
            y = self.group.part(self.group_index, x, kernel)
        else:
            y = KERNELS[kernel].matmul(self.sparse[kernel], x.reshape(-1, self.in_features))
        if self.token_major:
            y = token_major(y)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, choices={self.choices}"
