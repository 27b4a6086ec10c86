"""`sparselm pack`, `unpack`, `bench` and `run` from the command line: JSON output, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from sparselm.cli import app
from test_storage import prune_smallest, pruned_dir

runner = CliRunner()


def test_pack_and_unpack_json(tmp_path):
    src = pruned_dir(tmp_path, "gpt2")
    result = runner.invoke(app, ["pack", str(src), "--out", str(tmp_path / "p"), "--format", "rice", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["gain"] and summary["ratio"] > 2 and set(summary["codecs"]) <= {"dense", "rice", "rice+zstd"}
    result = runner.invoke(app, ["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["model.safetensors"]


def test_pack_human_output_and_dense_note(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path / "dense")
    result = runner.invoke(app, ["pack", str(tmp_path / "dense"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "gains nothing" in text and "packed" in text


def test_corrupt_pack_fails_with_one_line_and_nonzero_exit(tmp_path):
    src = pruned_dir(tmp_path, "llama")
    assert runner.invoke(app, ["pack", str(src), "--out", str(tmp_path / "p")]).exit_code == 0
    weights = tmp_path / "p" / "model.packed.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = runner.invoke(app, ["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "d")])
    text = " ".join(result.output.split())
    assert result.exit_code != 0
    assert "checksum mismatch" in text and "model.packed.safetensors" in text
    assert "Traceback" not in text and not (tmp_path / "d").exists()


def test_bad_options_fail_cleanly(tmp_path):
    src = pruned_dir(tmp_path, "opt")
    result = runner.invoke(app, ["pack", str(src), "--out", str(tmp_path / "p"), "--format", "zip"])
    assert result.exit_code != 0 and "unknown pack format 'zip'" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", str(src), "--tokens", "a,b"])
    assert result.exit_code != 0 and "--tokens" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", str(src), "--policy", "semi-structured", "--tokens", "4"])
        assert result.exit_code != 0 and "needs a CUDA GPU" in " ".join(result.output.split())


def test_bench_json(tmp_path):
    prune_smallest(tiny_model("llama"), 0.9).save_pretrained(tmp_path / "m")
    result = runner.invoke(
        app, ["bench", str(tmp_path / "m"), "--tokens", "1,8", "--threads", "1", "--rounds", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["threads"] == 1 and [r["tokens"] for r in out["prefill"]] == [1, 8] and out["decode"]["steps"] > 0
    human = runner.invoke(app, ["bench", str(tmp_path / "m"), "--tokens", "4", "--rounds", "1", "--no-size"])
    assert human.exit_code == 0 and "speed-up" in human.output


@pytest.mark.slow
def test_run_generates_with_the_accelerated_embedded_model():
    result = subprocess.run(
        [sys.executable, "-m", "sparselm", "run", "smollm2-135m", "--prompt", "The capital of France is",
         "--max-new-tokens", "3", "--threads", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["completion"].strip().startswith("Paris")
    from sparselm.models import load_tokenizer

    prompt_tokens = len(load_tokenizer("smollm2-135m")("The capital of France is").input_ids)
    assert set(out["choices"]) == {"1", str(prompt_tokens)}  # decode steps and the prompt's prefill
