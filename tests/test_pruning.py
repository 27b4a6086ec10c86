"""Pruning on tiny models of every family, exact global magnitude, Wanda/SparseGPT yardsticks, OWL, settings."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from conftest import ENCODER_DECODER, tiny_model
from mask_checks import is_block
from torch import nn

from sparselm.errors import SparselmError
from sparselm.masks import NM, Block, Unstructured, is_n_of_m, keep_mask, parse_pattern, prune_count
from sparselm.pruning import PruneSettings, owl_allocation, prune, registered_methods, settings_from
from sparselm import calibration
from sparselm.calibration import collect_inputs
from sparselm.pruning import driver, magnitude, registry
from sparselm.pruning.driver import collect_shared_inputs
from sparselm.pruning.magnitude import _exact_cut, global_cut, prune_global
from sparselm.pruning.owl import outlier_ratio, owl_sparsities
from sparselm.pruning.sparsegpt import HessianAccumulator, sparsegpt_prune
from sparselm.pruning.wanda import ColumnNorms, wanda_scores
from sparselm.weights import select_matrices

WINDOWS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
CASES = [
    ("magnitude", "global", "unstructured", "uniform"),
    ("magnitude", "layer", "block:8x8", "uniform"),
    ("wanda", "layer", "unstructured", "owl"),
    ("wanda", "layer", "2:4", "uniform"),
    ("sparsegpt", "layer", "unstructured", "uniform"),
    ("sparsegpt", "layer", "4:8", "owl"),
]


def _forward(model: nn.Module, family: str) -> torch.Tensor:
    ids = WINDOWS[:1]
    extra = {"decoder_input_ids": ids} if family in ENCODER_DECODER else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


@pytest.mark.parametrize(("method", "scope", "pattern", "allocation"), CASES)
def test_every_family_method_and_pattern(family, method, scope, pattern, allocation):
    model = tiny_model(family)
    owl = {"owl_threshold": 2.0, "owl_lambda": 0.1} if allocation == "owl" else {}  # tiny random models have
    # no scores above 5x the mean: a threshold of 2 gives every block outliers, in different proportions
    report = prune(model, windows=WINDOWS, method=method, scope=scope, pattern=pattern, allocation=allocation,
                   sparsity=None if pattern in ("2:4", "4:8") else 0.5, **owl)
    parsed = parse_pattern(pattern)
    matrices = select_matrices(model)
    assert [r["name"] for r in report.matrices] == [m.name for m in matrices]
    if allocation == "owl":  # OWL moved the blocks apart, keeping the size-weighted mean at the target
        targets = report.block_sparsity
        assert set(targets) == {m.block_name for m in matrices} and len(set(targets.values())) > 1
        sizes = {b: sum(m.numel for m in matrices if m.block_name == b) for b in targets}
        assert sum(targets[b] * sizes[b] for b in targets) / sum(sizes.values()) == pytest.approx(0.5)
    else:
        assert report.block_sparsity is None
        targets = {m.block_name: 0.5 for m in matrices}
    for m, row in zip(matrices, report.matrices):
        keep = m.weight() != 0
        zeros = m.numel - int(keep.sum())
        assert (row["zeros"], row["sparsity"]) == (zeros, zeros / m.numel)
        if scope == "layer":  # each matrix holds exactly what its block's target asks of this method and pattern
            assert zeros == _expected_zeros(method, parsed, targets[m.block_name], *m.shape), m.name
        if isinstance(parsed, NM):  # OWL may move N per block (mixed N:M), never M
            nm = parse_pattern(row["pattern"])
            assert nm == NM(_owl_n(parsed, targets[m.block_name]), parsed.m) and is_n_of_m(keep, nm.n, nm.m)
        if isinstance(parsed, Block):
            assert is_block(keep, parsed.rows, parsed.cols)
    total = sum(m.numel for m in matrices)
    if scope == "global":
        assert report.zeros == int(0.5 * total)
    if allocation == "uniform" and not isinstance(parsed, Block):
        assert report.achieved_sparsity == 0.5
    assert torch.isfinite(_forward(model, family)).all()
    data = report.to_json()
    assert data["method"] == method and data["calibration"] == (
        None if method == "magnitude" else {"source": "given token windows", "samples": 4, "seqlen": 16})


def _owl_n(pattern: NM, sparsity: float) -> int:
    """OWL under N:M keeps M and sets N to round(M (1 - s)), at least 1."""
    return max(1, round(pattern.m * (1 - sparsity)))


def _expected_zeros(method: str, pattern, target: float, rows: int, cols: int) -> int:
    """Zeros one matrix must hold: each method's comparison group and count rule, computed from the shape alone."""
    if isinstance(pattern, NM):
        return rows * (cols // pattern.m) * (pattern.m - _owl_n(pattern, target))
    if isinstance(pattern, Block):
        tiles = (rows // pattern.rows) * (cols // pattern.cols)
        return int(target * tiles + 1e-6) * pattern.rows * pattern.cols
    if method == "wanda":  # per output row
        return rows * int(target * cols + 1e-6)
    if method == "sparsegpt":  # per block of 128 columns
        return sum(int(target * rows * (min(c + 128, cols) - c) + 1e-6) for c in range(0, cols, 128))
    return int(target * rows * cols + 1e-6)


def _manual_global_keep(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Plain reference: concatenate |w| of all matrices in order, stable sort, prune the first k."""
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: prune_count(flat.numel(), sparsity)]] = False
    return list(torch.split(keep, [w.numel() for w in weights]))


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.93])
def test_global_magnitude_is_exact_and_breaks_ties_in_order(quantised, sparsity):
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(24, 40, generator=g) * s for s in (0.5, 1.0, 2.0)]
    if quantised:  # many exact ties, as in weights dequantised from 4-bit
        weights = [torch.round(w * 4) / 4 for w in weights]
    expected = _manual_global_keep(weights, sparsity)
    nonzero_before = [w.reshape(-1) != 0 for w in weights]
    prune_global(weights, sparsity, Unstructured())
    for w, keep, before in zip(weights, expected, nonzero_before):
        assert torch.equal(w.reshape(-1) != 0, keep & before)
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros == max(prune_count(total, sparsity), total - sum(int(b.sum()) for b in nonzero_before))


def test_global_magnitude_matches_plain_reference_exactly():
    g = torch.Generator().manual_seed(2)
    weights = [torch.round(torch.randn(16, 32, generator=g) * 8) / 8 + 0.01 for _ in range(3)]
    expected = _manual_global_keep(weights, 0.6)
    prune_global(weights, 0.6, Unstructured())
    assert [torch.equal(w.reshape(-1) != 0, k) for w, k in zip(weights, expected)] == [True] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.97])
def test_global_magnitude_sampled_bracket_path_is_exact(monkeypatch, dtype, sparsity):
    """Stride > 1, sizes not a multiple of 8, ties spread over matrices, transposed (Conv1D-like) views."""
    monkeypatch.setattr(magnitude, "SAMPLE_SIZE", 4096)
    monkeypatch.setattr(magnitude, "_exact_cut", None)  # the narrow bracket must hold, not the fallback
    g = torch.Generator().manual_seed(4)
    base = [torch.round(torch.randn(r, c, generator=g) * 64) / 64 for r, c in ((301, 257), (512, 384), (13, 7))]
    weights = [base[0].to(dtype), base[1].t().contiguous().to(dtype).t(), base[2].to(dtype)]
    expected = _manual_global_keep([w.float() for w in weights], sparsity)
    prune_global(weights, sparsity, Unstructured())
    for w, keep in zip(weights, expected):
        assert torch.equal(w.reshape(-1) != 0, keep)
        assert not w.signbit()[w == 0].any()


@pytest.mark.parametrize("chunk", [1, 777, 4096])
def test_global_magnitude_is_exact_when_matrices_span_many_chunks(monkeypatch, chunk):
    """The bracket split compares and counts in chunks (odd sizes leave a lone last score), and must still pin the
    exact cut with ties broken in matrix, then flat-index order."""
    monkeypatch.setattr(magnitude, "SAMPLE_SIZE", 2048)
    monkeypatch.setattr(magnitude, "CHUNK", chunk)
    monkeypatch.setattr(magnitude, "_exact_cut", None)
    g = torch.Generator().manual_seed(6)
    weights = [torch.round(torch.randn(r, c, generator=g) * 32) / 32 for r, c in ((97, 61), (64, 129), (5, 3))]
    expected = _manual_global_keep(weights, 0.45)
    prune_global(weights, 0.45, Unstructured())
    assert [torch.equal(w.reshape(-1) != 0, k) for w, k in zip(weights, expected)] == [True] * 3


def test_global_cut_bracket_and_exact_fallback_agree():
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(100, 70, generator=g), torch.rand(33, 10, generator=g)]
    total = sum(s.numel() for s in scores)
    for n in (1, 500, 4000, total):
        fast = global_cut(lambda: iter(scores), total, n)
        exact = _exact_cut(lambda: iter(scores), n - 1, n)
        assert fast == exact


def test_global_block_magnitude_ranks_tiles_across_matrices():
    weights = [torch.full((8, 16), 0.1), torch.full((8, 16), 1.0)]
    weights[0][:, 8:] = 3.0
    prune_global(weights, 0.5, Block(8, 8))
    assert not bool(weights[0][:, :8].any()) and bool(weights[0][:, 8:].all())
    assert int((weights[1] == 0).sum()) == 64  # second tie-broken tile: the first tile of matrix 1


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_wanda_selects_the_reference_mask(pattern):
    """Yardstick: our Wanda mask equals a plain transcription of locuslab/wanda's prune_wanda on one layer."""
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(64, 24)
    x = torch.randn(3, 20, 64, generator=g) * torch.rand(64, generator=g) * 3
    acc = ColumnNorms(64)
    acc.add(x)
    ours = keep_mask(wanda_scores(layer.weight.data, acc.sum_sq), parse_pattern(pattern), 0.5, per_row=True)
    # transcription: W_metric = |W| * sqrt(scaler_row), scaler_row = ||X_j||² / nsamples; prune per row / per group
    metric = layer.weight.data.abs() * torch.sqrt((x.reshape(-1, 64).double() ** 2).sum(0) / 3).reshape(1, -1)
    prune_mask = torch.zeros_like(metric, dtype=torch.bool)
    if pattern == "unstructured":
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * 0.5)]
        prune_mask.scatter_(1, idx, True)
    else:
        n_keep, m = map(int, pattern.split(":"))
        for ii in range(metric.shape[1]):
            if ii % m == 0:
                tmp = metric[:, ii : ii + m].float()
                prune_mask.scatter_(1, ii + torch.topk(tmp, m - n_keep, dim=1, largest=False)[1], True)
    assert torch.equal(ours, ~prune_mask)


class _ReferenceHessian:
    """Transcription of the reference `SparseGPT.add_batch` (IST-DASLab/sparsegpt): H is kept as a running mean of
    2·x xᵀ over *sequences* (`nsamples` counts the batch's first dimension), in float32."""

    def __init__(self, columns: int) -> None:
        self.H = torch.zeros(columns, columns)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())


