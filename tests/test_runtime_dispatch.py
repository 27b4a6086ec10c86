"""The measured dispatch: a sparsity bound no timer overrides, clear wins only, a cache that is re-checked.

Most tests replace the dispatch's samplers with a fake timer (fixed seconds per kernel), so what the dispatch is
told is exact and the tests do not depend on this machine's speed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest
import torch

from conftest import tiny_model
from sparselm.runtime import accelerate, dispatch
from sparselm.runtime.accelerate import AccelerateReport, structure_of
from sparselm.runtime.kernels import KERNELS, block_sizes_of, build_csr
from sparselm.runtime.timing import Timing
from sparselm.weights import select_matrices
from test_storage import prune_smallest


class FakeTimer:
    """Stands in for dispatch.kernel_samplers: every sample of a kernel takes seconds[kernel][round % len]."""

    def __init__(self, seconds: dict[str, list[float]]) -> None:
        self.seconds = seconds
        self.samples = 0

    def __call__(self, weight, built, tokens, dense=None) -> dict[str, Callable[[], float]]:
        rounds: dict[str, int] = {}

        def sample(kernel: str) -> Callable[[], float]:
            def take() -> float:
                self.samples += 1
                index = rounds[kernel] = rounds.get(kernel, -1) + 1
                values = self.seconds.get(kernel, self.seconds["sparse"])
                return values[index % len(values)]

            return take

        return {k: sample(k) for k in ("dense", *built)}


SPARSE_TEN_TIMES_FASTER = {"dense": [1e-3], "sparse": [1e-4]}
DENSE_FASTER = {"dense": [1e-4], "sparse": [1e-3]}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path))
    return tmp_path


def fake(monkeypatch, seconds: dict[str, list[float]]) -> FakeTimer:
    timer = FakeTimer(seconds)
    monkeypatch.setattr(dispatch, "kernel_samplers", timer)
    return timer


def model_at(sparsity: float) -> torch.nn.Module:
    return prune_smallest(tiny_model("opt"), sparsity)


def sparse_choices(report: AccelerateReport) -> list[str]:
    return [k for layer in report.layers for k in layer.choices.values() if k != "dense"]


def test_bound_follows_from_the_bytes_a_sparse_product_reads():
    assert dispatch.min_winning_sparsity("csr", 4) == pytest.approx(0.5)  # (1-s)(4+4) < 4
    assert dispatch.min_winning_sparsity("csr", 2) == pytest.approx(4 / 6)  # (1-s)(2+4) < 2
    assert dispatch.min_winning_sparsity("bsr16", 4) == pytest.approx((8 / 256) / (4 + 8 / 256))
    # conservative: below the crossover measured for CSR (about 0.7 for fp32, the notes), never above it
    assert dispatch.min_winning_sparsity("csr", 4) < 0.7
    # the index sizes the bound is made of are those of the sparse tensors the kernels build
    w = prune_smallest(tiny_model("opt"), 0.9)
    weight = select_matrices(w)[0].weight().detach()
    assert KERNELS["csr"].index_bytes == build_csr(weight).col_indices().element_size()
    bsr = KERNELS["bsr16"].build(torch.ones(32, 32))
    assert KERNELS["bsr16"].index_bytes == bsr.col_indices().element_size() / 16**2
    for kernel in KERNELS:
        indexed = dispatch.min_winning_sparsity(kernel, 1) > 0
        assert dispatch.can_win(kernel, 0.0, 2) == dispatch.can_win(kernel, 0.0, 4) == (not indexed)
    assert [k for k in KERNELS if dispatch.min_winning_sparsity(k, 1) == 0] == ["dense-int8", "dense-w8a8"]
    assert dispatch.can_win("csr", 0.51, 4) and not dispatch.can_win("csr", 0.5, 4)
    # a bitmap pays one bit per weight, stored or not: (1-s)·2 + 1/8 < 2 for bf16, (1-s)·4 + 1/8 < 4 for fp32
    assert dispatch.min_winning_sparsity("bitmap", 2) == pytest.approx(1 / 16)
    assert dispatch.min_winning_sparsity("bitmap", 4) == pytest.approx(1 / 32)


@pytest.fixture
def torch_kernels_only(monkeypatch):
    """Candidates as without sparselm's C++ kernels (torch's CSR/BSR only)."""
    monkeypatch.setattr(sys.modules["sparselm.runtime.accelerate"], "kernel_fits", lambda weight, kernel: False)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.45])
def test_a_timer_claiming_sparse_wins_never_puts_a_lightly_sparse_layer_on_sparse(
    sparsity, cache_dir, monkeypatch, torch_kernels_only
):
    timer = fake(monkeypatch, SPARSE_TEN_TIMES_FASTER)
    report = accelerate(model_at(sparsity), policy="auto", tokens=(1, 64))
    assert report.replaced == 0 and sparse_choices(report) == []
    assert timer.samples == 0  # below the bound nothing is measured
    # the same timer at 0.95 sparsity does put every layer on CSR: the fake is what decided above too
    report = accelerate(model_at(0.95), policy="auto", tokens=(1, 64))
    assert report.replaced == report.layers_total and set(sparse_choices(report)) == {"csr"}


def test_an_apparent_win_the_rounds_disagree_on_stays_dense_and_is_not_cached(
    cache_dir, monkeypatch, torch_kernels_only
):
    # sparse is 2x faster in six rounds of seven, 2x slower in the seventh: the spread reaches 1.0x
    timer = fake(monkeypatch, {"dense": [1e-3], "sparse": [5e-4] * 6 + [2e-3]})
    model = model_at(0.95)
    report = accelerate(model, policy="auto", tokens=(64,))
    assert report.replaced == 0
    keys = set(layer_keys(model_at(0.95), 64))
    assert len(keys) < len(select_matrices(model_at(0.95)))  # some layers share a key, and so a measurement
    assert timer.samples == len(keys) * 2 * dispatch.MAX_ROUNDS  # measured again in more rounds before giving up
    assert json.loads((cache_dir / dispatch.CACHE_FILE).read_text()) == {}
    speedup = report.layers[0].speedups[64]["csr"]
    assert speedup["speedup"] == pytest.approx(2.0) and speedup["speedup_low"] == pytest.approx(0.5)
    assert speedup["within_noise"]


def test_a_clear_loss_is_cached_as_dense(cache_dir, monkeypatch):
    fake(monkeypatch, DENSE_FASTER)
    report = accelerate(model_at(0.95), policy="auto", tokens=(64,))
    assert report.replaced == 0
    cache = json.loads((cache_dir / dispatch.CACHE_FILE).read_text())
    assert len(cache) > 0 and {entry["choice"] for entry in cache.values()} == {"dense"}
    timer = fake(monkeypatch, SPARSE_TEN_TIMES_FASTER)
    again = accelerate(model_at(0.95), policy="auto", tokens=(64,))
    assert timer.samples == 0 and all(layer.cached for layer in again.layers)


def layer_keys(model: torch.nn.Module, tokens: int) -> list[str]:
    """The dispatch cache's key of each prunable matrix of `model` (computed as accelerate does)."""
    threads = torch.get_num_threads()
    keys = []
    for m in select_matrices(model):
        w = m.weight().detach()
        keep = w != 0
        sparsity = 1.0 - float(keep.sum()) / keep.numel()
        keys.append(dispatch.cache_key(w, sparsity, structure_of(keep, block_sizes_of(keep)), tokens, threads))
    return keys


