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


INNER_CODECS = ("dense", "csr", "bitmask")


@register
class Int8Codec:
    """Per-output-channel int8 values, stored by the smallest of dense / csr / bitmask, plus their fp32 scales.

    Lossy against the float tensor it is given (that is the quantisation); exact for the int8 values and scales it
    stores. A matrix stored in × out (Conv1D) is quantised per column (`per_column`), so its scales still belong to
    output channels.
    """

    name = "int8"

    def applies(self, tensor: torch.Tensor) -> bool:
        return is_sparse_candidate(tensor) and tensor.dim() == 2

    def encode(self, tensor: torch.Tensor, per_column: bool = False) -> Encoded:
        q, scales = quantize_rows(tensor.t() if per_column else tensor)
        inner = min((get_codec(c).encode(q) for c in INNER_CODECS), key=lambda e: e.nbytes)
        meta = {"inner": inner.codec, "inner_meta": inner.meta, "per_column": per_column}
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, {**inner.parts, "scales": scales}, meta)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        q, scales = self.int8_parts(encoded)
        values = dequantize_rows(q, scales, encoded.dtype)
        return values.t().contiguous() if encoded.meta["per_column"] else values

    def int8_parts(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored int8 matrix (out × in) and its per-output-channel scales, exactly as packed."""
        rows, cols = encoded.shape
        shape = (cols, rows) if encoded.meta["per_column"] else (rows, cols)
        parts = {k: v for k, v in encoded.parts.items() if k != "scales"}
        inner = Encoded(encoded.meta["inner"], shape, torch.int8, parts, encoded.meta["inner_meta"])
        return get_codec(inner.codec).decode(inner), encoded.parts["scales"]
