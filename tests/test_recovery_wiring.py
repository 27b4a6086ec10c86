"""Recovery wired into pruning: block reconstruction inside the calibration driver (`--reconstruct`), the ADMM method,
gradual pruning (`--steps`), and their command-line errors. Tiny models of every family: decoder (Llama, OPT, GPT-2
with Conv1D), encoder (BERT), encoder-decoder (BART, T5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ENCODER_DECODER, tiny_model
from test_cli_prune import invoke, model_dir, text_file  # noqa: F401 (model_dir and text_file are fixtures)
from torch import nn

from sparselm.errors import SparselmError
from sparselm.masks import NM, is_n_of_m, prune_count
from sparselm.pruning import driver, prune, registry
from sparselm.weights import find_block_lists, select_matrices

WINDOWS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
FAMILIES = ["llama", "opt", "gpt2", "bert", "bart", "t5"]
RECONSTRUCT = {"reconstruct": True, "reconstruct_lr": 1e-3, "reconstruct_epochs": 4}


def _inputs(family: str) -> dict[str, torch.Tensor]:
    """The calibration windows as the driver feeds them (encoder-decoders read them on the decoder side too)."""
    return {"input_ids": WINDOWS, **({"decoder_input_ids": WINDOWS} if family in ENCODER_DECODER else {})}


def _block_outputs(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Every block's output in one ordinary forward of the whole model on the calibration windows."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for stack in find_block_lists(model):
        for index, block in enumerate(stack.blocks):
            def hook(_module, _args, output, name=f"{stack.path}.{index}"):
                outputs[name] = (output[0] if isinstance(output, tuple) else output).detach().double()

            handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**_inputs(family), use_cache=False) if family != "bert" else model(**_inputs(family))
    finally:
        for h in handles:
            h.remove()
    return outputs


def _normalised_errors(model: nn.Module, dense: dict[str, torch.Tensor], family: str) -> dict[str, float]:
    """Per block: MSE of the model's block output against the dense model's, over the variance of the dense one."""
    got = _block_outputs(model, family)
    return {name: float(((got[name] - d) ** 2).mean() / d.var(unbiased=False)) for name, d in dense.items()}


# ---------------------------------------------------------------- block reconstruction in the driver

@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_keeps_every_pruned_position_zero(family, monkeypatch):
    """Per matrix and position: the zeros a block has when its masks are chosen are exactly its zeros after
    reconstruction (as +0.0), the masks handed to the trainer are those zeros, and kept weights were trained."""
    model = tiny_model(family)
    mats = select_matrices(model)
    names = {m.parameter: m.name for m in mats}
    checked: list[str] = []
    real = driver.reconstruct_block

    def checking(block, inputs, calls, targets, keep, settings):
        before = {p: p.detach().clone() for p in keep}
        for param, mask in keep.items():
            assert torch.equal(mask, before[param] != 0), names[param]
        result = real(block, inputs, calls, targets, keep, settings)
        for param, mask in keep.items():
            after = param.detach()
            assert torch.equal(after == 0, before[param] == 0), names[param]
            assert not after[~mask].signbit().any()
            assert not torch.equal(after[mask], before[param][mask]), f"{names[param]} was not trained"
            checked.append(names[param])
        assert result.after < result.before
        return result

    monkeypatch.setattr(driver, "reconstruct_block", checking)
    report = prune(model, windows=WINDOWS, method="wanda", sparsity=0.5, **RECONSTRUCT)
    assert checked == [m.name for m in mats]  # every matrix, block by block, once
    for m in mats:  # Wanda's count per row survives training exactly
        assert int((m.weight() == 0).sum()) == m.shape[0] * prune_count(m.shape[1], 0.5), m.name
    assert report.achieved_sparsity == 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_lowers_every_blocks_output_error(family, method):
    """Measured with ordinary whole-model forwards: each block's output is closer to the dense model's with
    reconstruction than without, and the driver's logged loss after training is that measured error (so its targets
    were the dense block's outputs on the dense model's inputs, cross-attention included)."""
    dense = _block_outputs(tiny_model(family), family)
    plain, rebuilt = tiny_model(family), tiny_model(family)
    prune(plain, windows=WINDOWS, method=method, sparsity=0.5)
    report = prune(rebuilt, windows=WINDOWS, method=method, sparsity=0.5, **RECONSTRUCT)
    without, with_ = _normalised_errors(plain, dense, family), _normalised_errors(rebuilt, dense, family)
    logged = report.to_json()["recovery"]["blocks"]
    assert list(logged) == list(dense)
    for name in dense:
        assert with_[name] < without[name], name
        (entry,) = logged[name]
        assert entry["loss_after"] == pytest.approx(with_[name], rel=2e-3), name
        assert entry["loss_after"] < entry["loss_before"] and entry["sparsity"] == 0.5
    if method == "magnitude":  # the first block's mask does not depend on inputs: same mask, error before training
        first = next(iter(dense))
        assert logged[first][0]["loss_before"] == pytest.approx(without[first], rel=2e-3)


def test_training_that_ends_worse_is_undone():
    """A learning rate far too large makes every block worse on its own batches: the untrained weights come back,
    so the model equals plain magnitude pruning bit for bit, and the report says so."""
    plain, overshot = tiny_model("llama"), tiny_model("llama")
    prune(plain, windows=WINDOWS, method="magnitude", sparsity=0.5)
    report = prune(overshot, windows=WINDOWS, method="magnitude", sparsity=0.5, reconstruct=True, reconstruct_lr=10.0)
    for rounds in report.to_json()["recovery"]["blocks"].values():
        (entry,) = rounds
        assert entry["loss_after"] > entry["loss_before"] and entry["trained_weights_kept"] is False
    for p, q in zip(plain.parameters(), overshot.parameters(), strict=True):
        assert torch.equal(p, q)


def test_global_magnitude_with_reconstruction_keeps_the_global_masks():
    ranked, rebuilt = tiny_model("llama"), tiny_model("llama")
    prune(ranked, method="magnitude", scope="global", sparsity=0.5)
    report = prune(rebuilt, windows=WINDOWS, method="magnitude", scope="global", sparsity=0.5, **RECONSTRUCT)
    for a, b in zip(select_matrices(ranked), select_matrices(rebuilt), strict=True):
        assert torch.equal(a.weight() == 0, b.weight() == 0), a.name
        assert not torch.equal(a.weight(), b.weight())  # kept weights trained
    assert report.to_json()["recovery"]["reconstruct"] is True


def test_reconstruction_record_in_the_report():
    report = prune(tiny_model("llama"), windows=WINDOWS, method="magnitude", sparsity=0.5, **RECONSTRUCT)
    data = report.to_json()
    assert data["parameters"]["reconstruct"] is True and data["parameters"]["reconstruct_epochs"] == 4
    assert data["parameters"]["reconstruct_lr"] == 1e-3 and data["parameters"]["steps"] == 1
    assert data["recovery"]["steps"] == 1 and "variance" in data["recovery"]["loss"]
    assert data["calibration"] == {"source": "given token windows", "samples": 4, "seqlen": 16}
    assert prune(tiny_model("llama"), windows=WINDOWS, method="wanda").to_json()["recovery"] is None


def test_magnitude_with_reconstruction_needs_calibration_text():
    with pytest.raises(SparselmError, match="--reconstruct needs calibration text but the model has no tokenizer; .* drop "
                                        "--reconstruct"):
        prune(tiny_model("gpt2"), method="magnitude", reconstruct=True)


# ---------------------------------------------------------------- ADMM as a method

def _logits_error(model: nn.Module, dense: torch.Tensor, family: str) -> float:
    with torch.no_grad():
        return float((model(**_inputs(family)).logits.double() - dense).norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_admm_method_holds_patterns_exactly_and_beats_magnitude(family):
    with torch.no_grad():
        dense = tiny_model(family)(**_inputs(family)).logits.double()
    errors = {}
    for method in ("magnitude", "admm"):
        model = tiny_model(family)
        report = prune(model, windows=WINDOWS, method=method, sparsity=0.5)
        for m in select_matrices(model):  # one comparison group per matrix: exactly floor(s·n) zeros, as +0.0
            w = m.weight()
            assert int((w == 0).sum()) == prune_count(m.numel, 0.5) and not w[w == 0].signbit().any(), m.name
        errors[method] = _logits_error(model, dense, family)
        assert report.achieved_sparsity == 0.5
    assert errors["admm"] < errors["magnitude"]
    nm_model = tiny_model(family)
    prune(nm_model, windows=WINDOWS, method="admm", pattern="2:4")
    for m in select_matrices(nm_model):
        keep = m.weight() != 0
        assert is_n_of_m(keep, 2, 4) and (keep.reshape(m.shape[0], -1, 4).sum(dim=2) == 2).all(), m.name
    nm_error = _logits_error(nm_model, dense, family)
    magnitude_nm = tiny_model(family)
    prune(magnitude_nm, windows=WINDOWS, method="magnitude", pattern="2:4")
    assert nm_error < _logits_error(magnitude_nm, dense, family)


def test_admm_with_owl_prunes_each_block_to_its_target():
    model = tiny_model("llama")
    report = prune(model, windows=WINDOWS, method="admm", sparsity=0.5, allocation="owl", owl_threshold=2.0,
                   owl_lambda=0.2)
    targets = report.block_sparsity
    assert len(set(targets.values())) == 2
    for m in select_matrices(model):
        assert int((m.weight() == 0).sum()) == prune_count(m.numel, targets[m.block_name]), m.name


# ---------------------------------------------------------------- gradual pruning

def _cubic(target: float, k: int, steps: int) -> float:
    return target * (1 - (1 - k / steps) ** 3)


def _recording(monkeypatch, method: str) -> list[tuple[str, str, float, int]]:
    """Wrap a registered method so each call records (matrix, pattern, sparsity asked, zeros afterwards)."""
    calls: list[tuple[str, str, float, int]] = []
    original = registry.pruner(method)

    class Recorded(type(original)):
        def prune_matrix(self, matrix, stats, pattern, sparsity, settings) -> None:
            super().prune_matrix(matrix, stats, pattern, sparsity, settings)
            calls.append((matrix.name, str(pattern), sparsity, int((matrix.weight() == 0).sum())))

    monkeypatch.setitem(registry._PRUNERS, method, Recorded())
    return calls


def _sparsegpt_zeros(rows: int, cols: int, sparsity: float) -> int:
    """SparseGPT's exact count: floor(s·n) per block of 128 columns."""
    return sum(prune_count(rows * (min(c + 128, cols) - c), sparsity) for c in range(0, cols, 128))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