def _reference_fasterprune(w: torch.Tensor, h: torch.Tensor, sparsity: float, prunen: int, prunem: int,
                           blocksize: int, percdamp: float = 0.01) -> torch.Tensor:
    """Transcription of the reference `SparseGPT.fasterprune`, unadjusted: float32 Cholesky, its `<=` threshold,
    N:M groups counted from each block's start, mask True = prune. Returns the pruned out × in weight."""
    W = w.clone().float()
    H = h.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            col = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


DEAD_INPUTS = [5, 17, 40]  # input features that never fire: H has zero rows, both sides zero these columns


def _calibrated_layer(seed: int) -> tuple[torch.Tensor, HessianAccumulator, _ReferenceHessian]:
    """A 24 × 64 weight and both Hessians fed the same three batches of different sizes (6 sequences, 96 tokens)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=g)
    mix = torch.randn(64, 64, generator=g) * 0.3
    ours, ref = HessianAccumulator(64), _ReferenceHessian(64)
    for sequences in (2, 3, 1):
        x = torch.randn(sequences, 16, 64, generator=g) @ mix
        x[..., DEAD_INPUTS] = 0
        ours.add(x)
        ref.add_batch(x)
    return w, ours, ref


def test_hessian_accumulates_like_the_reference_up_to_its_scale():
    _w, ours, ref = _calibrated_layer(5)
    assert (ours.tokens, ref.nsamples) == (96, 6)
    # the reference averages over sequences; sparselm sums: a constant factor that cancels out of every step
    torch.testing.assert_close(ours.hessian / ref.nsamples, ref.H, rtol=1e-5, atol=1e-5)
    assert bool((torch.diag(ours.hessian)[DEAD_INPUTS] == 0).all())


@pytest.mark.parametrize(("pattern", "blocksize"), [("2:4", 10), ("4:8", 20), ("2:4", 16)])
def test_sparsegpt_n_of_m_gives_the_reference_weights(pattern, blocksize):
    """N:M: the reference's weights, with blocks rounded down to a multiple of M.

    The reference starts N:M groups at each block's start, so with a blocksize that is not a multiple of M its
    groups straddle the matrix's groups of M inputs and the result breaks the pattern; sparselm rounds the
    blocksize down to a multiple of M (10 → 8, 20 → 16), where the reference is correct, and matches it there.
    """
    w, ours_h, ref_h = _calibrated_layer(6)
    nm = parse_pattern(pattern)
    ours, keep = sparsegpt_prune(w, ours_h.hessian, nm.sparsity, nm, blocksize)
    aligned = blocksize // nm.m * nm.m
    ref = _reference_fasterprune(w, ref_h.H, 0, nm.m - nm.n, nm.m, aligned)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep, ref != 0) and is_n_of_m(keep, nm.n, nm.m)
    assert not bool(ours[:, DEAD_INPUTS].any())
    if blocksize != aligned:
        assert not is_n_of_m(_reference_fasterprune(w, ref_h.H, 0, nm.m - nm.n, nm.m, blocksize) != 0, nm.n, nm.m)


@pytest.mark.parametrize("blocksize", [16, 128])
def test_sparsegpt_unstructured_differs_from_the_reference_only_in_its_count(blocksize):
    """The one intended difference: the reference's threshold is the (⌊s·n⌋+1)-th smallest score of a block and it
    prunes every score `<=` it, so it removes ⌊s·n⌋ + 1 weights per block (more with ties); sparselm removes exactly
    ⌊s·n⌋. Asked for one weight more per block, sparselm gives the reference's weights."""
    w, ours_h, ref_h = _calibrated_layer(7)
    per_block = 24 * min(blocksize, 64)
    ref = _reference_fasterprune(w, ref_h.H, 0.5, 0, 0, blocksize)
    ours, keep = sparsegpt_prune(w, ours_h.hessian, 0.5, None, blocksize)
    for c in range(0, 64, blocksize):
        assert int((ref[:, c : c + blocksize] == 0).sum()) == per_block // 2 + 1
        assert int((~keep[:, c : c + blocksize]).sum()) == per_block // 2
    assert torch.equal(keep, ours != 0) and not bool(ours[:, DEAD_INPUTS].any())
    one_more, keep_more = sparsegpt_prune(w, ours_h.hessian, (per_block // 2 + 1) / per_block, None, blocksize)
    torch.testing.assert_close(one_more, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep_more, ref != 0)


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_driver_equals_pruning_block_by_block_with_full_forwards(family):
    """Each block's Wanda statistics come from the already-pruned model, exactly as full forwards would give."""
    ours = tiny_model(family)
    prune(ours, windows=WINDOWS, method="wanda", sparsity=0.5)
    ref = tiny_model(family)
    mats = select_matrices(ref)
    for block_key in dict.fromkeys((m.block_path, m.block) for m in mats):
        in_block = [m for m in mats if (m.block_path, m.block) == block_key]
        accs = {m.name: ColumnNorms(m.shape[1]) for m in in_block}
        hooks = [m.module.register_forward_hook(lambda mod, i, o, a=accs[m.name]: a.add(i[0])) for m in in_block]
        for row in WINDOWS:
            _forward_one(ref, family, row)
        for h in hooks:
            h.remove()
        for m in in_block:
            keep = keep_mask(wanda_scores(m.weight(), accs[m.name].sum_sq), Unstructured(), 0.5, per_row=True)
            m.weight().masked_fill_(~keep, 0)
    for a, b in zip(select_matrices(ours), select_matrices(ref)):
        assert torch.equal(a.weight() != 0, b.weight() != 0), a.name


def _forward_one(model: nn.Module, family: str, row: torch.Tensor) -> None:
    extra = {"decoder_input_ids": row[None]} if family in ENCODER_DECODER else {}
    with torch.no_grad():
        model(input_ids=row[None], use_cache=False, **extra)


def test_owl_allocation_math():
    assert outlier_ratio([torch.ones(5), torch.tensor([1.0] * 4 + [100.0])], 5.0) == 0.1
    assert outlier_ratio([torch.zeros(4)], 5.0) == 0.0
    spars = owl_sparsities([0.01, 0.02, 0.05, 0.03], [10, 10, 10, 10], 0.6, 0.08)
    assert sum(spars) / 4 == pytest.approx(0.6)
    assert spars[2] == min(spars) and spars[0] == max(spars)
    assert max(spars) - min(spars) == pytest.approx(0.16)
    weighted = owl_sparsities([0.0, 1.0], [30, 10], 0.5, 0.08)
    assert (30 * weighted[0] + 10 * weighted[1]) / 40 == pytest.approx(0.5)
    assert owl_sparsities([0.1, 0.1], [1, 1], 0.7, 0.08) == pytest.approx([0.7, 0.7])


def _owl_from_full_forwards(model: nn.Module, threshold: float, target: float, lam: float) -> tuple[dict, dict]:
    """Independent OWL: Wanda statistics of the dense model from ordinary forwards, one window at a time."""
    mats = select_matrices(model)
    norms = {m.name: ColumnNorms(m.shape[1]) for m in mats}
    hooks = [m.module.register_forward_hook(lambda _mod, i, _o, a=norms[m.name]: a.add(i[0])) for m in mats]
    for row in WINDOWS:
        _forward_one(model, "llama", row)
    for h in hooks:
        h.remove()
    blocks = list(dict.fromkeys(m.block_name for m in mats))
    ratios = {b: outlier_ratio([wanda_scores(m.weight(), norms[m.name].sum_sq) for m in mats if m.block_name == b],
                               threshold) for b in blocks}
    sizes = [sum(m.numel for m in mats if m.block_name == b) for b in blocks]
    return dict(zip(blocks, owl_sparsities([ratios[b] for b in blocks], sizes, target, lam))), ratios


def test_owl_with_magnitude_and_mixed_n_of_m():
    model = tiny_model("llama")
    expected, ratios = _owl_from_full_forwards(tiny_model("llama"), 2.0, 0.5, 0.3)
    report = prune(model, windows=WINDOWS, method="magnitude", allocation="owl", sparsity=0.5, owl_lambda=0.3,
                   owl_threshold=2.0)
    assert report.block_sparsity == pytest.approx(expected) and report.outlier_ratio == pytest.approx(ratios)
    assert abs(expected["model.layers.0"] - expected["model.layers.1"]) == pytest.approx(0.6)  # 2λ apart
    for m, row in zip(select_matrices(model), report.matrices, strict=True):
        assert row["zeros"] == int((m.weight() == 0).sum()) == int(expected[m.block_name] * m.numel + 1e-6)
    nm_model = tiny_model("llama")
    nm = prune(nm_model, windows=WINDOWS, method="wanda", pattern="4:8", allocation="owl", owl_lambda=0.3,
               owl_threshold=2.0)
    patterns = {b: f"{_owl_n(NM(4, 8), s)}:8" for b, s in expected.items()}
    assert len(set(patterns.values())) == 2  # 0.2 and 0.8 → 6:8 and 2:8
    for m, row in zip(select_matrices(nm_model), nm.matrices, strict=True):
        assert row["pattern"] == patterns[m.block_name]
        assert is_n_of_m(m.weight() != 0, _owl_n(NM(4, 8), expected[m.block_name]), 8)


def test_a_shared_owl_allocation_gives_the_same_model_as_computing_it():
    fields = {"method": "wanda", "allocation": "owl", "sparsity": 0.5, "owl_lambda": 0.3}
    own, shared = tiny_model("llama"), tiny_model("llama")
    allocation = owl_allocation(tiny_model("llama"), settings_from(**fields), WINDOWS)
    a = prune(own, windows=WINDOWS, **fields)
    b = prune(shared, windows=WINDOWS, owl=allocation, **fields)
    assert b.block_sparsity == a.block_sparsity == allocation.block_sparsity
    for p, q in zip(own.parameters(), shared.parameters(), strict=True):
        assert torch.equal(p, q)


def llama_with_outliers_in_block_0() -> nn.Module:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :3] *= 40
    return model


def test_owl_that_rounds_back_to_the_uniform_n_of_m_prunes_the_uniform_model():
    fields = {"method": "wanda", "pattern": "2:4"}
    allocation = owl_allocation(llama_with_outliers_in_block_0(), settings_from(**fields, allocation="owl"), WINDOWS)
    assert len(set(allocation.block_sparsity.values())) > 1  # OWL did move the blocks apart
    assert set(allocation.block_patterns(NM(2, 4)).values()) == {"2:4"}  # but N = round(4 (1 - s)) stays 2
    uniform, with_owl = llama_with_outliers_in_block_0(), llama_with_outliers_in_block_0()
    prune(uniform, windows=WINDOWS, **fields)
    prune(with_owl, windows=WINDOWS, owl=allocation, allocation="owl", **fields)
    for p, q in zip(uniform.parameters(), with_owl.parameters(), strict=True):
        assert torch.equal(p, q)
    wide_fields = {"method": "wanda", "pattern": "4:8", "allocation": "owl", "owl_lambda": 0.3}
    wide = owl_allocation(llama_with_outliers_in_block_0(), settings_from(**wide_fields), WINDOWS)
    assert len(set(wide.block_patterns(NM(4, 8)).values())) > 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsity": 1.0}, "outside \\[0, 1\\)"),
        ({"sparsity": -0.1}, "outside \\[0, 1\\)"),
        ({"method": "obs"}, "unknown method 'obs'"),
        ({"pattern": "zigzag"}, "unknown sparsity pattern"),
        ({"method": "wanda", "scope": "global"}, "use --scope layer"),
        ({"method": "sparsegpt", "pattern": "block:8x8"}, "block patterns work with magnitude, wanda and admm"),
        ({"pattern": "2:4", "sparsity": 0.7}, "fixes the sparsity at 0.5"),
        ({"calib": "c4"}, "unknown text source"),
        ({"calib_samples": 0}, "at least 1"),
        ({"sparsitty": 0.5}, "invalid sparsitty"),
    ],
)
def test_bad_settings_are_one_clear_error(fields, message):
    with pytest.raises(SparselmError, match=message):
        settings_from(**fields)


