"""One traced forward pass decides two things about the sparse layers, for any architecture.

Fusion: sparse layers under the same parent that read the very same input tensor (q/k/v, gate/up, cross-attention
k/v) run as one sparse product (runtime.modules.SiblingGroup): the activations are transposed once and the sparse
library is called once per group instead of once per layer.

Output layout: a sparse product naturally yields feature-major outputs (out × tokens, seen through a transposed
view), which is what the next sparse product wants. Projections of an attention module's own inputs (q/k/v, GPT-2's
c_attn, cross-attention k/v) return token-major (contiguous) outputs instead: attention's fused kernels (SDPA's
flash path on CPU) need unit stride along the head dimension, and handed the feature-major views they fall back to
the math path, which costs more than the transposes (smollm2-135m at 0.95, 128 tokens: 257 → 237 ms per forward
with token-major q/k/v, 225 ms fused as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Trace:
    groups: list[list[str]]  # layers with one parent called on the same tensor, in call order
    attention_inputs: set[str]  # layers whose input is an input of their enclosing attention module


def is_attention(module: nn.Module) -> bool:
    """transformers names every attention implementation *Attention (LlamaAttention, BertSelfAttention, …)."""
    return "Attention" in type(module).__name__


def enclosing_attention(model: nn.Module, name: str) -> str | None:
    """The nearest ancestor of module `name` that is an attention module."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:depth])
        if is_attention(model.get_submodule(ancestor)):
            return ancestor
    return None


def trace_layers(model: nn.Module, names: list[str], inputs: dict[str, Any]) -> Trace:
    """Run the model once on `inputs`, recording which tensor each of the layers `names` is called on."""
    input_ids: dict[str, list[int]] = {}
    attention_tensor_ids: dict[str, set[int]] = {}
    held: list[Any] = []  # every recorded tensor stays alive, so no id is reused during the trace

    def layer_hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                held.append(args[0])
                input_ids.setdefault(name, []).append(id(args[0]))

        return record

    def attention_hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            held.extend(tensors)
            attention_tensor_ids.setdefault(name, set()).update(map(id, tensors))

        return record

    attention_of = {name: enclosing_attention(model, name) for name in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(layer_hook(n)) for n in names]
    handles += [
        model.get_submodule(a).register_forward_pre_hook(attention_hook(a), with_kwargs=True)
        for a in set(attention_of.values()) - {None}
    ]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    attention_inputs = {
        n for n, ids in input_ids.items()
        if attention_of[n] is not None and set(ids) <= attention_tensor_ids.get(attention_of[n], set())
    }
    return Trace(shared_input_groups(input_ids), attention_inputs)


def shared_input_groups(input_ids: dict[str, list[int]]) -> list[list[str]]:
    """Layers with the same parent called on the same tensor; a layer joins one group at most."""
    callers: dict[int, list[str]] = {}
    for name, ids in input_ids.items():
        for i in dict.fromkeys(ids):
            callers.setdefault(i, []).append(name)
    groups: list[list[str]] = []
    grouped: set[str] = set()
    for called in callers.values():
        by_parent: dict[str, list[str]] = {}
        for name in called:
            by_parent.setdefault(name.rpartition(".")[0], []).append(name)
        for members in by_parent.values():
            if len(members) > 1 and not grouped.intersection(members):
                groups.append(members)
                grouped.update(members)
    return groups