def test_gradual_rounds_follow_the_cubic_schedule(family, monkeypatch):
    calls = _recording(monkeypatch, "sparsegpt")
    model = tiny_model(family)
    report = prune(model, windows=WINDOWS, method="sparsegpt", sparsity=0.6, steps=3)
    mats = select_matrices(model)
    shapes = {m.name: m.shape for m in mats}
    blocks = list(dict.fromkeys(m.block_name for m in mats))
    in_order = [m.name for b in blocks for _ in range(3) for m in mats if m.block_name == b]
    assert [c[0] for c in calls] == in_order  # block by block: round 1 of every matrix, then round 2, …
    rounds_seen: dict[str, int] = {}
    for name, pattern, sparsity, zeros in calls:
        k = rounds_seen[name] = rounds_seen.get(name, 0) + 1
        assert pattern == "unstructured" and sparsity == pytest.approx(_cubic(0.6, k, 3), abs=1e-12)
        assert zeros == _sparsegpt_zeros(*shapes[name], _cubic(0.6, k, 3)), (name, k)
    for m in mats:  # the last round is exact
        assert int((m.weight() == 0).sum()) == _sparsegpt_zeros(*m.shape, 0.6)
    blocks = report.to_json()["recovery"]["blocks"]
    for name, rounds in blocks.items():
        in_block = [m for m in mats if m.block_name == name]
        total = sum(m.numel for m in in_block)
        expected = [sum(_sparsegpt_zeros(*m.shape, _cubic(0.6, k, 3)) for m in in_block) / total for k in (1, 2, 3)]
        assert [r["sparsity"] for r in rounds] == pytest.approx(expected, abs=1e-12)


