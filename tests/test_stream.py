"""Pruning block by block from disk (`prune --max-memory`), evaluation with offloaded weights (`eval --max-memory`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_model
from sparselm.cli import app
from sparselm.errors import SparselmError
from sparselm.evaluation import evaluate
from sparselm.facts import SPARSITY_JSON, format_size, parse_size
from sparselm.pruning import prune_to_dir, settings_from
from sparselm.pruning.stream import ShardStream
from test_cli_prune import TEXT, char_tokenizer, text_file  # noqa: F401 (text_file is a fixture)

TIMINGS = ("seconds", "calibration_seconds")


@pytest.fixture
def sharded(tmp_path: Path):
    """A tiny model of a family with a tokenizer, saved in several safetensors shards."""

    def make(family: str) -> Path:
        path = tmp_path / f"sharded-{family}"
        tiny_model(family).save_pretrained(path, max_shard_size="20KB")
        char_tokenizer().save_pretrained(path)
        assert len(list(path.glob("*.safetensors"))) > 2
        return path

    return make


@pytest.fixture
def calib(text_file: Path) -> str:
    return f"text:{text_file}"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMINGS}


CASES = [
    ("llama", dict(method="magnitude")),
    ("gpt2", dict(method="magnitude", scope="global")),
    ("t5", dict(method="magnitude", scope="global")),
    ("bert", dict(method="wanda")),
    ("gpt2", dict(method="wanda", pattern="2:4")),
    ("opt", dict(method="sparsegpt")),
    ("bart", dict(method="sparsegpt")),
    ("t5", dict(method="wanda", pattern="2:4")),
    ("llama", dict(method="wanda", allocation="owl")),
    ("llama", dict(method="magnitude", reconstruct=True, reconstruct_epochs=1)),
]


@pytest.mark.parametrize(("family", "fields"), CASES, ids=[f"{f}-{'-'.join(map(str, d.values()))}" for f, d in CASES])
def test_streamed_prune_is_bit_identical_to_in_memory(sharded, calib, tmp_path, family, fields):
    model = sharded(family)
    settings = settings_from(sparsity=0.5, calib=calib, calib_samples=4, calib_seqlen=16, **fields)
    memory = prune_to_dir(str(model), settings, tmp_path / "memory")
    streamed = prune_to_dir(str(model), settings, tmp_path / "streamed", max_memory=10**9)
    dense, a, b = tensors(model), tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert set(b) == set(dense)  # the checkpoint's own names, tied heads not duplicated
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    pruned = [n for n in a if not torch.equal(a[n], dense[n].float())]
    assert pruned and all(".0." in n or ".1." in n for n in pruned)  # only block matrices were pruned
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    on_disk = json.loads((tmp_path / "streamed" / SPARSITY_JSON).read_text())
    assert without_timings(on_disk) == without_timings(memory.to_json())
    assert without_timings(streamed.to_json()) == without_timings(memory.to_json())


def test_too_small_limit_names_the_smallest_that_works(sharded, calib, tmp_path):
    model = sharded("llama")
    out = tmp_path / "out"
    args = ["prune", str(model), "--out", str(out), "--method", "wanda", "--calib", calib, "--calib-samples", "4",
            "--calib-seqlen", "16"]
    result = CliRunner().invoke(app, [*args, "--max-memory", "1MB"])
    assert result.exit_code != 0
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "--max-memory 1MB" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", model.name]
    smallest = re.search(r"use --max-memory (\S+) or more", message).group(1)
    ok = CliRunner().invoke(app, [*args, "--max-memory", smallest, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (out / "model.safetensors.index.json").is_file()


def test_a_run_killed_mid_way_leaves_nothing(sharded, tmp_path, monkeypatch):
    model = sharded("llama")
    unload = ShardStream.unload
    seen: list[str] = []

    def fail_on_second(self, ref):
        seen.append(ref.name)
        if len(seen) == 2:
            raise KeyboardInterrupt
        unload(self, ref)

    monkeypatch.setattr(ShardStream, "unload", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        prune_to_dir(str(model), settings_from(method="magnitude", sparsity=0.5), tmp_path / "out", max_memory=10**9)
    assert seen == ["model.layers.0", "model.layers.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]


def test_packed_or_renamed_checkpoints_are_refused_before_work(tmp_path):
    with pytest.raises(SparselmError, match="no safetensors weights"):
        (tmp_path / "m").mkdir()
        tiny_model("llama").config.save_pretrained(tmp_path / "m")
        prune_to_dir(str(tmp_path / "m"), settings_from(method="magnitude"), tmp_path / "out", max_memory=10**9)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("200MB", 200 * 10**6), ("1.5GB", 1_500_000_000), ("2GiB", 2 * 2**30), ("512000", 512000), ("64 kb", 64000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-1GB", "2XB", "0"])
def test_parse_size_refuses_non_sizes(text):
    with pytest.raises(SparselmError, match="--max-memory"):
        parse_size(text)


def test_format_size_rounds_up():
    assert format_size(1) == "1MB" and format_size(10**6) == "1MB" and format_size(10**6 + 1) == "2MB"
    assert format_size(12_340_000_001) == "12.4GB"


def test_eval_with_offloaded_weights_matches_in_memory(sharded, tmp_path):
    model = sharded("llama")
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    memory = evaluate(str(model), f"text:{text}", seqlen=32, device=torch.device("cpu"))
    offloaded = evaluate(str(model), f"text:{text}", seqlen=32, device=torch.device("cpu"), max_memory=20_000)
    assert offloaded.metrics.token_ppl == pytest.approx(memory.metrics.token_ppl, rel=1e-5)
    assert offloaded.metrics.word_ppl == pytest.approx(memory.metrics.word_ppl, rel=1e-5)
    assert offloaded.sparsity == pytest.approx(memory.sparsity)


def test_eval_max_memory_cli(sharded, tmp_path):
    model = sharded("llama")
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    base = ["eval", str(model), "--task", f"text:{text}", "--seqlen", "32", "--device", "cpu", "--json"]
    memory = CliRunner().invoke(app, base)
    offloaded = CliRunner().invoke(app, [*base, "--max-memory", "20KB"])
    assert memory.exit_code == 0 and offloaded.exit_code == 0, offloaded.output
    a, b = json.loads(memory.stdout), json.loads(offloaded.stdout)
    assert b["token_ppl"] == pytest.approx(a["token_ppl"], rel=1e-5)


def test_device_cuda_without_gpu_is_one_clear_error(sharded, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(app, ["prune", str(sharded("llama")), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code != 0 and "--device cuda" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_streamed_prune_on_gpu_matches_cpu_sparsity(sharded, calib, tmp_path):
    model = sharded("llama")
    settings = settings_from(method="wanda", sparsity=0.5, calib=calib, calib_samples=4, calib_seqlen=16)
    cpu = prune_to_dir(str(model), settings, tmp_path / "cpu", max_memory=10**9)
    gpu = prune_to_dir(str(model), settings, tmp_path / "gpu", max_memory=10**9, device=torch.device("cuda"))
    assert [r["zeros"] for r in gpu.report.matrices] == [r["zeros"] for r in cpu.report.matrices]


def test_a_model_bigger_than_available_memory_is_streamed_with_a_note(tmp_path, monkeypatch):
    import transformers

    from sparselm.pruning import stream

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, vocab_size=96,
    )
    path = tmp_path / "eight-blocks"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size="20KB")
    weights = stream.weights_bytes(path, str(path))
    monkeypatch.setattr(stream, "available_memory", lambda: weights - 1)
    monkeypatch.setattr(stream, "WORK_BYTES", 0)
    settings = settings_from(method="magnitude", sparsity=0.5)
    streamed = prune_to_dir(str(path), settings, tmp_path / "auto")
    assert streamed.report.notes[0].startswith("the model's weights (")
    assert "pruned block by block from disk" in streamed.report.notes[0]
    assert (tmp_path / "auto" / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(stream, "available_memory", lambda: weights)
    memory = prune_to_dir(str(path), settings, tmp_path / "memory")
    assert memory.report.notes == [] and not (tmp_path / "memory" / "model.safetensors.index.json").exists()
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "auto")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_disk_batches_read_back_what_was_written_and_leave_no_file(tmp_path):
    from sparselm.pruning.stream import DiskBatches

    held = DiskBatches(tmp_path, torch.device("cpu"))
    first, second = torch.randn(3, 4, 5), torch.randn(1, 4, 5)
    held.append(first)
    held.append(second)
    assert len(held) == 2 and list(tmp_path.iterdir()) == []  # an unnamed file: nothing to clean up
    replaced = torch.randn(3, 4, 5)
    held[0] = replaced
    assert torch.equal(held[0], replaced) and torch.equal(held[1], second)
    assert [t.shape for t in held] == [first.shape, second.shape]
    with pytest.raises(AssertionError, match="changes from"):
        held[1] = torch.randn(2, 4, 5)


def _plan(model_path: Path, settings):
    from sparselm.models import Checkpoint, empty_model, load_config, model_class
    from sparselm.pruning.stream import _resident_names, memory_plan

    config = load_config(model_path, str(model_path))
    model = empty_model(model_class("auto", config), config)
    checkpoint = Checkpoint.open(model_path, str(model_path))
    return memory_plan(model, checkpoint, settings, _resident_names(model, checkpoint, str(model_path)))


def test_hidden_states_that_do_not_fit_go_to_disk_with_bit_identical_weights(sharded, calib, tmp_path, monkeypatch):
    from sparselm import calibration
    from sparselm.pruning import stream

    monkeypatch.setattr(calibration, "BATCH_TOKENS", 32)  # 2 windows of 16 tokens a batch: 4 batches, both runs
    model = sharded("llama")
    settings = settings_from(method="wanda", sparsity=0.5, calib=calib, calib_samples=8, calib_seqlen=16)
    plan = _plan(model, settings)
    window = 16 * 32 * 4  # seqlen × hidden size × float32
    assert (plan.activations, plan.batch) == (8 * window, 2 * window)
    assert plan.on_disk == plan.in_memory - 8 * window + 2 * 2 * window
    written: list[tuple[int, ...]] = []
    append = stream.DiskBatches.append
    monkeypatch.setattr(stream.DiskBatches, "append", lambda self, t: (written.append(tuple(t.shape)), append(self, t)))
    memory = prune_to_dir(str(model), settings, tmp_path / "memory")
    streamed = prune_to_dir(str(model), settings, tmp_path / "streamed", max_memory=plan.on_disk)
    assert written == [(2, 16, 32)] * 4  # the first block's inputs, batch by batch, went to disk
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert without_timings(streamed.to_json()) == without_timings(memory.to_json())
    written.clear()
    prune_to_dir(str(model), settings, tmp_path / "in-memory", max_memory=plan.in_memory)
    assert written == []  # at the in-memory need the hidden states stay in memory
    files = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("streamed", "in-memory")]
    assert files[0] == files[1]  # the activations' file left nothing behind


def test_only_a_limit_below_one_block_and_one_batch_is_refused(sharded, calib, tmp_path, monkeypatch):
    from sparselm import calibration

    monkeypatch.setattr(calibration, "BATCH_TOKENS", 32)
    model = sharded("llama")
    settings = settings_from(method="wanda", sparsity=0.5, calib=calib, calib_samples=8, calib_seqlen=16)
    plan = _plan(model, settings)
    assert plan.needed == plan.on_disk < plan.in_memory
    assert plan.hidden_on_disk(plan.on_disk) and not plan.hidden_on_disk(plan.in_memory)
    with pytest.raises(SparselmError, match=f"use --max-memory {re.escape(format_size(plan.on_disk))} or more$"):
        plan.hidden_on_disk(plan.on_disk - 1)
    with pytest.raises(SparselmError, match="below what pruning one block at a time needs"):
        prune_to_dir(str(model), settings, tmp_path / "out", max_memory=plan.on_disk - 1)
    assert not (tmp_path / "out").exists()
    rebuilt = _plan(model, settings_from(method="magnitude", sparsity=0.5, calib=calib, calib_samples=8,
                                         calib_seqlen=16, reconstruct=True, reconstruct_epochs=1))
    assert rebuilt.needed == rebuilt.in_memory  # reconstruction keeps its streams in memory: no disk fallback
    with pytest.raises(SparselmError, match=re.escape(format_size(rebuilt.in_memory))):
        rebuilt.hidden_on_disk(rebuilt.in_memory - 1)


def test_tensors_outside_blocks_are_freed_while_blocks_are_worked_on(calib, tmp_path, monkeypatch):
    """An untied head is never read while blocks are pruned, the embeddings only row by row while capturing, and
    the result is still the in-memory one."""
    import transformers

    from conftest import tiny_config
    from sparselm import calibration
    from sparselm.models import Checkpoint

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = False
    path = tmp_path / "untied"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size="20KB")
    char_tokenizer().save_pretrained(path)
    seen: list[tuple[str, bool, bool]] = []
    reads: list[tuple[str, int]] = []

    def state(stage: str, model: torch.nn.Module) -> None:
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        seen.append((stage, embed.is_meta, head.is_meta))

    capture, unload, rows = calibration.capture, ShardStream.unload, Checkpoint.rows

    capturing_now: list[bool] = []

    def capturing(model, *args, **kwargs):
        state("capture", model)
        capturing_now.append(True)
        try:
            return capture(model, *args, **kwargs)
        finally:
            capturing_now.pop()

    def unloading(self, ref):
        state("block", self.model)
        unload(self, ref)

    def reading(self, name, ids, device):  # the last shard's copy reads rows too: only a capture's reads count
        if capturing_now:
            reads.append((name, len(ids)))
        return rows(self, name, ids, device)

    monkeypatch.setattr(calibration, "capture", capturing)
    monkeypatch.setattr(ShardStream, "unload", unloading)
    monkeypatch.setattr(Checkpoint, "rows", reading)
    settings = settings_from(method="wanda", sparsity=0.5, calib=calib, calib_samples=4, calib_seqlen=16)
    streamed = prune_to_dir(str(path), settings, tmp_path / "streamed", max_memory=10**9)
    assert seen == [("capture", True, True)] + [("block", True, True)] * config.num_hidden_layers
    assert reads and {name for name, _ in reads} == {"model.embed_tokens.weight"}
    assert all(0 < count < config.vocab_size for _, count in reads)  # only the rows the windows use
    memory = prune_to_dir(str(path), settings, tmp_path / "memory")
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert "lm_head.weight" in b and without_timings(streamed.to_json()) == without_timings(memory.to_json())


def test_a_streamed_run_trims_freed_memory_only_once_it_adds_up(sharded, calib, tmp_path, monkeypatch):
    """Each block call and each matrix pruned settles: the heap is trimmed when the resident set grew by more than
    SETTLE_SLACK since the last trim, not after every step (trimming costs page faults later); the per-call hooks
    are gone once the block is unloaded; the weights are the in-memory run's."""
    from sparselm.pruning import stream

    model = sharded("llama")
    settings = settings_from(method="wanda", sparsity=0.5, calib=calib, calib_samples=4, calib_seqlen=16)
    prune_to_dir(str(model), settings, tmp_path / "memory")
    grown = iter(range(0, 10**15, stream.SETTLE_SLACK // 3))  # the resident set grows a third of the slack per look
    settles, trims = [], []
    settle, unload = ShardStream.settle, ShardStream.unload
    monkeypatch.setattr(stream, "resident_bytes", lambda: next(grown))
    monkeypatch.setattr(stream, "free_heap", lambda: trims.append(bool(settles) and settles[-1] == "open"))

    def counting(self):
        settles.append("open")
        settle(self)
        settles[-1] = "done"

    def unloading(self, ref):
        unload(self, ref)
        assert not ref.module._forward_hooks  # the settling hook left with the block

    monkeypatch.setattr(ShardStream, "settle", counting)
    monkeypatch.setattr(ShardStream, "unload", unloading)
    prune_to_dir(str(model), settings, tmp_path / "streamed", max_memory=10**9)
    blocks = tiny_model("llama").config.num_hidden_layers
    assert len(settles) >= 7 * blocks + 2 * blocks  # every matrix pruned and at least two block calls per block
    by_settle = sum(trims)
    assert 0 < by_settle < len(settles) / 2  # every few steps: growth of the slack takes more than three looks
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
