"""`sparselm prune` end to end: loadable output, sparsity.json, several sparsities, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from sparselm.cli import app
from sparselm.weights import select_matrices

TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # 1,800 characters = tokens


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 0..94, unknown 95): fits the tiny models' vocabulary of 96."""
    vocab = {chr(32 + i): i for i in range(95)}
    vocab["[UNK]"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def model_dir(tiny_dir):
    def make(family: str) -> Path:
        path = tiny_dir(family)
        char_tokenizer().save_pretrained(path)
        return path

    return make


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _zeros_fraction(model: torch.nn.Module) -> float:
    mats = select_matrices(model)
    return sum(int((m.weight() == 0).sum()) for m in mats) / sum(m.numel for m in mats)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_pruned_dir_loads_in_plain_transformers(model_dir, text_file, tmp_path, family):
    out = tmp_path / "out"
    result = invoke("prune", model_dir(family), "--method", "wanda", "--sparsity", "0.5", "--calib",
                    f"text:{text_file}", "--calib-samples", "4", "--calib-seqlen", "32", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["achieved_sparsity"] == pytest.approx(0.5)
    record = json.loads((out / "sparsity.json").read_text())
    assert record["calibration"] == {"source": f"text:{text_file}", "split": "train", "samples": 4, "seqlen": 32,
                                     "seed": 0, "tokens_in_text": len(TEXT)}
    assert record["parameters"]["method"] == "wanda" and record["seconds"] > 0
    assert {m["name"] for m in record["matrices"]} and (out / "provenance.json").exists()
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    auto = transformers.AutoModelForCausalLM if family == "gpt2" else transformers.AutoModelForSeq2SeqLM
    loaded = auto.from_pretrained(out)
    assert _zeros_fraction(loaded) == pytest.approx(record["achieved_sparsity"])
    for row in record["matrices"]:
        weight = dict(loaded.named_parameters())[row["name"]]
        assert int((weight == 0).sum()) == row["zeros"]


def test_several_sparsities_write_one_dir_each(model_dir, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("prune", model_dir("opt"), "--scope", "global", "--sparsity", "0.1,0.9", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["out"] for r in rows] == [str(out / "s0.1"), str(out / "s0.9")]
    for s in (0.1, 0.9):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out / f"s{s:g}")
        record = json.loads((out / f"s{s:g}" / "sparsity.json").read_text())
        total = record["prunable_weights"]
        assert record["pruned_weights"] == int(s * total)  # exact: floor(s · n) weights, ties broken in order
        assert _zeros_fraction(loaded) == record["achieved_sparsity"] == int(s * total) / total


def test_human_output_and_block_pattern(model_dir, tmp_path):
    result = invoke("prune", model_dir("bert"), "--pattern", "block:8x8", "--sparsity", "0.5", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "magnitude block:8x8 (layer, uniform): achieved sparsity 0.5000" in result.stdout


def _no_output(tmp_path: Path) -> bool:
    return not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.0"], "outside [0, 1)"),
        (["--sparsity", "abc"], "--sparsity must be a number"),
        (["--method", "obs"], "unknown method 'obs'"),
        (["--pattern", "zigzag"], "unknown sparsity pattern 'zigzag'"),
        (["--pattern", "3:5"], "not divisible by 5"),
        (["--method", "wanda", "--calib-samples", "100", "--calib-seqlen", "64"], "only 28 windows of 64"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(model_dir, text_file, tmp_path, args, message):
    path = model_dir("llama")
    result = invoke("prune", path, "--calib", f"text:{text_file}", *args, "--out", tmp_path / "out")
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert _no_output(tmp_path)


def test_model_with_nothing_prunable(tmp_path):
    config = tiny_config("llama")
    config.num_hidden_layers = 0
    path = tmp_path / "empty"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    result = invoke("prune", path, "--out", tmp_path / "out")
    assert result.exit_code != 0 and "no Linear/Conv1D weight matrices" in result.output
    assert _no_output(tmp_path)


@pytest.mark.slow
def test_smollm2_wanda_2_4_with_owl(tmp_path, text_file):
    out = tmp_path / "smol"
    result = invoke("prune", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--allocation", "owl",
                    "--calib", f"text:{text_file}", "--calib-samples", "2", "--calib-seqlen", "16", "--out", out,
                    "--json")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sparsity.json").read_text())
    # a few weights dequantised from 4 bits are exactly zero already, so slightly more than half are zero
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4) and len(record["block_sparsity"]) == 30
    assert record["calibration"]["source"] == f"text:{text_file}" and record["calibration"]["seqlen"] == 16
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None


# --- issue 11: an output path is replaced only when sparselm wrote it; inputs and the working directory never are


def user_tree(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("notes\n")
    (path / "sub" / "code.py").write_text("print(1)\n")
    return path


def user_files_intact(path: Path) -> bool:
    return (path / "notes.txt").read_text() == "notes\n" and (path / "sub" / "code.py").read_text() == "print(1)\n"


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def no_pruning(monkeypatch):
    """Fail the test if pruning starts: output checks must come before any work."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("pruning started before the output was checked")

    monkeypatch.setattr("sparselm.cli.prune.prune_to_dir", refuse)


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_a_users_directory_is_never_replaced_without_force(model_dir, tmp_path, no_pruning):
    out = user_tree(tmp_path / "mine")
    error = one_error_line(invoke("prune", model_dir("gpt2"), "--out", out))
    assert f"'{out}' is a directory that sparselm did not write" in error and "--force" in error
    assert user_files_intact(out) and leftovers(tmp_path) == []


def test_a_users_file_is_never_replaced_without_force(model_dir, tmp_path, no_pruning):
    out = tmp_path / "result.txt"
    out.write_text("precious")
    error = one_error_line(invoke("prune", model_dir("gpt2"), "--out", out))
    assert "is a file that sparselm did not write" in error and "--force" in error
    assert out.read_text() == "precious"


def test_force_replaces_a_users_directory(model_dir, tmp_path):
    out = user_tree(tmp_path / "mine")
    result = invoke("prune", model_dir("gpt2"), "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and (out / "sparsity.json").is_file() and leftovers(tmp_path) == []


def test_a_directory_sparselm_wrote_is_replaced_until_someone_adds_to_it(model_dir, tmp_path):
    path, out = model_dir("gpt2"), tmp_path / "pruned"
    assert invoke("prune", path, "--sparsity", "0.1", "--out", out).exit_code == 0
    result = invoke("prune", path, "--sparsity", "0.9", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sparsity.json").read_text())["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    (out / "notes.txt").write_text("mine")
    assert "--force" in one_error_line(invoke("prune", path, "--out", out))
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_the_input_is_never_replaced_even_with_force(model_dir, tmp_path, no_pruning, where, force):
    path = model_dir("gpt2")
    out = {"same": path, "inside": path / "pruned", "parent": path.parent}[where]
    before = sorted(p.name for p in path.iterdir())
    error = one_error_line(invoke("prune", path, "--out", out, *force))
    relation = {"same": "is", "inside": "lies inside", "parent": "holds"}[where]
    assert f"output '{out}' {relation} the input '{path}'" in error
    assert sorted(p.name for p in path.iterdir()) == before


def test_an_output_holding_the_calibration_text_is_refused(model_dir, tmp_path, no_pruning):
    work = tmp_path / "work"
    work.mkdir()
    (work / "calib.txt").write_text(TEXT)
    calib = work / "calib.txt"
    error = one_error_line(invoke("prune", model_dir("gpt2"), "--method", "wanda", "--calib", f"text:{calib}",
                                  "--out", work, "--force"))
    assert f"output '{work}' holds the input '{calib}'" in error and calib.read_text() == TEXT


@pytest.mark.parametrize("out", [".", ".."])
def test_the_current_directory_is_refused_with_no_leftovers(model_dir, tmp_path, monkeypatch, no_pruning, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert "current directory" in one_error_line(invoke("prune", model_dir("gpt2"), "--out", out, "--force"))
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"] and leftovers(tmp_path) == []


def test_unwritable_output_fails_before_pruning(model_dir, no_pruning):
    error = one_error_line(invoke("prune", model_dir("gpt2"), "--out", "/proc/x"))
    assert "cannot write to output directory '/proc/x'" in error


def test_several_sparsities_check_every_output_first(model_dir, tmp_path, no_pruning):
    out = tmp_path / "sweep"
    user_tree(out / "s0.9")
    error = one_error_line(invoke("prune", model_dir("gpt2"), "--sparsity", "0.5,0.9", "--out", out))
    assert f"'{out / 's0.9'}' is a directory that sparselm did not write" in error
    assert not (out / "s0.5").exists() and user_files_intact(out / "s0.9")


def test_corrupt_config_is_one_line(model_dir, tmp_path, no_pruning):
    path = model_dir("gpt2")
    (path / "config.json").write_text('{"model_type": "gpt2",')
    error = one_error_line(invoke("prune", path, "--out", tmp_path / "out"))
    assert f"'{path / 'config.json'}' is not valid JSON" in error and "line 1, column 23" in error


def test_square_brackets_in_a_model_name_are_shown_as_typed(tmp_path):
    error = one_error_line(invoke("prune", "bad/[red]model", "--out", tmp_path / "out"))
    assert "'bad/[red]model'" in error
