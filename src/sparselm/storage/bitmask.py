"""`bitmask`: the non-zero values plus a packed 1-bit keep-mask (row-major, little-endian bit order)."""

from __future__ import annotations

import numpy as np
import torch

from .codecs import Encoded, is_sparse_candidate, keep_mask, register, scatter_values, values_of


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


@register
class BitmaskCodec:
    name = "bitmask"

    def applies(self, tensor: torch.Tensor) -> bool:
        return is_sparse_candidate(tensor)

    def encode(self, tensor: torch.Tensor) -> Encoded:
        keep = keep_mask(tensor)
        parts = {"values": values_of(tensor, keep), "mask": pack_bits(keep)}
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, parts)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        numel = int(np.prod(encoded.shape))
        return scatter_values(encoded.parts["values"], unpack_bits(encoded.parts["mask"], numel), encoded.shape)