def test_gradual_n_of_m_moves_n_and_ends_exactly(monkeypatch):
    calls = _recording(monkeypatch, "admm")
    model = tiny_model("llama")
    prune(model, windows=WINDOWS, method="admm", pattern="4:8", steps=4)
    expected = [f"{round(8 * (1 - _cubic(0.5, k, 4)))}:8" for k in (1, 2, 3, 4)]
    assert expected == ["6:8", "4:8", "4:8", "4:8"]  # s_k = 0.289, 0.438, 0.492, 0.5 keep 5.69, 4.5, 4.06, 4 of 8
    mats = select_matrices(model)
    rounds_seen: dict[str, int] = {}
    for name, pattern, _sparsity, zeros in calls:
        k = rounds_seen[name] = rounds_seen.get(name, 0) + 1
        nm = NM(*map(int, pattern.split(":")))
        assert pattern == expected[k - 1]
        rows, cols = next(m.shape for m in mats if m.name == name)
        assert zeros == rows * cols // 8 * (8 - nm.n)
    for m in mats:
        assert is_n_of_m(m.weight() != 0, 4, 8) and int((m.weight() == 0).sum()) == m.numel // 2


def test_one_round_is_one_shot_and_more_rounds_change_the_solution():
    one_shot, one_round, three = tiny_model("opt"), tiny_model("opt"), tiny_model("opt")
    prune(one_shot, windows=WINDOWS, method="sparsegpt", sparsity=0.5)
    report = prune(one_round, windows=WINDOWS, method="sparsegpt", sparsity=0.5, steps=1)
    prune(three, windows=WINDOWS, method="sparsegpt", sparsity=0.5, steps=3)
    for a, b, c in zip(one_shot.parameters(), one_round.parameters(), three.parameters(), strict=True):
        assert torch.equal(a, b)
    assert report.recovery is None
    assert any(not torch.equal(a.weight(), c.weight()) for a, c in zip(select_matrices(one_shot),
                                                                        select_matrices(three)))


