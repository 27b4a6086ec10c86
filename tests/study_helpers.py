"""Tiny real models with real tokenizers, and tiny study configs, shared by the tests/test_study_*.py files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import transformers
from conftest import tiny_config

from sparselm.models import load_tokenizer


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


def tiny_study_yaml(decoder: Path, encoder: Path, **overrides: str) -> str:
    """A study over the two tiny models with budgets that make each cell take well under a second."""
    sections = {
        "sparsities": "[0, 0.5, 0.9]",
        "methods": "[{method: magnitude}, {method: wanda}]",
        "decoder_tasks": "[ptb]",
        "encoder_tasks": "[wiki-pair]",
        "size": "{enabled: true}",
        "runtime": "{enabled: true, tokens: [8], threads: 1}",
        **overrides,
    }
    return textwrap.dedent(
        f"""\
        name: tiny
        models:
          - name: {decoder}
            tasks: {sections['decoder_tasks']}
          - name: {encoder}
            tasks: {sections['encoder_tasks']}
        methods: {sections['methods']}
        sparsities: {sections['sparsities']}
        calibration: {{samples: 2, seqlen: 32}}
        perplexity: {{seqlen: 32, max_windows: 2, batch_size: 2}}
        classification: {{max_examples: 16, batch_size: 8}}
        finetune: {{max_steps: 2, batch_size: 4, max_examples: 16}}
        size: {sections['size']}
        runtime: {sections['runtime']}
        """
    )
