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
from test_storage import prune_smallest, pruned_dir, tensors_of

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


# --- issue 11: outputs replace only what sparselm wrote; the source is never replaced


def _error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_pack_never_replaces_its_own_source(tmp_path, force):
    src = pruned_dir(tmp_path, "gpt2")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert f"output '{src}' is the input '{src}'" in _error_line(
        runner.invoke(app, ["pack", str(src), "--out", str(src), *force])
    )
    assert "lies inside the input" in _error_line(
        runner.invoke(app, ["pack", str(src), "--out", str(src / "packed"), *force])
    )
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_pack_and_unpack_refuse_a_users_directory_and_the_current_one(tmp_path, monkeypatch):
    src = pruned_dir(tmp_path, "opt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("notes")
    assert "--force" in _error_line(runner.invoke(app, ["pack", str(src), "--out", str(mine)]))
    assert runner.invoke(app, ["pack", str(src), "--out", str(tmp_path / "p")]).exit_code == 0
    assert "--force" in _error_line(runner.invoke(app, ["unpack", str(tmp_path / "p"), "--out", str(mine)]))
    assert "is the input" in _error_line(
        runner.invoke(app, ["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "p"), "--force"])
    )
    monkeypatch.chdir(mine)
    assert "current directory" in _error_line(runner.invoke(app, ["unpack", str(tmp_path / "p"), "--out", "."]))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_pruned_then_packed_then_unpacked_outputs_carry_their_own_markers(tmp_path):
    from sparselm.io import MARKER
    from sparselm.storage import read_manifest

    src = pruned_dir(tmp_path, "llama")
    pruned = tmp_path / "pruned"
    assert runner.invoke(app, ["prune", str(src), "--sparsity", "0.5", "--out", str(pruned)]).exit_code == 0
    for _ in range(2):  # the second run replaces what the first wrote
        assert runner.invoke(app, ["pack", str(pruned), "--out", str(tmp_path / "p")]).exit_code == 0
        assert runner.invoke(app, ["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "d")]).exit_code == 0
    manifest = read_manifest(tmp_path / "p")  # checksums verified
    assert ".sparselm" not in manifest["files"]
    for out in (pruned, tmp_path / "p", tmp_path / "d"):
        listed = json.loads((out / MARKER).read_text())["entries"]
        assert listed == sorted(p.name for p in out.iterdir() if p.name != ".sparselm")
    assert tensors_of(tmp_path / "d").keys() == tensors_of(pruned).keys()
    assert all(torch.equal(tensors_of(tmp_path / "d")[k], v) for k, v in tensors_of(pruned).items())


def test_unpack_of_a_missing_directory_says_so(tmp_path):
    error = _error_line(runner.invoke(app, ["unpack", str(tmp_path / "nope"), "--out", str(tmp_path / "d")]))
    assert f"no directory at '{tmp_path / 'nope'}'" in error and not (tmp_path / "d").exists()
