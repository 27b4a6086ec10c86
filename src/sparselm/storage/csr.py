"""`csr`: values, compact column indices and per-row counts.

Column indices use the narrowest unsigned type that fits the number of columns; when that would be wider than
16 bits, the in-row deltas are stored instead if they fit in 16 bits. Row pointers are stored as per-row counts in
the narrowest type (their cumulative sum is the usual CSR row pointer).
"""

from __future__ import annotations

import torch

from .codecs import Encoded, is_sparse_candidate, keep_mask, register, smallest_uint, values_of


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


@register
class CsrCodec:
    name = "csr"

    def applies(self, tensor: torch.Tensor) -> bool:
        return is_sparse_candidate(tensor)

    def encode(self, tensor: torch.Tensor) -> Encoded:
        rows = _as_rows(tensor.contiguous())
        keep = keep_mask(rows)
        counts = keep.sum(dim=1)
        cols = keep.nonzero()[:, 1]
        n_cols = rows.shape[1]
        delta = False
        if smallest_uint(n_cols - 1).itemsize > 2:
            row_start = torch.cat([torch.ones(1, dtype=torch.bool), torch.diff(keep.nonzero()[:, 0]) != 0])
            gaps = torch.where(row_start, cols, torch.diff(cols, prepend=cols[:1]))
            if len(gaps) == 0 or int(gaps.max()) < 2**16:
                cols, delta = gaps, True
        parts = {
            "values": values_of(rows, keep),
            "columns": cols.to(smallest_uint(int(cols.max()) if len(cols) else 0)),
            "row_counts": counts.to(smallest_uint(int(counts.max()) if len(counts) else 0)),
        }
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, parts, {"delta_columns": delta})

    def decode(self, encoded: Encoded) -> torch.Tensor:
        n_rows = encoded.shape[0]
        n_cols = int(torch.tensor(encoded.shape[1:]).prod()) if len(encoded.shape) > 1 else 1
        counts = encoded.parts["row_counts"].to(torch.int64)
        cols = encoded.parts["columns"].to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(n_rows), counts)
        if encoded.meta.get("delta_columns"):
            starts = torch.cumsum(counts, 0) - counts
            cum = torch.cumsum(cols, 0)
            base = torch.zeros(n_rows, dtype=torch.int64)
            nonempty = counts > 0
            base[nonempty] = cum[starts[nonempty]] - cols[starts[nonempty]]
            cols = cum - base[row_of]
        out = torch.zeros(n_rows * n_cols, dtype=encoded.dtype)
        out[row_of * n_cols + cols] = encoded.parts["values"]
        return out.reshape(encoded.shape)
