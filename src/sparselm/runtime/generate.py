"""`generate()`: text from a causal LM whose layers run on the kernels the dispatch chose (`sparselm run`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SparselmError
from ..facts import is_causal_lm
from ..models import load, load_tokenizer
from ..progress import SILENT, Progress
from ..sources import resolve
from . import quality
from .accelerate import AccelerateReport, DType, Policy, accelerate, check_settings

EXAMPLE_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Generation:
    """A greedy continuation and the accelerate report of the model that wrote it (with w8a8: its measured
    perplexity change)."""

    prompt: str
    completion: str
    report: AccelerateReport
    w8a8_quality: quality.QualityCheck | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "completion": self.completion, "report": self.report.to_json()}
        if self.w8a8_quality is not None:
            out["w8a8_quality"] = self.w8a8_quality.to_json()
        return out


def require_causal_lm(model_or_dir: str) -> None:
    """Refuse, before loading any weights, a model that cannot continue text (an encoder, a seq2seq model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(model_or_dir).path)
    if not is_causal_lm(config):
        kind = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise SparselmError(
            f"'{model_or_dir}' ({kind}) is not a causal language model, so it cannot generate text; "
            "use a decoder-only model such as smollm2-135m"
        )


def check_generation(
    model_or_dir: str, prompt: str, max_new_tokens: int, policy: str, threads: int | None, dtype: str = "fp32"
) -> None:
    """Every check generate() makes before loading weights (callers may run it before showing progress)."""
    if not prompt.strip():
        raise SparselmError(f"--prompt is empty: give the text to continue, e.g. --prompt '{EXAMPLE_PROMPT}'")
    if max_new_tokens < 1:
        raise SparselmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_settings(policy, threads, dtype)
    require_causal_lm(model_or_dir)
    if dtype == "w8a8":
        quality.require_measurable(model_or_dir)


def generate(
    model_or_dir: str,
    prompt: str,
    max_new_tokens: int = 32,
    policy: Policy = "auto",
    threads: int | None = None,
    remeasure: bool = False,
    progress: Progress = SILENT,
    dtype: DType = "fp32",
) -> Generation:
    """Greedy continuation of `prompt` by the accelerated model (computing in `dtype`), with the accelerate report.
    `w8a8` is measured first (runtime.quality) and refused when it changes perplexity by more than 2%."""
    check_generation(model_or_dir, prompt, max_new_tokens, policy, threads, dtype)
    lm = load(model_or_dir, head="causal-lm")
    tokenizer = load_tokenizer(model_or_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise SparselmError(f"--prompt {prompt!r} gives no tokens: give the text to continue, e.g. "
                            f"--prompt '{EXAMPLE_PROMPT}'")
    accelerated = copy.deepcopy(lm) if dtype == "w8a8" else lm  # w8a8 keeps the model as loaded to measure against
    report = accelerate(
        accelerated, policy, tokens=(1, ids.shape[1]), threads=threads, remeasure=remeasure, progress=progress,
        dtype=dtype,
    )
    check = None
    if dtype == "w8a8":
        check = quality.w8a8_check(lm, accelerated, tokenizer, progress=progress)
        quality.require_acceptable(check)
        lm = accelerated
    with torch.inference_mode():
        out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return Generation(prompt, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), report, check)
