"""Tiny real models with real tokenizers, a tiny study over them, and result comparisons, for tests/test_study_*.py."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import transformers
from conftest import tiny_config

from sparselm.data import joined_text
from sparselm.models import load_tokenizer
from sparselm.study.config import StudyConfig, load_config
from sparselm.study.run import run_study
from sparselm.study.store import ResultStore, Row


def tiny_model_dir(root: Path, family: str, alias: str) -> Path:
    """A 2-block random model of `family` sized to the embedded model's tokenizer, saved with that tokenizer."""
    out = root / f"tiny-{family}"
    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(alias)
    config = tiny_config(family)
    config.vocab_size = len(tokenizer)
    if family == "llama":
        config.tie_word_embeddings = True
        config.pad_token_id = tokenizer.pad_token_id
        config.max_position_embeddings = 256
    cls = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModel
    transformers.set_seed(0)
    cls.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_study_yaml(root: Path, name: str = "study", **overrides: str) -> Path:
    """A study over a tiny Llama and a tiny BERT, with budgets that keep every cell around a second.

    Calibration and perplexity read small slices of PTB's training and test text through `text:` so that no cell
    tokenises a whole corpus; everything else (pruning, perplexity, fine-tuning, packing, benchmarking) runs as in the real study.
    """
    root.mkdir(parents=True, exist_ok=True)
    decoder = tiny_model_dir(root, "llama", "smollm2-135m")
    encoder = tiny_model_dir(root, "bert", "minilm-l6")
    calib, held_out = root / "calib.txt", root / "held-out.txt"
    if not held_out.exists():
        calib.write_text(joined_text("ptb", "train")[:20000], encoding="utf-8")
        held_out.write_text(joined_text("ptb", "test")[:6000], encoding="utf-8")
    sections = {
        "analyze": "true",
        "sparsities": "[0, 0.5]",
        "methods": "[{method: magnitude}, {method: wanda}]",
        "decoder_tasks": f"['text:{held_out}']",
        "encoder_tasks": "[wiki-pair]",
        "size": "{enabled: true}",
        "runtime": "{enabled: true, tokens: [8], threads: 1, rounds: 1, steps: 2}",
        **overrides,
    }
    text = textwrap.dedent(
        f"""\
        name: tiny
        analyze: {sections['analyze']}
        models:
          - name: {decoder}
            tasks: {sections['decoder_tasks']}
          - name: {encoder}
            tasks: {sections['encoder_tasks']}
        methods: {sections['methods']}
        sparsities: {sections['sparsities']}
        calibration: {{source: "text:{calib}", samples: 2, seqlen: 32}}
        perplexity: {{seqlen: 32, max_windows: 2, batch_size: 2}}
        classification: {{max_examples: 16, batch_size: 8}}
        finetune: {{max_steps: 2, batch_size: 4, max_examples: 16}}
        size: {sections['size']}
        runtime: {sections['runtime']}
        resources: {{prune: {{cpus: 2}}}}
        """
    )
    path = root / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def reference_study(root: Path) -> tuple[StudyConfig, Path]:
    """The tiny study run once, uninterrupted, in this process (reused by every test that compares with it)."""
    config = load_config(tiny_study_yaml(root))
    out = root / "reference"
    if not (out / "report.html").is_file():
        summary = run_study(config, out)
        assert not summary.failed, summary.failed
    return config, out


# Metrics that must agree between two runs of the same study; timings (bench, seconds) naturally differ.
EXACT = {"prune": ("achieved_sparsity", "pruned_weights"), "pack": ("packed_bytes", "dense_bytes")}
CLOSE = {"perplexity": ("token_ppl", "word_ppl"), "classification": ("accuracy", "f1"), "analyze": ("median_abs",)}


def comparable(rows: list[Row]) -> dict[tuple, dict[str, Any]]:
    """Each cell's key mapped to the metrics two runs of one study must reproduce."""
    out = {}
    for r in rows:
        keep = EXACT.get(r.kind, ()) + CLOSE.get(r.kind, ())
        out[r.key] = {k: r.metrics.get(k) for k in keep}
    return out


def assert_same_results(a: Path, b: Path) -> None:
    rows_a, rows_b = ResultStore.open_existing(a).rows(), ResultStore.open_existing(b).rows()
    assert all(r.status == "ok" for r in rows_a + rows_b), [r.error for r in rows_a + rows_b if r.error]
    got_a, got_b = comparable(rows_a), comparable(rows_b)
    assert got_a.keys() == got_b.keys()
    for key, metrics in got_a.items():
        for name, value in metrics.items():
            other = got_b[key][name]
            if isinstance(value, float):
                assert math.isclose(value, other, rel_tol=1e-4), (key, name, value, other)
            else:
                assert value == other, (key, name, value, other)