def test_gradual_with_reconstruction_grows_nested_masks(monkeypatch):
    """Wanda rounds with reconstruction: each round's zeros contain the previous round's (a zero scores lowest)."""
    calls = _recording(monkeypatch, "wanda")
    zeros_by_round: dict[str, list[torch.Tensor]] = {}
    real = driver.reconstruct_block

    def recorded(block, inputs, calls_, targets, keep, settings):
        for param, mask in keep.items():
            zeros_by_round.setdefault(str(id(param)), []).append(~mask)
        return real(block, inputs, calls_, targets, keep, settings)

    monkeypatch.setattr(driver, "reconstruct_block", recorded)
    model = tiny_model("gpt2")
    report = prune(model, windows=WINDOWS, method="wanda", sparsity=0.7, steps=3, **RECONSTRUCT)
    assert len(calls) == 3 * len(select_matrices(model))
    for rounds in zeros_by_round.values():
        assert len(rounds) == 3
        for earlier, later in zip(rounds, rounds[1:]):
            assert bool((later | ~earlier).all()) and int(later.sum()) > int(earlier.sum())
    for name, rounds in report.to_json()["recovery"]["blocks"].items():
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(r["loss_after"] < r["loss_before"] and r["trained_weights_kept"] for r in rounds), name
    mats = select_matrices(model)
    expected = sum(m.shape[0] * prune_count(m.shape[1], 0.7) for m in mats) / sum(m.numel for m in mats)
    assert report.achieved_sparsity == expected  # Wanda's per-row count, exactly


