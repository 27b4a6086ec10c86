"""The codec registry: each codec turns one tensor into named parts (plain tensors) and back, bit-exactly.

A codec never sees files: a layout (`layouts.py`) names the parts' safetensors keys and `pack.py` stores them, with
the small per-tensor metadata in the manifest. Adding a codec is one new module with one `@register`ed class,
imported in `storage/__init__.py`. Sparse codecs find non-zeros on the raw bits (so -0.0 survives a round trip) and store the non-zero
values in the tensor's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import SparselmError


@dataclass
class Encoded:
    """One tensor in coded form: `parts` go into safetensors, `meta` (JSON-able) into the manifest."""

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


class Codec(Protocol):
    name: str

    def applies(self, tensor: torch.Tensor) -> bool: ...

    def encode(self, tensor: torch.Tensor) -> Encoded: ...

    def decode(self, encoded: Encoded) -> torch.Tensor: ...


CODECS: dict[str, Codec] = {}


def register(cls: type) -> type:
    """Class decorator: instantiate the codec and file it under its normalised name and any older names."""
    codec = cls()
    for name in (codec.name, *getattr(codec, "aliases", ())):
        CODECS[name.lower()] = codec
    return cls


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name.lower()]
    except KeyError:
        raise SparselmError(f"unknown codec '{name}'; known codecs: {', '.join(sorted(CODECS))}") from None


INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_mask(tensor: torch.Tensor) -> torch.Tensor:
    """True where the stored bits are not all zero (so -0.0 and NaN count as values and round-trip exactly)."""
    return tensor.contiguous().view(INT_VIEW[tensor.element_size()]) != 0


def is_sparse_candidate(tensor: torch.Tensor) -> bool:
    """Sparse codecs apply to floating tensors with at least two dimensions (weight matrices)."""
    return tensor.dim() >= 2 and tensor.is_floating_point() and tensor.numel() > 0


def values_of(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept values in row-major order, in the tensor's dtype."""
    return tensor.contiguous().reshape(-1)[keep.reshape(-1)]


def scatter_values(values: torch.Tensor, keep_flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a dense tensor from kept values and a flat keep-mask (zeros elsewhere)."""
    out = torch.zeros(int(np.prod(shape)), dtype=values.dtype)
    out[keep_flat] = values
    return out.reshape(shape)


def smallest_uint(max_value: int) -> torch.dtype:
    """The narrowest unsigned (or int32/int64) dtype that holds values up to max_value."""
    if max_value < 2**8:
        return torch.uint8
    if max_value < 2**16:
        return torch.uint16
    if max_value < 2**31:
        return torch.int32
    return torch.int64


@register
class DenseCodec:
    """The tensor as it is."""

    name = "dense"

    def applies(self, tensor: torch.Tensor) -> bool:
        return True

    def encode(self, tensor: torch.Tensor) -> Encoded:
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, {"data": tensor.contiguous()})

    def decode(self, encoded: Encoded) -> torch.Tensor:
        return encoded.parts["data"].reshape(encoded.shape)