def test_cached_decisions_contradicting_the_rules_are_not_trusted(cache_dir, monkeypatch, torch_kernels_only):
    clear_csr = {"choice": "csr", "seconds": {"dense": 1e-3, "csr": 1e-4}, "ratios": {"csr": [10.0] * 7}}
    noisy_csr = {"choice": "csr", "seconds": {"dense": 1e-3, "csr": 5e-4}, "ratios": {"csr": [2.0] * 6 + [0.5]}}
    light, heavy = model_at(0.2), model_at(0.95)
    cache = {key: clear_csr for key in layer_keys(light, 64)}  # contradicts the bound
    cache.update({key: noisy_csr for key in layer_keys(heavy, 64)})  # contradicts the noise rule
    (cache_dir / dispatch.CACHE_FILE).write_text(json.dumps(cache))
    timer = fake(monkeypatch, DENSE_FASTER)
    assert accelerate(light, policy="auto", tokens=(64,)).replaced == 0
    assert timer.samples == 0
    report = accelerate(heavy, policy="auto", tokens=(64,))
    assert report.replaced == 0 and timer.samples > 0  # measured again, and dense measured faster
    saved = json.loads((cache_dir / dispatch.CACHE_FILE).read_text())
    assert not set(layer_keys(light, 64)) & set(saved)  # the contradicting entries are gone
    assert {saved[k]["choice"] for k in layer_keys(heavy, 64)} == {"dense"}
    # a cached clear win within the bound is used without measuring
    (cache_dir / dispatch.CACHE_FILE).write_text(json.dumps({k: clear_csr for k in layer_keys(heavy, 64)}))
    timer = fake(monkeypatch, DENSE_FASTER)
    report = accelerate(model_at(0.95), policy="auto", tokens=(64,))
    assert timer.samples == 0 and set(sparse_choices(report)) == {"csr"}


