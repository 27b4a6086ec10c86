"""`sparselm eval` and `sparselm finetune` as a user runs them, including every bad input the issue names."""

from __future__ import annotations

import json

import pytest
from evaluation_fixtures import SAMPLE, save_tiny
from typer.testing import CliRunner

from sparselm.cli import app

runner = CliRunner()


def run_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def fails(*args: str, match: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code != 0
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and match in " ".join(result.output.split()), result.output
    return result.output


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "llama", "llama")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE)
    return path


def test_eval_perplexity_json(model_dir, text_file):
    result = run_json("eval", str(model_dir), "--task", f"text:{text_file}", "--seqlen", "32", "--batch-size", "3")
    assert result["task"] == f"text:{text_file}" and result["split"] == "whole file"
    assert {"token_ppl", "word_ppl", "byte_ppl", "bits_per_byte"} <= result.keys()
    assert result["settings"]["seqlen"] == 32 and result["settings"]["batch_size"] == 3
    assert result["scored_text_tokens"] == len(SAMPLE)


def test_eval_ptb_and_wiki_with_a_budget(model_dir):
    for task in ("ptb", "wiki"):
        result = run_json("eval", str(model_dir), "--task", task, "--seqlen", "64", "--max-windows", "2")
        assert result["windows"] == 2 and result["text_truncated"] and result["settings"]["join"] in (" ", "\n\n")


def test_eval_mlm_and_classification_human_output(tmp_path):
    bert = save_tiny(tmp_path / "bert", "bert")
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE)
    result = runner.invoke(app, ["eval", str(bert), "--task", f"text:{text}", "--objective", "mlm", "--seqlen", "40"])
    assert result.exit_code == 0 and "masked-LM perplexity" in result.output
    result = runner.invoke(app, ["eval", str(bert), "--task", "wiki-topic", "--max-examples", "6"])
    assert result.exit_code == 0 and "accuracy" in result.output and "not fine-tuned" in result.output


def test_finetune_cli_writes_a_model_that_eval_reads(tmp_path, model_dir):
    out = tmp_path / "tuned"
    report = run_json("finetune", str(model_dir), "--task", "wiki-pair", "--out", str(out), "--max-steps", "2",
                      "--max-examples", "8", "--batch-size", "4", "--optimizer", "sgd")
    assert report["sparsity_identical"] and (out / "finetune.json").is_file() and (out / "provenance.json").is_file()
    result = run_json("eval", str(out), "--task", "wiki-pair", "--max-examples", "8")
    assert result["settings"]["head_trained"]


def test_unknown_task(model_dir):
    fails("eval", str(model_dir), "--task", "glue", match="unknown task 'glue'")


def test_dataset_not_available_offline(model_dir):
    fails("eval", str(model_dir), "--task", "wikitext2", match="--data-dir")
    fails("eval", str(model_dir), "--task", "mrpc", match="--data-dir")


def test_seqlen_above_context(model_dir, text_file):
    fails("eval", str(model_dir), "--task", f"text:{text_file}", "--seqlen", "4096", match="above the model's context")


def test_t5_has_no_causal_lm_and_decoders_no_mlm(tmp_path, model_dir, text_file):
    t5 = save_tiny(tmp_path / "t5", "t5")
    fails("eval", str(t5), "--task", f"text:{text_file}", match="no causal-LM")
    fails("eval", str(model_dir), "--task", f"text:{text_file}", "--objective", "mlm", match="encoder-only")


def test_classification_for_a_model_without_a_usable_head(tmp_path):
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    fails("eval", str(tmp_path / "vit"), "--task", "wiki-pair", match="no text encoder")


def test_empty_and_non_utf8_text_files(tmp_path, model_dir):
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    fails("eval", str(model_dir), "--task", f"text:{empty}", match="is empty")
    fails("eval", str(model_dir), "--task", f"text:{latin}", match="not UTF-8")
    out = tmp_path / "never"
    fails("finetune", str(model_dir), "--task", f"text:{empty}", "--out", str(out), match="is empty")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_bad_budgets_and_a_text_source_without_path(model_dir, text_file):
    fails("eval", str(model_dir), "--task", f"text:{text_file}", "--max-windows", "0", match="--max-windows must be")
    fails("eval", str(model_dir), "--task", "wiki-pair", "--max-examples", "0", match="--max-examples must be")
    fails("eval", str(model_dir), "--task", "text:", match="text: needs a file path")
    fails("eval", str(model_dir), "--task", "ptb", "--split", "dev2", match="unknown split")


# --- issue 11: corrupt inputs are one line; fine-tuning never replaces what sparselm did not write


def test_eval_of_a_packed_directory_without_its_manifest(tmp_path, model_dir, text_file):
    packed = tmp_path / "packed"
    assert runner.invoke(app, ["pack", str(model_dir), "--out", str(packed)]).exit_code == 0
    (packed / "sparselm-pack.json").unlink()
    fails("eval", str(packed), "--task", f"text:{text_file}",
          match=f"'{packed}' is a packed directory whose sparselm-pack.json is missing")


def test_eval_of_a_config_that_is_not_json(model_dir, text_file):
    (model_dir / "config.json").write_text("{oops")
    fails("eval", str(model_dir), "--task", f"text:{text_file}",
          match=f"'{model_dir / 'config.json'}' is not valid JSON")


def test_eval_of_truncated_weights(model_dir, text_file):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    fails("eval", str(model_dir), "--task", f"text:{text_file}", match="cannot load the weights of")


def test_finetune_refuses_an_encoder_on_a_language_modelling_task(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr("sparselm.cli.finetune.finetune", lambda *a, **k: pytest.fail("training started"))
    bert = save_tiny(tmp_path / "bert", "bert")
    out = tmp_path / "tuned"
    fails("finetune", str(bert), "--task", f"text:{text_file}", "--out", str(out),
          match="is an encoder-only model (bert), not a causal LM")
    assert not out.exists()


def test_finetune_never_replaces_a_users_directory_or_its_input(tmp_path, model_dir, text_file, monkeypatch):
    monkeypatch.setattr("sparselm.cli.finetune.finetune", lambda *a, **k: pytest.fail("training started"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("notes")
    fails("finetune", str(model_dir), "--task", f"text:{text_file}", "--out", str(mine), match="--force")
    fails("finetune", str(model_dir), "--task", f"text:{text_file}", "--out", str(model_dir), "--force",
          match=f"output '{model_dir}' is the input")
    fails("finetune", str(model_dir), "--task", f"text:{text_file}", "--out", str(tmp_path), "--force",
          match=f"output '{tmp_path}' holds the input")
    assert (mine / "notes.txt").read_text() == "notes" and (model_dir / "config.json").is_file()


@pytest.mark.slow
def test_finetune_refuses_the_embedded_encoder_on_ptb(tmp_path):
    fails("finetune", "minilm-l6", "--task", "ptb", "--out", str(tmp_path / "t"),
          match="'minilm-l6' is an encoder-only model (bert), not a causal LM")
