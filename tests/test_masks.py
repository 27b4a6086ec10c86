"""Keep-masks and patterns: parsing, exact counts, deterministic ties, N:M and block validity."""

from __future__ import annotations

import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.masks import (
    apply_keep,
    NM,
    Block,
    Unstructured,
    check_shape,
    is_block,
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


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_keep_top_exact_count(s):
    scores = torch.randn(16, 24).abs()
    keep = keep_top(scores, prune_count(scores.numel(), s))
    assert int((~keep).sum()) == prune_count(scores.numel(), s)
    assert scores[keep].min() >= scores[~keep].max() if s > 0 else bool(keep.all())


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
    scores = torch.randn(8, 16).abs()
    assert sparsity(keep_mask(scores, Unstructured(), 0.25)) == 0.25
    assert is_n_of_m(keep_mask(scores, NM(2, 4), 0.9), 2, 4)
    per_row = keep_mask(scores, Unstructured(), 0.5, per_row=True)
    assert per_row.sum(dim=1).tolist() == [8] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_keep_writes_positive_zero_and_leaves_kept_bits(dtype):
    w = torch.tensor([[-1.5, -0.25, float("inf"), 2.0], [-0.0, 3.0, -7.0, float("-inf")]], dtype=dtype)
    before = w.clone()
    keep = torch.tensor([[True, False, False, True], [False, True, False, True]])
    apply_keep(w.t().t(), keep)  # through a view, as weights are handed over
    assert torch.equal(w[keep], before[keep])
    assert not w[~keep].signbit().any() and not w[~keep].isnan().any() and bool((w[~keep] == 0).all())
