"""Pruning on tiny models of every family, exact global magnitude, Wanda/SparseGPT yardsticks, OWL, settings."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_DECODER, tiny_model
from torch import nn

from sparselm.errors import SparselmError
from sparselm.masks import NM, Block, Unstructured, is_block, is_n_of_m, keep_mask, parse_pattern, prune_count
from sparselm.pruning import PruneSettings, owl_allocation, prune, settings_from
from sparselm.pruning import magnitude
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


def _reference_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, prunen: int, prunem: int,
                         blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Transcription of IST-DASLab/sparsegpt `SparseGPT.fasterprune` (mask True = prune), exact count per block."""
    W = w.clone().float()
    H = h.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(W.shape[1])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H.double())
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True).float()
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            mask1.reshape(-1)[torch.sort(tmp.reshape(-1), stable=True)[1][: int(tmp.numel() * sparsity)]] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w_col = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize(
    ("pattern", "blocksize"), [("unstructured", 128), ("unstructured", 16), ("2:4", 16), ("4:8", 32)]
)
def test_sparsegpt_gives_the_reference_weights(pattern, blocksize):
    """Yardstick: same weights as the transcription of the reference algorithm, up to float rounding."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(4, 32, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3
    acc = HessianAccumulator(64)
    acc.add(x)
    nm = None if pattern == "unstructured" else parse_pattern(pattern)
    ours, keep = sparsegpt_prune(w, acc.hessian, 0.5, nm, blocksize)
    prunen, prunem = (0, 0) if nm is None else (nm.m - nm.n, nm.m)
    # the reference scales H by 2/nsamples: a constant factor that cancels out of every step
    ref = _reference_sparsegpt(w, acc.hessian / acc.tokens, 0.5, prunen, prunem, blocksize)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep, ours != 0)
    assert float((ours == 0).float().mean()) == 0.5
    if nm is not None:
        assert is_n_of_m(keep, nm.n, nm.m)


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


def test_owl_with_magnitude_and_mixed_n_of_m():
    model = tiny_model("llama")
    report = prune(model, windows=WINDOWS, method="magnitude", allocation="owl", sparsity=0.5, owl_lambda=0.3)
    assert set(report.block_sparsity) == {"model.layers.0", "model.layers.1"}
    assert report.outlier_ratio is not None
    nm = prune(tiny_model("llama"), windows=WINDOWS, method="wanda", pattern="4:8", allocation="owl", owl_lambda=0.3)
    assert {row["pattern"] for row in nm.matrices} <= {"3:8", "4:8", "5:8"}


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
        ({"method": "sparsegpt", "pattern": "block:8x8"}, "block patterns work with magnitude and wanda"),
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
    report = prune(model, windows=WINDOWS, method="wanda", include_embeddings=True, sparsity=0.5)
    wte = next(r for r in report.matrices if r["name"] == "transformer.wte.weight")
    assert wte["sparsity"] == pytest.approx(0.5)
