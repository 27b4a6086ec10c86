"""Weight-only int8: symmetric per-output-channel (per-row) quantisation, and the `int8` codec that stores it.

A row's scale is its largest magnitude / 127, so every value maps to round(w / scale) in [-127, 127] and zeros stay
exactly zero (pruned positions remain pruned; a kept weight smaller than half a step also becomes 0). The codec stores
the int8 values sparsely (CSR with the narrowest column index, as `csr`) plus the fp32 scales; decoding gives q·scale
in the tensor's dtype, and the parts themselves (values, scales) come back bit for bit.
"""

from __future__ import annotations

import torch

from .codecs import Encoded, get_codec, is_sparse_candidate, register

QMAX = 127


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) of a 2-D matrix; an all-zero row gets scale 1 and zeros."""
    rows = matrix.detach().float().reshape(matrix.shape[0], -1)
    amax = rows.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(rows / scales[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.reshape(matrix.shape), scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale per row, in `dtype`."""
    rows = q.reshape(q.shape[0], -1).float() * scales[:, None]
    return rows.reshape(q.shape).to(dtype)


@register
class Int8Codec:
    """Per-row int8 values stored as CSR, with their scales. Lossy against the float tensor it is given (that is the
    quantisation); exact for the int8 values and scales it stores."""

    name = "int8"

    def applies(self, tensor: torch.Tensor) -> bool:
        return is_sparse_candidate(tensor)

    def encode(self, tensor: torch.Tensor) -> Encoded:
        q, scales = quantize_rows(tensor)
        sparse = get_codec("csr").encode(q.reshape(q.shape[0], -1))
        parts = {**sparse.parts, "scales": scales}
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, parts, sparse.meta)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        q, scales = self.int8_parts(encoded)
        return dequantize_rows(q, scales, encoded.dtype).reshape(encoded.shape)

    def int8_parts(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored int8 matrix (rows × the rest) and its scales, exactly as packed."""
        rows = encoded.shape[0]
        cols = int(torch.tensor(encoded.shape[1:]).prod()) if len(encoded.shape) > 1 else 1
        csr_parts = {k: v for k, v in encoded.parts.items() if k != "scales"}
        q = get_codec("csr").decode(Encoded("csr", (rows, cols), torch.int8, csr_parts, encoded.meta))
        return q, encoded.parts["scales"]