# ---------------------------------------------------------------- command line


def _one_error_and_nothing_written(result, message: str, tmp_path: Path) -> None:
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_cli_reconstruct_with_magnitude_and_no_tokenizer(tiny_dir, tmp_path):
    result = invoke("prune", tiny_dir("llama"), "--reconstruct", "--out", tmp_path / "out")
    _one_error_and_nothing_written(result, "--reconstruct needs calibration text but the model has no tokenizer",
                                   tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "3"], "--steps needs a recovery between rounds"),
        (["--method", "sparsegpt", "--scope", "global", "--steps", "2"], "--scope global"),
        (["--reconstruct", "--reconstruct-epochs", "0"], "--reconstruct-epochs must be at least 1, got 0"),
        (["--reconstruct", "--reconstruct-lr", "0"], "--reconstruct-lr must be a positive learning rate"),
        (["--reconstruct", "--reconstruct-lr", "-1e-3"], "--reconstruct-lr must be a positive learning rate"),
        (["--reconstruct", "--reconstruct-lr", "nan"], "--reconstruct-lr must be a positive learning rate"),
    ],
)
def test_cli_bad_recovery_settings(model_dir, text_file, tmp_path, args, message):
    result = invoke("prune", model_dir("llama"), "--calib", f"text:{text_file}", *args, "--out", tmp_path / "out")
    _one_error_and_nothing_written(result, message, tmp_path)


def test_cli_admm_gradual_with_reconstruction(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = invoke("prune", model_dir("gpt2"), "--method", "admm", "--pattern", "2:4", "--steps", "3",
                    "--reconstruct", "--reconstruct-epochs", "1", "--reconstruct-lr", "5e-4",
                    "--calib", f"text:{text_file}", "--calib-samples", "4", "--calib-seqlen", "32", "--out", out,
                    "--json")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "admm" and record["achieved_sparsity"] == 0.5
    params = record["parameters"]
    assert (params["steps"], params["reconstruct"], params["reconstruct_epochs"], params["reconstruct_lr"]) == (
        3, True, 1, 5e-4)
    blocks = record["recovery"]["blocks"]
    assert list(blocks) == ["transformer.h.0", "transformer.h.1"]
    for rounds in blocks.values():  # 2:4 over 3 rounds: N = round(4·(1 − s_k)) → 3:4, 2:4, 2:4
        assert [r["sparsity"] for r in rounds] == [0.25, 0.5, 0.5]
        assert all(r["trained_weights_kept"] == (r["loss_after"] <= r["loss_before"]) for r in rounds)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for m in select_matrices(loaded):
        assert is_n_of_m(m.weight() != 0, 2, 4) and int((m.weight() == 0).sum()) == m.numel // 2


@pytest.mark.slow
def test_smollm2_gradual_wanda_2_4_with_reconstruction(tmp_path, text_file):
    out = tmp_path / "smol"
    result = invoke("prune", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--steps", "3", "--reconstruct",
                    "--reconstruct-epochs", "1", "--calib", f"text:{text_file}", "--calib-samples", "2",
                    "--calib-seqlen", "16", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sparsity.json").read_text())
    blocks = record["recovery"]["blocks"]
    assert len(blocks) == 30 and all([r["round"] for r in rounds] == [1, 2, 3] for rounds in blocks.values())
    for rounds in blocks.values():  # whichever weights were kept, the block is no worse than untrained
        assert all(r["trained_weights_kept"] == (r["loss_after"] <= r["loss_before"]) for r in rounds)
        assert rounds[0]["sparsity"] == pytest.approx(0.25, abs=1e-3)  # 3:4 in round 1 (s_1 = 0.35 → N = 3)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for m in select_matrices(loaded):
        assert is_n_of_m(m.weight() != 0, 2, 4), m.name
    # a few weights dequantised from 4 bits are exactly zero already, so slightly more than half are zero
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