def test_remeasure_ignores_the_cache_and_replaces_it(cache_dir, monkeypatch, torch_kernels_only):
    fake(monkeypatch, SPARSE_TEN_TIMES_FASTER)
    assert set(sparse_choices(accelerate(model_at(0.95), tokens=(1, 64)))) == {"csr"}
    timer = fake(monkeypatch, DENSE_FASTER)
    assert set(sparse_choices(accelerate(model_at(0.95), tokens=(1, 64)))) == {"csr"}  # from the cache
    assert timer.samples == 0
    report = accelerate(model_at(0.95), tokens=(1, 64), remeasure=True)
    assert report.replaced == 0
    keys = {k for t in (1, 64) for k in layer_keys(model_at(0.95), t)}
    assert timer.samples == len(keys) * 2 * dispatch.ROUNDS  # each key measured once, then shared in the call
    assert not report.layers[0].cached
    saved = json.loads((cache_dir / dispatch.CACHE_FILE).read_text())
    assert {entry["choice"] for entry in saved.values()} == {"dense"}


def test_decision_needs_a_clear_win():
    def timed(**seconds: list[float]) -> dict[str, Timing]:
        return {k: Timing(tuple(v)) for k, v in seconds.items()}

    assert dispatch.decide(timed(dense=[1.0] * 7, csr=[0.95] * 7)).choice == "dense"  # within the margin
    best = dispatch.decide(timed(dense=[1.0] * 7, csr=[0.5] * 7, bsr16=[0.4] * 7))
    assert best.choice == "bsr16" and best.confident
    assert dispatch.decide(timed(dense=[1.0] * 7)).choice == "dense"
    lucky = dispatch.decide(timed(dense=[1.0] * 7, csr=[0.5] + [1.2] * 6))  # one fast round, slower otherwise
    assert lucky.choice == "dense" and lucky.confident
    unclear = dispatch.decide(timed(dense=[1.0] * 7, csr=[0.5] * 6 + [1.2]))  # faster but one round disagrees
    assert unclear.choice == "dense" and not unclear.confident
    # a noisy kernel does not hide a clear winner
    mixed = dispatch.decide(timed(dense=[1.0] * 7, csr=[0.3] * 6 + [1.2], bsr16=[0.6] * 7))
    assert mixed.choice == "bsr16"


def test_auto_measures_once_then_uses_the_cache(cache_dir):
    """Real timings: what the first run cached, the second uses without measuring (the fakes above pin the rest).
    Without fusion, so that every reported choice is the layer's own decision (fused siblings may agree on another
    kernel: tests/test_runtime.py)."""
    first = accelerate(model_at(0.95), policy="auto", tokens=(1, 64), fuse=False)
    assert not all(layer.cached for layer in first.layers)  # layers of one shape share a decision
    saved = json.loads((cache_dir / dispatch.CACHE_FILE).read_text())
    again = accelerate(model_at(0.95), policy="auto", tokens=(1, 64), fuse=False)
    keys_at = {t: layer_keys(model_at(0.95), t) for t in (1, 64)}
    from_file = 0
    for index, layer in enumerate(again.layers):
        keys = {t: keys_at[t][index] for t in (1, 64)}
        if all(k in saved for k in keys.values()):  # a decision the first run wrote is used, never measured again
            assert layer.cached
            from_file += 1
        # (a layer whose decision was too noisy to write is measured again, or shares the decision its shape got
        # earlier in this run; either way every written choice is the one used)
        assert all(layer.choices[t] == saved[k]["choice"] for t, k in keys.items() if k in saved)
    assert from_file > 0
    for layer in first.layers:
        for t, times in layer.microseconds.items():
            assert set(times) >= {"dense", "csr"} and all(v > 0 for v in times.values())
            assert layer.choices[t] in times  # whichever measured kernel won on this CPU (csr16 wins on some)
