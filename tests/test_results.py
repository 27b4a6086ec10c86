"""Typed results (issue 12 item 5): every result's `to_json()`, the files written from it and each command's `--json`
keep exactly the keys, in the same order, that the dicts returned before the results were typed.

The expected key lists below were read from the dict-returning code (main at e50fbed) on the same tiny runs, before
the result types replaced it; a renamed or dropped field fails here instead of blanking a report column.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from evaluation_fixtures import SAMPLE, save_tiny
from typer.testing import CliRunner

from sparselm.cli import app
from sparselm.evaluation import evaluate
from sparselm.finetune import finetune
from sparselm.models import load
from sparselm.pruning import prune_to_dir, settings_from
from sparselm.runtime import accelerate, bench, generate
from sparselm.storage import pack, unpack
from sparselm.study.report_data import speedups

runner = CliRunner()

PRUNE = [
    "model", "method", "sparsity", "scope", "pattern", "allocation", "include_embeddings", "parameters", "calibration",
    "achieved_sparsity", "pruned_weights", "prunable_weights", "block_sparsity", "owl_outlier_ratio", "matrices",
    "seconds", "calibration_seconds", "notes", "recovery", "sparselm_version",  # recovery: new with --reconstruct/--steps
]
PRUNE_MATRIX = ["name", "shape", "block", "target_sparsity", "pattern", "zeros", "numel", "sparsity"]
PRUNE_CLI = [
    "out", "model", "method", "sparsity", "scope", "pattern", "allocation", "achieved_sparsity", "pruned_weights",
    "prunable_weights", "calibration", "seconds", "notes",
]
EVAL_CLM = [
    "model", "task", "split", "objective", "token_ppl", "word_ppl", "byte_ppl", "bits_per_byte", "seqlen", "windows",
    "windows_available", "tokens", "token_ppl_predictions", "loglikelihood", "scored_text_tokens", "first_token_scored",
    "words", "bytes", "text_truncated", "batch_size", "settings", "sparsity", "quantized_from", "notes",
]
EVAL_LM_SETTINGS = ["join", "seqlen", "max_windows", "batch_size", "data_dir", "head", "family", "dtype"]
EVAL_MLM = [
    "model", "task", "split", "objective", "mlm_ppl", "seqlen", "windows", "windows_available", "masked_tokens",
    "mask_fraction", "mask_seed", "batch_size", "settings", "sparsity", "quantized_from", "notes",
]
EVAL_CLS = ["model", "task", "split", "accuracy", "f1", "examples", "settings", "sparsity", "notes"]
EVAL_CLS_SETTINGS = ["max_examples", "batch_size", "max_length", "head", "head_trained", "num_labels", "seed", "data_dir"]
FINETUNE = [
    "model", "task", "out", "train_loss", "steps", "examples", "settings", "tokens_seen", "distillation",
    "masked_matrices", "sparsity_identical", "sparsity_before", "sparsity_after",
]  # tokens_seen and distillation: new with finetune --teacher/--max-tokens
FINETUNE_CLS_SETTINGS = [
    "epochs", "lr", "max_steps", "batch_size", "max_examples", "seed", "optimizer", "momentum", "head", "max_length",
    "split", "max_tokens",
]
FINETUNE_LM_SETTINGS = [
    "epochs", "lr", "max_steps", "batch_size", "max_examples", "seed", "optimizer", "momentum", "head", "seqlen", "split",
    "max_tokens",
]
MATRIX_SPARSITY = ["zeros", "numel", "sparsity"]
PACK = [
    "format", "dtype", "tensors", "sparse_tensors", "codecs", "dense_bytes", "packed_bytes", "ratio", "gain", "message",
    "file_bytes_packed", "file_bytes_dense", "out",
]
UNPACK = ["out", "tensors", "files"]
BENCH = [
    "model", "threads", "policy", "rounds", "prefill", "decode", "layers", "per_layer", "size", "dtype", "notes",
    "w8a8_quality",
]
SPEED_ROW = [
    "tokens", "dense_ms", "dense_ms_low", "dense_ms_high", "accelerated_ms", "accelerated_ms_low",
    "accelerated_ms_high", "speedup", "speedup_low", "speedup_high", "within_noise", "dense_tokens_per_s",
    "accelerated_tokens_per_s", "dense_bf16_ms", "dense_bf16_ms_low", "dense_bf16_ms_high", "speedup_over_bf16",
    "speedup_over_bf16_low", "speedup_over_bf16_high", "within_noise_over_bf16", "dense_w8a8_ms", "dense_w8a8_ms_low",
    "dense_w8a8_ms_high", "speedup_over_w8a8", "speedup_over_w8a8_low", "speedup_over_w8a8_high",
    "within_noise_over_w8a8",
]
DECODE_ROW = [*SPEED_ROW, "steps", "prompt_tokens"]
BENCH_LAYERS = ["replaced", "total", "choices", "fused_groups"]
BENCH_SIZE = ["dense_bytes", "packed_bytes", "source"]
ACCELERATE = [
    "policy", "threads", "torch", "tokens", "replaced", "layers_total", "choices", "fused_groups", "layers", "dtype",
    "kernel_path", "notes",
]
LAYER = ["name", "shape", "sparsity", "structure", "choices", "microseconds", "speedups", "cached"]
GENERATE = ["prompt", "completion", "report"]
RUN_CLI = ["prompt", "completion", "replaced", "choices"]


def keys(obj: dict) -> list[str]:
    return list(obj)


def cli_json(*args: str) -> dict | list:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_frozen(result: object) -> None:
    assert dataclasses.is_dataclass(result) and not isinstance(result, type)
    field = dataclasses.fields(result)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, field, None)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def text_file(work) -> Path:
    path = work / "text.txt"
    path.write_text(SAMPLE)
    return path


@pytest.fixture(scope="module")
def pruned(work) -> Path:
    """A tiny llama (with tokenizer) pruned to 90% by magnitude, so sparse kernels and sparse codecs have work."""
    src = save_tiny(work / "llama", "llama")
    result = prune_to_dir(str(src), settings_from(method="magnitude", sparsity=0.9), work / "pruned")
    assert_frozen(result)
    return work / "pruned"


@pytest.fixture(scope="module")
def bert(work) -> Path:
    return save_tiny(work / "bert", "bert")


def test_prune_result_and_sparsity_json(work, pruned):
    result = prune_to_dir(str(work / "llama"), settings_from(method="magnitude", sparsity=0.5), work / "p2")
    assert_frozen(result)
    assert_frozen(result.report)
    data = result.to_json()
    assert keys(data) == PRUNE and keys(data["matrices"][0]) == PRUNE_MATRIX
    stored = json.loads((work / "p2" / "sparsity.json").read_text())
    assert keys(stored) == PRUNE
    assert {k: v for k, v in stored.items() if k != "sparselm_version"} == {
        k: v for k, v in json.loads(json.dumps(data)).items() if k != "sparselm_version"
    }
    assert result.achieved_sparsity == data["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result.out == work / "p2" and result.model == str(work / "llama")


def test_prune_cli_json(work, pruned):
    out = cli_json("prune", str(work / "llama"), "--out", str(work / "p3"), "--sparsity", "0.5")
    assert keys(out) == PRUNE_CLI and out["out"] == str(work / "p3")
    stored = json.loads((work / "p3" / "sparsity.json").read_text())
    assert {k: out[k] for k in PRUNE_CLI[1:] if k != "seconds"} == {k: stored[k] for k in PRUNE_CLI[1:] if k != "seconds"}
    several = cli_json("prune", str(work / "llama"), "--out", str(work / "p4"), "--sparsity", "0.3,0.6")
    assert [keys(r) for r in several] == [PRUNE_CLI, PRUNE_CLI] and [r["sparsity"] for r in several] == [0.3, 0.6]


def test_language_model_evaluations(pruned, bert, text_file):
    clm = evaluate(str(pruned), f"text:{text_file}", seqlen=32)
    assert_frozen(clm)
    assert keys(clm.to_json()) == EVAL_CLM and keys(clm.to_json()["settings"]) == EVAL_LM_SETTINGS
    assert clm.to_json()["token_ppl"] == clm.metrics.token_ppl and clm.sparsity == pytest.approx(0.9, abs=0.01)
    mlm = evaluate(str(bert), f"text:{text_file}", seqlen=32, objective="mlm")
    assert keys(mlm.to_json()) == EVAL_MLM and keys(mlm.to_json()["settings"]) == EVAL_LM_SETTINGS
    cli = cli_json("eval", str(pruned), "--task", f"text:{text_file}", "--seqlen", "32")
    assert cli == json.loads(json.dumps(clm.to_json()))  # the same deterministic numbers, key for key


def test_classification_evaluation(bert):
    result = evaluate(str(bert), "wiki-pair", max_examples=8)
    data = result.to_json()
    assert keys(data) == EVAL_CLS and keys(data["settings"]) == EVAL_CLS_SETTINGS
    assert data["examples"] == 8 == result.metrics.examples and result.notes  # an untrained head is said to be one
    assert cli_json("eval", str(bert), "--task", "wiki-pair", "--max-examples", "8") == json.loads(json.dumps(data))


def test_finetune_results_and_finetune_json(work, pruned, bert, text_file):
    cls = finetune(str(bert), "wiki-pair", work / "ft-cls", max_steps=2, batch_size=4, max_examples=8)
    assert_frozen(cls)
    data = cls.to_json()
    assert keys(data) == FINETUNE and keys(data["settings"]) == FINETUNE_CLS_SETTINGS
    assert keys(json.loads((work / "ft-cls" / "finetune.json").read_text())) == FINETUNE
    lm = finetune(str(pruned), f"text:{text_file}", work / "ft-lm", max_steps=2, batch_size=2, seqlen=32)
    data = lm.to_json()
    assert keys(data) == FINETUNE and keys(data["settings"]) == FINETUNE_LM_SETTINGS
    assert keys(next(iter(data["sparsity_before"].values()))) == MATRIX_SPARSITY
    assert lm.sparsity_identical and lm.steps == 2 == data["steps"]
    cli = cli_json(
        "finetune", str(pruned), "--task", f"text:{text_file}", "--out", str(work / "ft-cli"), "--max-steps", "2",
        "--batch-size", "2", "--seqlen", "32",
    )
    assert keys(cli) == FINETUNE and keys(cli["settings"]) == FINETUNE_LM_SETTINGS


def test_pack_and_unpack_results(work, pruned):
    packed = pack(str(pruned), work / "packed")
    assert_frozen(packed)
    assert keys(packed.to_json()) == PACK and packed.sizes.gain and packed.sizes.ratio == packed.to_json()["ratio"] > 1
    manifest = json.loads((work / "packed" / "sparselm-pack.json").read_text())
    assert manifest["summary"] == {k: v for k, v in packed.to_json().items() if k in PACK[:10]}
    unpacked = unpack(work / "packed", work / "unpacked")
    assert keys(unpacked.to_json()) == UNPACK and unpacked.files == ["model.safetensors"]
    cli = cli_json("pack", str(pruned), "--out", str(work / "packed-cli"))
    assert keys(cli) == PACK
    assert {k: v for k, v in cli.items() if k != "out"} == {k: v for k, v in packed.to_json().items() if k != "out"}
    assert keys(cli_json("unpack", str(work / "packed-cli"), "--out", str(work / "unpacked-cli"))) == UNPACK


def test_accelerate_and_generate_results(pruned):
    report = accelerate(load(str(pruned)), policy="sparse", tokens=[1, 4])
    assert_frozen(report)
    data = report.to_json()
    assert keys(data) == ACCELERATE and keys(data["layers"][0]) == LAYER
    assert data["replaced"] == report.replaced == sum(1 for layer in report.layers if layer.replaced) > 0
    generated = generate(str(pruned), "Hello", 3, policy="sparse")
    assert keys(generated.to_json()) == GENERATE and keys(generated.to_json()["report"]) == ACCELERATE
    assert keys(cli_json("run", str(pruned), "--prompt", "Hello", "--max-new-tokens", "3", "--policy", "sparse")) == RUN_CLI


def test_bench_result_and_cli(pruned, bert):
    result = bench(str(pruned), tokens=[4], rounds=1, steps=1, threads=1, policy="sparse")
    assert_frozen(result)
    data = result.to_json()
    assert keys(data) == BENCH and keys(data["prefill"][0]) == SPEED_ROW and keys(data["decode"]) == DECODE_ROW
    assert keys(data["layers"]) == BENCH_LAYERS and keys(data["size"]) == BENCH_SIZE
    assert keys(data["per_layer"][0]) == LAYER
    assert result.prefill[0].tokens == 4 and result.decode.steps == 1
    found = speedups(json.loads(json.dumps(data)))  # how the study report reads a stored bench row
    assert (found["prefill 4 tokens"].median, found["prefill 4 tokens"].low) == (
        result.prefill[0].speedup, result.prefill[0].speedup_low
    )
    assert (found["decode"].high, found["decode"].within_noise) == (result.decode.speedup_high, result.decode.within_noise)
    encoder = bench(str(bert), tokens=[4], rounds=1, steps=1, threads=1, measure_size=False).to_json()
    assert keys(encoder) == [k for k in BENCH if k != "size"] and encoder["decode"] is None
    cli = cli_json("bench", str(pruned), "--tokens", "4", "--rounds", "1", "--threads", "1", "--policy", "sparse")
    assert keys(cli) == BENCH and keys(cli["prefill"][0]) == SPEED_ROW and keys(cli["decode"]) == DECODE_ROW
