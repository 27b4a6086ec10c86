"""`rice`: the values plus an entropy-coded keep-mask (Golomb-Rice codes of the gaps between positions).

A raw bitmask spends one bit per weight whatever the sparsity s, while the information in the mask is only the
binary entropy H(s) (0.08 bits at s = 0.99). For a mask whose positions are spread like independent draws, the
gaps between kept positions are geometric, and Golomb-Rice codes are within a few percent of the entropy of a
geometric source. Each gap g is split as g = q·2^k + r: the quotients go to a unary stream (q ones, then a zero)
and the remainders to a fixed k-bit stream, so both encoding and decoding are vectorised numpy operations (the
zeros of the unary stream mark where each code ends). When more than half the weights are kept, the positions
of the zeros are coded instead.
"""

from __future__ import annotations

import numpy as np
import torch

from .codecs import Encoded, is_sparse_candidate, keep_mask, register, scatter_values, values_of

MAX_K = 30


def best_k(gaps: np.ndarray) -> int:
    """The Rice parameter with the fewest total bits (exact count, not an estimate)."""
    n = len(gaps)
    costs = [int((gaps >> k).sum()) + n * (1 + k) for k in range(MAX_K)]
    return int(np.argmin(costs))


def encode_positions(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Sorted positions → (unary bytes, remainder bytes, k, unary bit count)."""
    gaps = np.diff(positions, prepend=-1) - 1
    k = best_k(gaps) if len(gaps) else 0
    quotients = gaps >> k
    ends = np.cumsum(quotients + 1) - 1
    n_unary = int(ends[-1]) + 1 if len(ends) else 0
    unary = np.ones(n_unary, dtype=np.uint8)
    unary[ends] = 0
    shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
    remainder_bits = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(unary), np.packbits(remainder_bits.reshape(-1)), k, n_unary


def decode_positions(unary: np.ndarray, remainders: np.ndarray, k: int, n_unary: int, count: int) -> np.ndarray:
    ends = np.flatnonzero(np.unpackbits(unary, count=n_unary) == 0)
    quotients = np.diff(ends, prepend=-1) - 1
    bits = np.unpackbits(remainders, count=count * k).reshape(count, k).astype(np.int64)
    rem = (bits << np.arange(k - 1, -1, -1, dtype=np.int64)).sum(axis=1) if k else np.zeros(count, dtype=np.int64)
    gaps = (quotients << k) | rem
    return np.cumsum(gaps + 1) - 1


@register
class RiceCodec:
    name = "rice"

    def applies(self, tensor: torch.Tensor) -> bool:
        return is_sparse_candidate(tensor)

    def encode(self, tensor: torch.Tensor) -> Encoded:
        keep = keep_mask(tensor).reshape(-1)
        invert = bool(keep.sum() * 2 > keep.numel())
        coded = (~keep if invert else keep).numpy()
        unary, remainders, k, n_unary = encode_positions(np.flatnonzero(coded))
        parts = {
            "values": values_of(tensor, keep),
            "unary": torch.from_numpy(unary),
            "remainders": torch.from_numpy(remainders),
        }
        meta = {"k": k, "unary_bits": n_unary, "positions": int(coded.sum()), "invert": invert}
        return Encoded(self.name, tuple(tensor.shape), tensor.dtype, parts, meta)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        m = encoded.meta
        numel = int(np.prod(encoded.shape))
        positions = decode_positions(
            encoded.parts["unary"].numpy(), encoded.parts["remainders"].numpy(), m["k"], m["unary_bits"], m["positions"]
        )
        coded = np.zeros(numel, dtype=bool)
        coded[positions] = True
        keep = torch.from_numpy(~coded if m["invert"] else coded)
        return scatter_values(encoded.parts["values"], keep, encoded.shape)
