"""What activation-quantised int8 (`w8a8`) costs in perplexity, measured before it is offered.

Weight-only int8 keeps quality (the activations stay as loaded); quantising the activations too is lossy wherever a
few channels carry outliers: one scale for all of a call's activations leaves the other channels a handful of levels
(on smollm2-135m, PTB perplexity 56.8 becomes 150–170). So w8a8 is measured on the model at hand: token perplexity
(SparseGPT/Wanda protocol) of the model as given and of its w8a8 version on the first WINDOWS windows of the PTB test
text, tokenised by the model's own tokenizer; `bench` and `generate` show the change and refuse w8a8 above
MAX_PERPLEXITY_CHANGE. The check lives here only.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data import joined_text
from ..errors import SparselmError
from ..evaluation.perplexity import perplexity
from ..facts import context_length, has_tokenizer, is_causal_lm
from ..progress import SILENT, Progress
from ..sources import resolve
from .accelerate import accelerate

MAX_PERPLEXITY_CHANGE = 0.02
WINDOWS = 4
MAX_SEQLEN = 512
CHARS_PER_TOKEN = 8  # a prefix of the text this long holds the windows (English averages ~4 characters per token)


@dataclass(frozen=True)
class QualityCheck:
    """Token perplexity of the model as given and in w8a8 on the same windows, and whether the change is allowed."""

    reference_ppl: float
    w8a8_ppl: float
    source: str
    windows: int
    seqlen: int

    @property
    def change(self) -> float:
        """The relative perplexity change of w8a8 (0.05: 5% higher)."""
        return self.w8a8_ppl / self.reference_ppl - 1.0

    @property
    def acceptable(self) -> bool:
        return self.change <= MAX_PERPLEXITY_CHANGE

    def describe(self) -> str:
        return (f"w8a8 changes perplexity by {self.change:+.1%} ({self.w8a8_ppl:.2f} vs {self.reference_ppl:.2f} as "
                f"given, {self.windows} windows of {self.seqlen} tokens of {self.source} text)")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "change": self.change, "max_change": MAX_PERPLEXITY_CHANGE,
                "acceptable": self.acceptable}


def require_measurable(model_or_dir: str | Path) -> None:
    """Refuse w8a8, before loading weights, for a model whose perplexity cannot be measured (not a causal LM, or
    without a tokenizer): it is offered only with its measured cost."""
    from transformers import AutoConfig

    path = resolve(str(model_or_dir)).path
    if not is_causal_lm(AutoConfig.from_pretrained(path)):
        raise SparselmError(
            f"--dtype w8a8 is offered only with its measured perplexity change, and '{model_or_dir}' is not a causal "
            "language model to measure it on; use --dtype int8 (weight-only) or bf16"
        )
    if not has_tokenizer(path):
        raise SparselmError(
            f"--dtype w8a8 is offered only with its measured perplexity change, and '{model_or_dir}' has no tokenizer "
            "to measure it with; save one next to the model (tokenizer.save_pretrained(DIR)) or use --dtype int8"
        )


def w8a8_model(model: nn.Module) -> nn.Module:
    """A copy of `model` computing every prunable matrix in dense w8a8 (the model itself is not changed)."""
    quantised = copy.deepcopy(model)
    accelerate(quantised, "dense", use_cache=False, fuse=False, dtype="w8a8")
    return quantised


def w8a8_check(
    model: nn.Module, quantised: nn.Module, tokenizer: Any, text: str | None = None, progress: Progress = SILENT
) -> QualityCheck:
    """Perplexity of `model` and of `quantised` (its w8a8 version) on the first WINDOWS windows of at most
    MAX_SEQLEN tokens of `text` (default: the PTB test text); only the prefix that can hold them is tokenised."""
    source = "PTB test" if text is None else "the given"
    seqlen = min(MAX_SEQLEN, context_length(model) or MAX_SEQLEN)
    text = (joined_text("ptb", "test") if text is None else text)[: WINDOWS * seqlen * CHARS_PER_TOKEN]
    progress.start("measuring the perplexity cost of w8a8", 2 * WINDOWS)
    reference = perplexity(model, tokenizer, text, seqlen, max_windows=WINDOWS, batch_size=1, progress=progress)
    changed = perplexity(quantised, tokenizer, text, seqlen, max_windows=WINDOWS, batch_size=1, progress=progress)
    return QualityCheck(reference.token_ppl, changed.token_ppl, source, reference.windows, seqlen)


def require_acceptable(check: QualityCheck) -> None:
    """Refuse w8a8 with the measured number when it costs more than MAX_PERPLEXITY_CHANGE."""
    if not check.acceptable:
        raise SparselmError(
            f"--dtype w8a8 refused: {check.describe()}, more than the {MAX_PERPLEXITY_CHANGE:.0%} allowed; use "
            "--dtype int8 (weight-only int8, activations unquantised) or bf16"
        )
