"""`sparselm bench` and `sparselm run`: clear refusals, timings shown with their spread, --remeasure."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import DECODER_ONLY, FAMILIES, tiny_config, tiny_model
from evaluation_fixtures import tiny_tokenizer
from sparselm.cli import app
from sparselm.runtime import dispatch
from sparselm.facts import is_causal_lm
from test_runtime_dispatch import DENSE_FASTER, FakeTimer
from test_storage import prune_smallest

runner = CliRunner()


def one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_fact_from_config_and_from_saved_checkpoint(family, tmp_path):
    from transformers import AutoConfig

    causal = family in DECODER_ONLY
    assert is_causal_lm(tiny_config(family)) is causal  # a bare config: no architectures recorded
    tiny_model(family).save_pretrained(tmp_path)
    assert is_causal_lm(AutoConfig.from_pretrained(tmp_path)) is causal
    assert is_causal_lm(tiny_model(family)) is causal


def test_run_refuses_an_encoder_before_loading_it():
    result = runner.invoke(app, ["run", "minilm-l6", "--prompt", "Hello", "--max-new-tokens", "2"])
    text = one_line(result.output)
    assert result.exit_code != 0
    assert "'minilm-l6' (BertModel) is not a causal language model" in text and "smollm2-135m" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_run_refuses_encoders_and_seq2seq_models(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path / "m")
    result = runner.invoke(app, ["run", str(tmp_path / "m"), "--prompt", "Hello"])
    assert result.exit_code != 0 and "is not a causal language model" in one_line(result.output)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_run_with_an_empty_prompt_names_the_option(prompt):
    result = runner.invoke(app, ["run", "smollm2-135m", "--prompt", prompt])
    text = one_line(result.output)
    assert result.exit_code != 0 and "--prompt is empty" in text and "token counts" not in text


def test_run_checks_its_options_before_loading(tmp_path):
    result = runner.invoke(app, ["run", "minilm-l6", "--prompt", "Hi", "--policy", "fast"])
    assert result.exit_code != 0 and "unknown runtime policy 'fast'" in one_line(result.output)
    result = runner.invoke(app, ["run", "minilm-l6", "--prompt", "Hi", "--threads", "0"])
    assert result.exit_code != 0 and "--threads must be at least 1" in one_line(result.output)


def test_bench_prints_every_speedup_with_its_spread(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    prune_smallest(tiny_model("llama"), 0.9).save_pretrained(tmp_path / "m")
    args = ["bench", str(tmp_path / "m"), "--tokens", "8", "--rounds", "3", "--no-size", "--threads", "1"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = [*out["prefill"], out["decode"]]
    for row in rows:
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
        assert row["within_noise"] == (row["speedup_low"] <= 1.0 <= row["speedup_high"])
    human = runner.invoke(app, args)
    assert human.exit_code == 0, human.output
    assert "medians of 3 alternating rounds" in one_line(human.output)
    assert human.output.count("×") == 2 * 2  # prefill 8 and decode, each over dense fp32 and over dense bf16
    assert human.output.count("–") == 2 * 5  # a range beside the three milliseconds and the two speed-ups of each row
    for row in rows:
        assert row["speedup_over_bf16_low"] <= row["speedup_over_bf16"] <= row["speedup_over_bf16_high"]
        assert row["within_noise_over_bf16"] == (row["speedup_over_bf16_low"] <= 1.0 <= row["speedup_over_bf16_high"])
        assert row["dense_bf16_ms_low"] <= row["dense_bf16_ms"] <= row["dense_bf16_ms_high"]


def test_bench_remeasure_ignores_cached_decisions(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch, "kernel_samplers", FakeTimer(DENSE_FASTER))  # clear decisions, always cached
    prune_smallest(tiny_model("opt"), 0.95).save_pretrained(tmp_path / "m")
    args = ["bench", str(tmp_path / "m"), "--tokens", "8", "--rounds", "1", "--no-size", "--json"]
    assert runner.invoke(app, args).exit_code == 0
    cached = json.loads(runner.invoke(app, args).stdout)["per_layer"]
    remeasured = json.loads(runner.invoke(app, [*args, "--remeasure"]).stdout)["per_layer"]
    assert all(layer["cached"] for layer in cached)
    assert not remeasured[0]["cached"]  # measured again (later layers of its shape share that measurement)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bench_and_run_in_a_reduced_precision(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    prune_smallest(tiny_model("llama"), 0.9).save_pretrained(tmp_path / "m")
    tiny_tokenizer("llama").save_pretrained(tmp_path / "m")
    args = ["bench", str(tmp_path / "m"), "--tokens", "8", "--rounds", "1", "--no-size", "--threads", "1"]
    result = runner.invoke(app, [*args, "--dtype", dtype, "--policy", "sparse", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["dtype"] == dtype and out["layers"]["replaced"] == out["layers"]["total"]
    assert any("avx512_bf16" in note for note in out["notes"])  # which dense baseline is the honest one here
    run = runner.invoke(app, ["run", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", dtype,
                              "--policy", "sparse", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["replaced"] > 0


def test_an_unknown_runtime_dtype_is_refused_before_loading(tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path / "nowhere"), "--dtype", "int4"])
    assert result.exit_code != 0 and "unknown runtime dtype 'int4'" in one_line(result.output)
    assert "fp32, bf16, int8" in one_line(result.output)