def test_pattern_that_does_not_divide_inputs():
    with pytest.raises(SparselmError, match="not divisible by 5"):
        prune(tiny_model("opt"), PruneSettings(pattern="2:5"))


def test_nothing_prunable():
    with pytest.raises(SparselmError, match="no Linear/Conv1D weight matrices in transformer blocks"):
        prune(nn.Sequential(nn.Linear(4, 4)), PruneSettings())


def test_calibrated_method_without_tokenizer_or_windows():
    with pytest.raises(SparselmError, match="needs calibration text but the model has no tokenizer"):
        prune(tiny_model("gpt2"), PruneSettings(method="wanda"))


def test_embeddings_are_pruned_by_magnitude_when_asked():
    model = tiny_model("gpt2")
    dense = model.transformer.wte.weight.detach().clone()
    report = prune(model, windows=WINDOWS, method="wanda", include_embeddings=True, sparsity=0.5)
    wte = next(r for r in report.matrices if r["name"] == "transformer.wte.weight")
    assert wte["zeros"] == dense.numel() // 2
    expected = keep_mask(dense.abs(), Unstructured(), 0.5)  # by magnitude over the whole matrix
    assert torch.equal(model.transformer.wte.weight != 0, expected)


def test_registry_names_the_methods_and_settings_read_it():
    assert registered_methods() == ("magnitude", "wanda", "sparsegpt", "admm")
    assert [PruneSettings(method=m).needs_calibration for m in registered_methods()] == [False, True, True, True]
    assert PruneSettings(method="magnitude", allocation="owl").needs_calibration
    assert settings_from(method=" WANDA ").method == "wanda"
    with pytest.raises(SparselmError, match="unknown method 'obs'; use one of: magnitude, wanda, sparsegpt, admm"):
        settings_from(method="obs")


