"""A view of the weight matrices of any transformers model.

This is the only module that knows GPT-2's `Conv1D` stores its weight as in × out: every other module sees each
matrix as out × in, like `nn.Linear`. It also finds the model's transformer blocks (the `ModuleList`s of identical
layers) and labels each matrix with its block, component and side, so no other code matches attribute paths of a
particular model family.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import SparselmError
from .facts import Family
from .facts import family as model_family  # the name analysis/distribution.py imports

Component = Literal["attention", "mlp", "embedding", "head", "other"]
Side = Literal["encoder", "decoder", "cross-attention"]

CROSS_ATTENTION_MARKERS = ("encoder_attn", "encdecattention", "crossattention", "cross_attn")
ATTENTION_MARKERS = ("attn", "attention")
HEAD_MARKERS = ("lm_head", "classifier", "pooler", "score", "qa_outputs", "cls", "head")


@dataclass(frozen=True)
class BlockList:
    """One stack of transformer blocks, e.g. `model.layers` or `model.encoder.layers`."""

    path: str
    side: Literal["encoder", "decoder"]
    blocks: nn.ModuleList


@dataclass(frozen=True)
class Matrix:
    """One weight matrix, always presented as out × in."""

    name: str
    module_name: str
    module: nn.Module
    kind: Literal["linear", "conv1d", "embedding"]
    block: int | None
    block_path: str | None
    component: Component
    side: Side
    prunable: bool

    @property
    def block_name(self) -> str | None:
        """`<stack path>.<index>` of the block holding the matrix (as `calibration.BlockRef.name`), or None."""
        return f"{self.block_path}.{self.block}" if self.block_path is not None else None

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.weight

    @property
    def transposed(self) -> bool:
        return self.kind == "conv1d"

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    def weight(self) -> torch.Tensor:
        """The weight as out × in. For Conv1D this is a transposed view: in-place edits reach the model."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight(self, value: torch.Tensor) -> None:
        """Write an out × in tensor back into the module in the module's own dtype and orientation."""
        if tuple(value.shape) != self.shape:
            raise ValueError(f"{self.name}: expected shape {self.shape}, got {tuple(value.shape)}")
        self.weight().copy_(value.to(self.module.weight.dtype))


def _has_matrix(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, Conv1D)) for m in module.modules())


def find_block_lists(model: nn.Module) -> list[BlockList]:
    """The outermost ModuleLists of identical layers that hold Linear/Conv1D weights, in forward order."""
    family = model_family(model)
    found: list[BlockList] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(b.path + ".") for b in found):
            continue
        if len({type(m) for m in module}) != 1 or not _has_matrix(module[0]):
            continue
        side = _block_side(name, family)
        found.append(BlockList(path=name, side=side, blocks=module))
    return sorted(found, key=lambda b: 0 if b.side == "encoder" else 1)


def _block_side(path: str, family: Family) -> Literal["encoder", "decoder"]:
    if family == "encoder-decoder":
        return "decoder" if "decoder" in path.split(".") else "encoder"
    return "encoder" if family == "encoder-only" else "decoder"


def _component(module_name: str, in_block: bool, module: nn.Module) -> Component:
    parts = [p.lower() for p in module_name.split(".")]
    if isinstance(module, nn.Embedding):
        return "embedding"
    if in_block:
        return "attention" if any(m in p for p in parts for m in ATTENTION_MARKERS) else "mlp"
    if any(p in HEAD_MARKERS or p.startswith(HEAD_MARKERS) for p in parts):
        return "head"
    return "other"


def _side(module_name: str, block_side: Literal["encoder", "decoder"] | None, family: Family) -> Side:
    lowered = module_name.lower()
    if any(m in lowered for m in CROSS_ATTENTION_MARKERS):
        return "cross-attention"
    if block_side is not None:
        return block_side
    if family == "encoder-decoder":
        return "encoder" if "encoder" in lowered.split(".") else "decoder"
    return "encoder" if family == "encoder-only" else "decoder"


def _kind(module: nn.Module) -> Literal["linear", "conv1d", "embedding"] | None:
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def iter_matrices(model: nn.Module) -> Iterator[Matrix]:
    """Every distinct weight matrix of the model (tied weights appear once, under their first name)."""
    family = model_family(model)
    blocks = find_block_lists(model)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        kind = _kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or weight is None or weight.dim() != 2 or id(weight) in seen:
            continue
        seen.add(id(weight))
        block_list = next((b for b in blocks if module_name.startswith(b.path + ".")), None)
        block = int(module_name[len(block_list.path) + 1 :].split(".")[0]) if block_list else None
        in_block = block_list is not None and kind != "embedding"
        yield Matrix(
            name=f"{module_name}.weight",
            module_name=module_name,
            module=module,
            kind=kind,
            block=block,
            block_path=block_list.path if block_list else None,
            component=_component(module_name, in_block, module),
            side=_side(module_name, block_list.side if block_list else None, family),
            prunable=in_block,
        )


def select_matrices(model: nn.Module, include_embeddings: bool = False) -> list[Matrix]:
    """The matrices sparselm works on: those in transformer blocks, plus embeddings and heads when asked."""
    chosen = [m for m in iter_matrices(model) if m.prunable or include_embeddings]
    if not chosen:
        raise SparselmError(
            f"{type(model).__name__} has no Linear/Conv1D weight matrices in transformer blocks; "
            "sparselm works on transformer models built from Linear or Conv1D layers"
        )
    return chosen


def by_block(matrices: list[Matrix]) -> dict[str, list[Matrix]]:
    """The matrices inside transformer blocks, grouped by block name in model order."""
    groups: dict[str, list[Matrix]] = {}
    for m in matrices:
        if m.block_name is not None:
            groups.setdefault(m.block_name, []).append(m)
    return groups


def sparsity_of(matrices: list[Matrix]) -> float:
    zeros = sum(int((m.weight() == 0).sum()) for m in matrices)
    total = sum(m.numel for m in matrices)
    return zeros / total if total else 0.0
