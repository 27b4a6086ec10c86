"""Checks tests make on keep-masks that the library itself never needs (it builds block masks tile by tile)."""

from __future__ import annotations

import torch


def is_block(keep: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether every rows × cols tile is entirely kept or entirely pruned."""
    out_dim, in_dim = keep.shape
    tiles = keep.reshape(out_dim // rows, rows, in_dim // cols, cols).sum(dim=(1, 3))
    return bool(((tiles == 0) | (tiles == rows * cols)).all())
