"""`sparse-bitmask`: compressed-tensors' row-wise bitmask coding of a 2-D matrix.

Parts: `shape` (int64 [rows, cols]), `compressed` (1-D kept values in row-major order), `bitmask` (uint8,
rows × ceil(cols/8), numpy `packbits` little-endian per row) and `row_offsets` (int64, where each row starts in
`compressed`). The compressed-tensors layout (`compressed_tensors.py`) stores these parts under the keys its readers
expect; the codec itself knows nothing of files. Manifests written before the codec had its own name call it
`compressed-tensors`.
"""

from __future__ import annotations

import numpy as np
import torch

from .codecs import Encoded, keep_mask, register

NAME = "sparse-bitmask"


@register
class SparseBitmaskCodec:
    name = NAME
    aliases = ("compressed-tensors",)

    def applies(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel() > 0

    def encode(self, tensor: torch.Tensor) -> Encoded:
        tensor = tensor.contiguous()
        keep = keep_mask(tensor)
        counts = keep.sum(dim=1)
        parts = {
            "shape": torch.tensor(list(tensor.shape), dtype=torch.int64),
            "compressed": tensor[keep],
            "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
            "row_offsets": torch.cumsum(counts, 0) - counts,
        }
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, parts)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        rows, cols = (int(x) for x in encoded.parts["shape"])
        bits = np.unpackbits(encoded.parts["bitmask"].numpy(), axis=-1, count=cols, bitorder="little")
        out = torch.zeros(rows, cols, dtype=encoded.dtype)
        out[torch.from_numpy(bits.astype(bool))] = encoded.parts["compressed"]
        return out