def test_a_new_method_is_one_registered_class(monkeypatch):
    """A method registered from outside the package is accepted by the settings and driven block by block."""
    monkeypatch.setattr(registry, "_PRUNERS", dict(registry._PRUNERS))
    calls: list[tuple[str, int, str, float]] = []

    class TokenCount:
        def __init__(self, in_features: int) -> None:
            self.tokens = 0

        def add(self, inputs: torch.Tensor) -> None:
            self.tokens += inputs.reshape(-1, inputs.shape[-1]).shape[0]

    @registry.register
    class FirstColumns(registry.Pruner):
        """Prunes the leftmost inputs of every row (a toy rule), recording what the driver hands it."""

        name = "first-columns"
        block_patterns = False

        def collector(self, in_features: int) -> TokenCount:
            return TokenCount(in_features)

        def prune_matrix(self, matrix, stats, pattern, sparsity, settings) -> None:
            calls.append((matrix.name, stats.tokens, str(pattern), sparsity))
            matrix.weight()[:, : int(sparsity * matrix.shape[1])] = 0

    assert registered_methods()[-1] == "first-columns"
    with pytest.raises(SparselmError, match="block patterns work with magnitude, wanda and admm;"):
        settings_from(method="first-columns", pattern="block:8x8")
    model = tiny_model("llama")
    report = prune(model, windows=WINDOWS, method="first-columns", sparsity=0.25)
    assert [c[0] for c in calls] == [m.name for m in select_matrices(model)]  # block order, each matrix once
    assert {c[1:] for c in calls} == {(WINDOWS.numel(), "unstructured", 0.25)}
    for m in select_matrices(model):
        assert not m.weight()[:, : m.shape[1] // 4].any() and bool(m.weight()[:, m.shape[1] // 4 :].all())
    assert report.achieved_sparsity == 0.25 and report.to_json()["method"] == "first-columns"


def _block_matrices(model: nn.Module, block: int = 0) -> dict[str, object]:
    return {m.name.split(".")[-2]: m for m in select_matrices(model) if m.block == block}


def _full_forward(model: nn.Module) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            for batch in WINDOWS.split(2):  # two batches: sharing decided on the first is checked on the second
                model(input_ids=batch, use_cache=False)

    return run


@pytest.mark.parametrize("collector", [HessianAccumulator, ColumnNorms])
def test_matrices_reading_one_input_share_one_statistic(collector):
    """q/k/v and gate/up read the same tensor: one collector each, equal to what each would collect alone."""
    model = tiny_model("llama")
    named = _block_matrices(model)
    mats = list(named.values())
    shared = collect_shared_inputs(mats, collector, _full_forward(model))
    alone = collect_inputs(mats, collector, _full_forward(model))
    by_name = {short: shared[m.name] for short, m in named.items()}
    assert by_name["q_proj"] is by_name["k_proj"] is by_name["v_proj"]
    assert by_name["gate_proj"] is by_name["up_proj"]
    assert len({id(c) for c in by_name.values()}) == 4  # qkv, o, gate/up, down
    for m in mats:
        mine, own = shared[m.name], alone[m.name]
        assert mine.tokens == own.tokens == WINDOWS.numel()
        if collector is HessianAccumulator:
            torch.testing.assert_close(mine.hessian, own.hessian, rtol=0, atol=0)
        else:
            torch.testing.assert_close(mine.sum_sq, own.sum_sq, rtol=0, atol=0)


def test_qkv_pruned_with_a_shared_factor_equal_pruning_each_alone():
    """SparseGPT through the driver (one Hessian and one inverse factor for q/k/v, one for gate/up) gives the weights
    of pruning every matrix with its own Hessian and factor, block after block."""
    original = HessianAccumulator.inverse_factor

    def pruned(share: bool) -> tuple[nn.Module, list[HessianAccumulator]]:
        model, used = tiny_model("llama"), []

        def counted(self: HessianAccumulator, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
            used.append(self)  # kept alive, so ids stay distinct
            return original(self, percdamp)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(HessianAccumulator, "inverse_factor", counted)
            if not share:
                mp.setattr(driver, "collect_shared_inputs", collect_inputs)  # one accumulator per matrix
            prune(model, windows=WINDOWS, method="sparsegpt", sparsity=0.5)
        return model, used

    shared_model, shared_used = pruned(share=True)
    alone_model, alone_used = pruned(share=False)
    blocks = len({m.block for m in select_matrices(alone_model)})
    assert len(alone_used) == len(shared_used) == 7 * blocks
    assert len({id(a) for a in alone_used}) == 7 * blocks
    assert len({id(a) for a in shared_used}) == 4 * blocks  # q/k/v, o, gate/up, down
    for a, b in zip(select_matrices(shared_model), select_matrices(alone_model)):
        torch.testing.assert_close(a.weight(), b.weight(), rtol=1e-5, atol=1e-5, msg=a.name)
        assert torch.equal(a.weight() != 0, b.weight() != 0), a.name


class _TwoReaders(nn.Module):
    """Two matrices reading the same tensor on the first call and different (equal-valued) tensors afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a(x) + self.b(x if self.calls == 1 else x * 2)


def test_sharing_broken_on_a_later_batch_falls_back_to_one_statistic_per_matrix():
    block = _TwoReaders()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 8, generator=g) for _ in range(3)]
    mats = [SimpleNamespace(name=n, module=getattr(block, n), shape=(4, 8)) for n in ("a", "b")]

    def run() -> None:
        block.calls = 0
        for x in batches:
            block(x)

    stats = collect_shared_inputs(mats, HessianAccumulator, run)
    assert stats["a"] is not stats["b"]
    expected_b = sum(2 * (x * (1 if i == 0 else 2)).t() @ (x * (1 if i == 0 else 2)) for i, x in enumerate(batches))
    torch.testing.assert_close(stats["b"].hessian, expected_b)
    torch.testing.assert_close(stats["a"].hessian, sum(2 * x.t() @ x for x in batches))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_statistics_passes_cut_short_prune_exactly_as_whole_ones(method, monkeypatch):
    """Each block's statistics pass ends its later calls at the last matrix's input (`calibration.EarlyStop`): the
    pruned weights are bit for bit those of whole block calls."""
    monkeypatch.setattr(calibration, "BATCH_TOKENS", WINDOWS.shape[1])  # one window per call
    stopped = []
    original = calibration.EarlyStop.called

    def counted(self, name: str) -> None:
        try:
            original(self, name)
        except calibration.StopForward:
            stopped.append(name)
            raise

    def whole(self, name: str) -> None:
        self.seen[name] = self.seen.get(name, 0) + 1

    def pruned(called) -> nn.Module:
        model = tiny_model("llama")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(calibration.EarlyStop, "called", called)
            prune(model, windows=WINDOWS, method=method, sparsity=0.5)
        return model

    short, full = pruned(counted), pruned(whole)
    blocks = len({m.block for m in select_matrices(full)})
    assert blocks == 2 and stopped == [f"model.layers.{b}.mlp.down_proj.weight" for b in (0, 1)
                                       for _call in range(WINDOWS.shape[0] - 1)]  # every call after the first
    for a, b in zip(select_matrices(short), select_matrices(full)):
        assert torch.equal(a.weight(), b.weight()), a.name
