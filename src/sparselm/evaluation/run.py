"""`evaluate`: one entry point for every task and objective, returning a typed result with the settings used."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import joined_text, normalise_split, parse_source
from ..errors import SparselmError
from ..models import Checkpoint, offload_kwargs
from ..progress import SILENT, Progress
from ..sources import resolve
from ..weights import select_matrices, sparsity_of
from .classification import DEFAULT_MAX_LENGTH, Scores, classify, load_classifier
from .mlm import MaskedPerplexity, masked_perplexity
from .objectives import load_language_model
from .perplexity import Perplexity, model_context, perplexity
from .tasks import check_task, classification_task, is_classification


@dataclass(frozen=True)
class LMEvaluation:
    """Perplexities of a model on a text source; `to_json()` is what `sparselm eval --json` prints."""

    model: str
    task: str
    split: str
    objective: str
    metrics: Perplexity | MaskedPerplexity
    settings: dict[str, Any]
    sparsity: float
    quantized_from: str | None
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "task": self.task, "split": self.split, "objective": self.objective,
            **self.metrics.to_json(), "settings": self.settings, "sparsity": self.sparsity,
            "quantized_from": self.quantized_from, "notes": self.notes,
        }


@dataclass(frozen=True)
class ClassificationEvaluation:
    """Accuracy and F1 of a model on a classification task; `to_json()` is what `sparselm eval --json` prints."""

    model: str
    task: str
    split: str
    metrics: Scores
    settings: dict[str, Any]
    sparsity: float
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "task": self.task, "split": self.split, **self.metrics.to_json(),
            "settings": self.settings, "sparsity": self.sparsity, "notes": self.notes,
        }


Evaluation = LMEvaluation | ClassificationEvaluation


def evaluate(
    model_or_dir: str,
    task: str,
    *,
    split: str = "test",
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    objective: str = "clm",
    data_dir: Path | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    progress: Progress = SILENT,
    device: torch.device | None = None,
    max_memory: int | None = None,
) -> Evaluation:
    """Evaluate a model on a language-modelling source (perplexities) or a classification task (accuracy, F1).

    `device` defaults to the first GPU when there is one; `max_memory` (bytes, language modelling) loads the model
    with accelerate's big-model inference, the weights beyond it offloaded to disk, with the same numbers."""
    device = device or default_device()
    check_task(task)
    split = normalise_split(split)
    for flag, value in (("--batch-size", batch_size), ("--max-windows", max_windows), ("--max-examples", max_examples)):
        if value is not None and value < 1:
            raise SparselmError(f"{flag} must be at least 1, got {value}")
    if is_classification(task):
        if max_memory is not None:
            raise SparselmError("--max-memory applies to perplexity tasks; drop it for a classification task")
        return _evaluate_classification(
            model_or_dir, task, split, batch_size, data_dir, max_examples, seed, progress, device
        )
    with tempfile.TemporaryDirectory(prefix="sparselm-offload-") as folder:
        offload = offload_kwargs(max_memory, device, Path(folder)) if max_memory is not None else None
        return _evaluate_lm(
            model_or_dir, task, split, seqlen, max_windows, batch_size, objective, data_dir, seed, progress, device,
            offload,
        )


def _evaluate_lm(
    model_or_dir: str, task: str, split: str, seqlen: int | None, max_windows: int | None, batch_size: int,
    objective: str, data_dir: Path | None, seed: int, progress: Progress, device: torch.device,
    offload: dict[str, Any] | None,
) -> LMEvaluation:
    source = parse_source(task)
    text = joined_text(source, split, data_dir)
    lm = load_language_model(model_or_dir, objective, offload)
    if offload is None:
        lm.model.to(device)
    if objective == "mlm":
        metrics = masked_perplexity(lm.model, lm.tokenizer, text, seqlen, max_windows, batch_size, seed, progress)
    else:
        metrics = perplexity(lm.model, lm.tokenizer, text, seqlen, max_windows, batch_size, progress)
    return LMEvaluation(
        model=model_or_dir,
        task=source.describe(),
        split="whole file" if source.kind == "text" else split,
        objective=objective,
        metrics=metrics,
        settings={
            "join": source.join, "seqlen": metrics.seqlen, "max_windows": max_windows, "batch_size": batch_size,
            "data_dir": str(data_dir) if data_dir else None, "head": lm.head, "family": lm.family,
            "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        },
        sparsity=_sparsity(lm.model, model_or_dir) if offload else sparsity_of(select_matrices(lm.model)),
        quantized_from=lm.quantized_from,
        notes=lm.notes,
    )


def _evaluate_classification(
    model_or_dir: str, task: str, split: str, batch_size: int, data_dir: Path | None, max_examples: int | None,
    seed: int, progress: Progress, device: torch.device,
) -> ClassificationEvaluation:
    spec = classification_task(task)
    examples = spec.examples(split, data_dir, max_examples)
    loaded = load_classifier(model_or_dir, spec, seed)
    loaded.model.to(device)
    max_length = min(DEFAULT_MAX_LENGTH, model_context(loaded.model) or DEFAULT_MAX_LENGTH)
    metrics = classify(loaded.model, loaded.tokenizer, examples, spec.num_labels, batch_size, max_length, progress)
    notes = [] if loaded.head_trained else [
        f"the {loaded.head} head was not fine-tuned on {task}: it is randomly initialised (seed {seed}), so these "
        f"numbers are a chance baseline; fine-tune first with `sparselm finetune MODEL --task {task}`"
    ]
    return ClassificationEvaluation(
        model=model_or_dir,
        task=task,
        split=spec.split_used(split),
        metrics=metrics,
        settings={
            "max_examples": max_examples, "batch_size": batch_size, "max_length": max_length, "head": loaded.head,
            "head_trained": loaded.head_trained, "num_labels": spec.num_labels, "seed": seed,
            "data_dir": str(data_dir) if data_dir else None,
        },
        sparsity=sparsity_of(select_matrices(_backbone(loaded.model))),
        notes=notes,
    )


def _sparsity(model: torch.nn.Module, model_or_dir: str) -> float:
    """The sparsity of an offloaded model's matrices (on the meta device in the model), read from its weight files."""
    matrices = select_matrices(model)
    checkpoint = Checkpoint.open(resolve(model_or_dir).path, model_or_dir)
    zeros = total = 0
    for name in (m.name for m in matrices if m.name in checkpoint.files):  # one matrix in memory at a time
        weight = checkpoint.read([name], torch.device("cpu"))[name]
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    return zeros / max(1, total)


def default_device() -> torch.device:
    """The first GPU when there is one (the model is loaded on the CPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backbone(model: Any) -> Any:
    return getattr(model, "backbone", model)
