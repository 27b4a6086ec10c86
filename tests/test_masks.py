"""Keep-masks and patterns: parsing, exact counts, deterministic ties, N:M and block validity."""

from __future__ import annotations

import pytest
import torch
from mask_checks import is_block

from sparselm.errors import SparselmError
from sparselm import masks
from sparselm.masks import (
    count_zeros,
    apply_keep,
    NM,
    Block,
    Unstructured,
    check_shape,
    is_n_of_m,
    keep_mask,
    keep_n_of_m,
    keep_top,
    keep_top_per_row,
    parse_pattern,
    prune_count,
    sparsity,
    tile_scores,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("unstructured", Unstructured()), ("2:4", NM(2, 4)), (" 4:8 ", NM(4, 8)), ("block:8x8", Block(8, 8)),
     ("BLOCK:16x4", Block(16, 4))],
)
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "zigzag", "4:4", "0:4", "5:4", "block:0x8", "block:8", "2-4"])
def test_parse_pattern_rejects(text):
    with pytest.raises(SparselmError):
        parse_pattern(text)


def test_check_shape():
    check_shape(NM(2, 4), (3, 8), "w")
    check_shape(Block(2, 4), (4, 8), "w")
    with pytest.raises(SparselmError, match="not divisible by 3"):
        check_shape(NM(1, 3), (4, 8), "w")
    with pytest.raises(SparselmError, match="divide both"):
        check_shape(Block(3, 4), (4, 8), "w")


def test_prune_count_is_floor_and_robust():
    assert prune_count(100, 0.29) == 29  # 0.29 * 100 = 28.999…
    assert prune_count(10, 0.55) == 5
    assert prune_count(7, 0.0) == 0


def _stable_sort_keep(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Independent reference: prune the first n_prune entries of a stable ascending sort of each row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :n_prune], False)
    return keep


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_keep_top_equals_a_stable_sort(s):
    g = torch.Generator().manual_seed(7)
    scores = torch.round(torch.randn(16, 24, generator=g).abs() * 4) / 4  # many ties
    n_prune = prune_count(scores.numel(), s)
    keep = keep_top(scores, n_prune)
    assert torch.equal(keep, _stable_sort_keep(scores.reshape(1, -1), n_prune).view(16, 24))
    assert int((~keep).sum()) == n_prune == int(s * 384 + 1e-6)
    per_row = keep_top_per_row(scores, s)
    assert torch.equal(per_row, _stable_sort_keep(scores, int(s * 24 + 1e-6)))


def test_ties_prune_lower_index_first():
    scores = torch.ones(2, 4)
    assert keep_top(scores, 3).reshape(-1).tolist() == [False, False, False, True, True, True, True, True]
    assert keep_top_per_row(scores, 0.5).tolist() == [[False, False, True, True]] * 2
    assert keep_n_of_m(torch.ones(1, 8), 2, 4).tolist() == [[False, False, True, True] * 2]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_n_of_m_keeps_the_largest_per_group(n, m):
    scores = torch.randn(6, 4 * m).abs()
    keep = keep_n_of_m(scores, n, m)
    assert is_n_of_m(keep, n, m)
    assert int(keep.sum()) == 6 * 4 * n
    groups, kept = scores.reshape(6, 4, m), keep.reshape(6, 4, m)
    smallest_kept = groups.masked_fill(~kept, float("inf")).min(2).values
    assert bool((smallest_kept >= groups.masked_fill(kept, -1).max(2).values).all())


def test_block_pattern_prunes_whole_tiles_by_norm():
    scores = torch.randn(16, 32)
    keep = keep_mask(scores, Block(8, 8), 0.5)
    assert is_block(keep, 8, 8)
    assert sparsity(keep) == 0.5
    tiles = tile_scores(scores, 8, 8)
    kept_tiles = keep[::8, ::8]
    assert tiles[kept_tiles].min() >= tiles[~kept_tiles].max()
    assert torch.allclose(tiles[0, 0], scores[:8, :8].norm())


def test_keep_mask_dispatch():
    scores = torch.randn(8, 16, generator=torch.Generator().manual_seed(8)).abs()
    assert torch.equal(keep_mask(scores, Unstructured(), 0.25), keep_top(scores, 32))
    assert torch.equal(keep_mask(scores, NM(2, 4), 0.9), keep_n_of_m(scores, 2, 4))  # N:M ignores the sparsity
    per_row = keep_mask(scores, Unstructured(), 0.5, per_row=True)
    assert torch.equal(per_row, _stable_sort_keep(scores, 8))


def test_pattern_checks_reject_masks_that_break_them():
    keep = torch.tensor([[True, True, False, False, True, False, True, False]])
    assert is_n_of_m(keep, 2, 4) and not is_n_of_m(keep, 1, 4)
    keep[0, 2] = True  # three kept in the first group of four
    assert not is_n_of_m(keep, 2, 4) and is_n_of_m(keep, 3, 4)
    assert not is_n_of_m(torch.zeros(2, 6, dtype=torch.bool), 2, 4)  # 6 inputs cannot hold 2:4
    assert is_n_of_m(torch.zeros(3, 2, 8, dtype=torch.bool), 2, 4)  # leading dimensions are rows too
    tiles = torch.zeros(4, 8, dtype=torch.bool)
    tiles[:2, 4:] = True
    assert is_block(tiles, 2, 4) and not is_block(tiles, 4, 4)
    tiles[0, 0] = True
    assert not is_block(tiles, 2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_keep_writes_positive_zero_and_leaves_kept_bits(dtype):
    w = torch.tensor([[-1.5, -0.25, float("inf"), 2.0], [-0.0, 3.0, -7.0, float("-inf")]], dtype=dtype)
    before = w.clone()
    keep = torch.tensor([[True, False, False, True], [False, True, False, True]])
    apply_keep(w.t().t(), keep)  # through a view, as weights are handed over
    assert torch.equal(w[keep], before[keep])
    assert not w[~keep].signbit().any() and not w[~keep].isnan().any() and bool((w[~keep] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_count_zeros_counts_both_signed_zeros_across_chunks(monkeypatch, dtype):
    monkeypatch.setattr(masks, "ZERO_CHUNK", 100)  # several chunks and a short last one
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 29, generator=g).to(dtype)
    zero_at = [0, 99, 100, 101, 512, 1072]  # flat positions on both sides of chunk edges, and the last entry
    negative_at = [7, 300]
    flat = w.view(-1)
    flat[zero_at] = 0.0
    flat[negative_at] = -0.0
    flat[5] = float("nan")  # not a zero
    assert count_zeros(w) == len(zero_at) + len(negative_at)
    assert count_zeros(w.t()) == len(zero_at) + len(negative_at)  # a transposed (Conv1D-like) view
    assert count_zeros(torch.empty(0, 3)) == 0
