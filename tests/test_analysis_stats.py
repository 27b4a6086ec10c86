"""Streamed statistics agree exactly with numpy over the concatenated tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparselm.analysis.stats import POW2_EXPONENTS, QUANTILES, Histogram, order_statistics, summarize


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(257, 131, generator=g) * 0.02
    a[a.abs() < 0.004] = 0.0
    b = torch.randn(3000, generator=g) * 0.7
    c = torch.tensor([2.0**-k for k in range(21)] + [-(2.0**-k) for k in range(21)] + [0.0, -0.0, 1e-42])
    d = (torch.randint(-8, 8, (64, 64), generator=g) * 0.015625).float()  # a quantiser-like grid with many ties
    return [a, b, c, d]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stats_match_numpy_exactly(seed):
    tensors = _tensors(seed)
    stats, hist = summarize(lambda: tensors)
    w = np.concatenate([t.numpy().ravel() for t in tensors]).astype(np.float64)
    a = np.abs(w)
    assert stats["count"] == w.size
    assert stats["zeros"] == int((w == 0).sum())
    assert stats["zero_fraction"] == (w == 0).mean()
    for q in QUANTILES:
        assert stats["abs_quantiles"][f"{q:g}"] == np.quantile(a, q), q
    for k in POW2_EXPONENTS:
        assert stats["fraction_abs_le_2pow_minus_k"][str(k)] == np.mean(a <= 2.0**-k), k
    assert stats["max_abs"] == a.max()
    assert stats["mean"] == pytest.approx(w.mean(), rel=1e-9, abs=1e-15)
    assert stats["std"] == pytest.approx(w.std(), rel=1e-9)
    assert stats["mean_abs"] == pytest.approx(a.mean(), rel=1e-9)


def test_order_statistics_are_exact_for_every_rank():
    tensors = _tensors(3)[:1] + [torch.tensor([5.0, -5.0, 0.5])]
    hist = Histogram()
    for t in tensors:
        hist.add_tensor(t)
    a = np.sort(np.abs(np.concatenate([t.numpy().ravel() for t in tensors])))
    ranks = list(range(0, a.size, 97)) + [a.size - 1]
    got = order_statistics(lambda: tensors, hist, ranks)
    assert all(got[r] == a[r] for r in ranks)


def test_histogram_counts_signs_and_merges():
    h1, h2 = Histogram(), Histogram()
    h1.add_tensor(torch.tensor([1.0, -1.0, -2.0, 0.0]))
    h2.add_tensor(torch.tensor([3.0]))
    h1.merge(h2)
    assert int(h1.positive.sum()) == 3 and int(h1.negative.sum()) == 2
    edges, cdf = h1.cdf()
    assert cdf[-1] == 1.0 and np.all(np.diff(cdf) > 0) and edges[0] == 0.0


def test_chunked_histogram_equals_single_pass(monkeypatch):
    import sparselm.analysis.stats as stats_mod

    t = torch.randn(5000)
    whole = Histogram()
    whole.add_tensor(t)
    monkeypatch.setattr(stats_mod, "CHUNK", 333)
    chunked = Histogram()
    chunked.add_tensor(t)
    assert torch.equal(whole.signed, chunked.signed)


def test_linear_histogram_preserves_counts():
    from sparselm.analysis.figures import linear_histogram

    t = torch.cat([torch.randn(10000) * 0.1, torch.zeros(7)])
    hist = Histogram()
    hist.add_tensor(t)
    edges, counts = linear_histogram(hist, limit=float(t.abs().max()) * 1.01, bins=51)
    assert counts.sum() == pytest.approx(t.numel())
    numpy_counts, _ = np.histogram(t.numpy(), bins=edges)
    # redistributed from 128-per-octave bins: close to the exact histogram, never off by more than a few %
    assert np.abs(counts - numpy_counts).sum() / t.numel() < 0.03
