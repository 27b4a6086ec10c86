"""`sparselm analyze` and `sparselm models` as a user runs them."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers
from typer.testing import CliRunner

from sparselm.cli import app
from sparselm.models import load
from sparselm.weights import select_matrices

runner = CliRunner()
FIGURES = ("weight-distribution", "weight-cdf", "layer-cdf")


def test_analyze_writes_tables_and_figures(tmp_path, tiny_dir):
    a, b = tiny_dir("gpt2"), tiny_dir("bart")
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(a), str(b), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(summary["models"]) == {a.name, b.name}
    for d in (a, b):
        folder = out / d.name
        for fig in FIGURES:
            assert (folder / f"{d.name}-{fig}.png").stat().st_size > 5000
        stats = json.loads((folder / "stats.json").read_text())
        rows = list(csv.DictReader((folder / "layers.csv").open()))
        assert len(rows) == stats["matrices_analysed"] == len(stats["matrices"])
    assert (out / "compare-weight-cdf.png").exists()
    bart = json.loads((out / b.name / "stats.json").read_text())
    assert set(bart["by_side"]) == {"encoder", "decoder", "cross-attention"}


def test_stats_agree_with_numpy_on_a_real_model_layout(tmp_path, tiny_dir):
    path = tiny_dir("gpt2")
    out = tmp_path / "out"
    assert runner.invoke(app, ["analyze", str(path), "--out", str(out), "--include-embeddings"]).exit_code == 0
    stats = json.loads((out / path.name / "stats.json").read_text())
    model = load(str(path))
    mats = select_matrices(model, include_embeddings=True)
    w = np.concatenate([m.weight().numpy().ravel() for m in mats]).astype(np.float64)
    assert stats["overall"]["count"] == w.size
    assert stats["overall"]["abs_quantiles"]["0.5"] == np.quantile(np.abs(w), 0.5)
    assert stats["overall"]["fraction_abs_le_2pow_minus_k"]["7"] == np.mean(np.abs(w) <= 2.0**-7)
    first = stats["matrices"][0]
    m0 = next(m for m in mats if m.name == first["name"])
    assert (first["rows"], first["cols"]) == m0.shape
    assert first["abs_quantiles"]["0.99"] == np.quantile(np.abs(m0.weight().numpy().astype(np.float64)), 0.99)


def test_unwritable_out_fails_cleanly(tmp_path, tiny_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["analyze", str(tiny_dir("opt")), "--out", str(blocker / "sub")])
    assert result.exit_code != 0
    assert "cannot write to output directory" in result.output


def test_unknown_model_fails_with_one_line(tmp_path):
    result = runner.invoke(app, ["analyze", "./does-not-exist", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "no model directory at './does-not-exist'" in result.output
    assert not (tmp_path / "o" / "does-not-exist").exists()


def test_model_with_nothing_to_analyse_leaves_nothing(tmp_path):
    path = tmp_path / "empty-gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=0, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(path)
    result = runner.invoke(app, ["analyze", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "no Linear/Conv1D weight matrices" in result.output
    assert not (tmp_path / "o" / "empty-gpt2").exists()


def test_models_lists_aliases_as_json():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {r["alias"] for r in rows} == {"smollm2-135m", "minilm-l6"}
    smol = next(r for r in rows if r["alias"] == "smollm2-135m")
    assert smol["quantized_from"] == "GGUF Q4_1" and smol["architecture"] == "LlamaForCausalLM"


def test_entry_point_exits_non_zero_with_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparselm", "analyze", "some-org/not-cached", "--out", str(tmp_path)],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "offline" in lines[0], proc.stderr


@pytest.mark.slow
def test_analyze_embedded_models(tmp_path):
    out = tmp_path / "res"
    result = runner.invoke(app, ["analyze", "smollm2-135m", "minilm-l6", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    smol = json.loads((out / "smollm2-135m" / "stats.json").read_text())
    assert smol["quantized_from"] == "GGUF Q4_1" and "dequantised from GGUF Q4_1" in smol["note"]
    assert smol["matrices_analysed"] == 30 * 7
    assert smol["overall"]["count"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    mini = json.loads((out / "minilm-l6" / "stats.json").read_text())
    assert mini["matrices_analysed"] == 6 * 6 and mini["quantized_from"] is None
    assert (out / "compare-weight-cdf.png").exists()


# --- issue 11: every input is checked before anything is written; DIR/<model> follows the output rules


def _error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_a_bad_second_model_fails_before_the_first_is_analysed(tmp_path, tiny_dir):
    out = tmp_path / "o"
    error = _error_line(runner.invoke(app, ["analyze", str(tiny_dir("gpt2")), "/nonexistent", "--out", str(out)]))
    assert "no model directory at '/nonexistent'" in error and not out.exists()


def test_analysing_into_the_models_parent_never_replaces_the_model(tmp_path, tiny_dir, monkeypatch):
    path = tiny_dir("gpt2")
    monkeypatch.chdir(path.parent)
    error = _error_line(runner.invoke(app, ["analyze", f"./{path.name}", "--out", ".", "--force"]))
    assert f"output '{path.name}' is the input '{path.name}'" in error and (path / "model.safetensors").is_file()


def test_a_users_folder_named_like_the_model_needs_force(tmp_path, tiny_dir):
    path, out = tiny_dir("gpt2"), tmp_path / "res"
    (out / path.name).mkdir(parents=True)
    (out / path.name / "notes.txt").write_text("mine")
    assert "--force" in _error_line(runner.invoke(app, ["analyze", str(path), "--out", str(out)]))
    assert (out / path.name / "notes.txt").read_text() == "mine"
    assert runner.invoke(app, ["analyze", str(path), "--out", str(out), "--force"]).exit_code == 0
    assert (out / path.name / "stats.json").is_file() and not (out / path.name / "notes.txt").exists()


def test_two_models_with_the_same_folder_name_are_refused(tmp_path, tiny_dir):
    path = tiny_dir("gpt2")
    twin = tmp_path / "twin" / path.name
    shutil.copytree(path, twin)
    error = _error_line(runner.invoke(app, ["analyze", str(path), str(twin), "--out", str(tmp_path / "res")]))
    assert "several models would write to the same folder" in error


def test_the_comparison_figure_replaces_only_a_previous_analysis(tmp_path, tiny_dir):
    a, b, out = tiny_dir("gpt2"), tiny_dir("opt"), tmp_path / "res"
    out.mkdir()
    (out / "compare-weight-cdf.png").write_bytes(b"my figure")
    assert "--force" in _error_line(runner.invoke(app, ["analyze", str(a), str(b), "--out", str(out)]))
    assert (out / "compare-weight-cdf.png").read_bytes() == b"my figure"
    assert runner.invoke(app, ["analyze", str(a), str(b), "--out", str(out), "--force"]).exit_code == 0
    first = (out / "compare-weight-cdf.png").read_bytes()
    assert first.startswith(b"\x89PNG")
    assert runner.invoke(app, ["analyze", str(a), str(b), "--out", str(out)]).exit_code == 0  # a rerun needs no --force
