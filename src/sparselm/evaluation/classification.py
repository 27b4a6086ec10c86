"""Sentence and sentence-pair classification for every architecture: the family's own head, or a mean-pooled one.

Models whose family has a `*ForSequenceClassification` class in transformers use it (decoders get a pad token so
the last real token can be found). Families without one (Pegasus) get `MeanPooledClassifier`: a linear layer over
the mean of the encoder's last hidden states, padding excluded, saved next to the model as
`mean_pooled_head.safetensors`. Accuracy and F1 are computed here exactly: the `evaluate` library fetches its metric
scripts from the hub, which fails offline, and the two formulas are short.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..models import input_device
from ..errors import SparselmError
from ..models import load, quiet_transformers
from ..progress import SILENT, Progress
from ..sources import read_provenance, resolve
from .loop import forward_batches
from .objectives import load_text_tokenizer
from .tasks import ClassificationTask, Example

MEAN_POOLED_HEAD = "mean_pooled_head.safetensors"
MEAN_POOLED_CONFIG = "mean_pooled_head.json"
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class Scores:
    """Accuracy and F1 over `examples` examples."""

    accuracy: float
    f1: float
    examples: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MeanPooledClassifier(nn.Module):
    """A classification head over the mean of a text encoder's last hidden states (padding excluded)."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_labels = num_labels
        hidden = _hidden_size(backbone.config)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(hidden, num_labels)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def encoder(self) -> nn.Module:
        return self.backbone.get_encoder() if getattr(self.config, "is_encoder_decoder", False) else self.backbone

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, out: Path) -> None:
        self.backbone.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(Path(out) / MEAN_POOLED_HEAD))
        (Path(out) / MEAN_POOLED_CONFIG).write_text(json.dumps({"num_labels": self.num_labels}) + "\n")


def _hidden_size(config: Any) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise SparselmError(f"cannot tell the hidden size of a {config.model_type} model, so no classification head fits")


@dataclass(frozen=True)
class LoadedClassifier:
    model: nn.Module
    tokenizer: Any
    head: str  # "sequence-classification" or "mean-pooled"
    head_trained: bool


def has_sequence_classification(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES


def load_classifier(model_or_dir: str, task: ClassificationTask, seed: int = 0) -> LoadedClassifier:
    """The model with a head for `task`; a head that was not fine-tuned on the task is newly (seeded) initialised."""
    from transformers import AutoConfig

    source = resolve(model_or_dir)
    config = AutoConfig.from_pretrained(source.path)
    finetuned_on = read_provenance(source.path).get("finetuned_task")
    torch.manual_seed(seed)
    if (source.path / MEAN_POOLED_HEAD).is_file():
        model, trained = _load_mean_pooled(model_or_dir, source.path, task)
        head = "mean-pooled"
        trained = trained and finetuned_on in (None, task.name)
    elif has_sequence_classification(config.model_type):
        archs = getattr(config, "architectures", None) or []
        trained = any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == task.num_labels
        trained = trained and finetuned_on in (None, task.name)
        with quiet_transformers():  # the new head is expected: `trained` records it
            model = load(
                model_or_dir, head="sequence-classification", ignore_mismatched_sizes=True,
                config_overrides={"num_labels": task.num_labels},
            )
        head = "sequence-classification"
    else:
        model = MeanPooledClassifier(_text_backbone(model_or_dir), task.num_labels)
        head, trained = "mean-pooled", False
    tokenizer = load_text_tokenizer(model_or_dir)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedClassifier(model.eval(), tokenizer, head, trained)


def _load_mean_pooled(model_or_dir: str, path: Path, task: ClassificationTask) -> tuple[nn.Module, bool]:
    saved_labels = json.loads((path / MEAN_POOLED_CONFIG).read_text())["num_labels"]
    model = MeanPooledClassifier(_text_backbone(model_or_dir), task.num_labels)
    if saved_labels != task.num_labels:
        return model, False
    model.classifier.load_state_dict(load_file(str(path / MEAN_POOLED_HEAD)))
    return model, True


def _text_backbone(model_or_dir: str) -> nn.Module:
    """The base model, if it (or its encoder) reads token ids and returns hidden states; else no head can work."""
    backbone = load(model_or_dir, head="base")
    encoder = backbone.get_encoder() if getattr(backbone.config, "is_encoder_decoder", False) else backbone
    if "input_ids" not in inspect.signature(encoder.forward).parameters:
        raise SparselmError(
            f"'{model_or_dir}' ({type(backbone).__name__}) has no sequence-classification head and no text encoder "
            "to put one on; classification tasks need a text model"
        )
    return backbone


def uses_segment_ids(model: nn.Module) -> bool:
    """Whether the model has segment (token type) embeddings, as BERT does to tell a pair's two sentences apart.

    GPT-2 also accepts `token_type_ids` but looks them up in its word embeddings, so they are passed only here.
    """
    return (getattr(model.config, "type_vocab_size", None) or 0) > 1


def encode(
    tokenizer: Any, examples: list[Example], max_length: int = DEFAULT_MAX_LENGTH, segment_ids: bool = False
) -> list[dict[str, Any]]:
    """Token ids per example (truncated to `max_length`), with labels, ready for a padding collator.

    With `segment_ids` (see `uses_segment_ids`) the tokenizer's token type ids are kept too.
    """
    rows = []
    for ex in examples:
        enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_length)
        row = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": ex.label}
        if segment_ids and "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"]
        rows.append(row)
    return rows


def classify(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    num_labels: int,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: Progress = SILENT,
) -> Scores:
    """Accuracy and F1 (binary F1 of label 1 for two labels, macro F1 otherwise) of the model's predictions."""
    from transformers import DataCollatorWithPadding

    if not examples:
        raise SparselmError("the task has no examples for this split; choose another --split")
    collate = DataCollatorWithPadding(tokenizer)
    rows = encode(tokenizer, examples, max_length, uses_segment_ids(model))
    device = input_device(model)
    predictions: list[int] = []
    for batch in forward_batches(model, len(rows), batch_size, f"classifying {len(rows)} examples", progress):
        inputs = collate([{k: v for k, v in r.items() if k != "labels"} for r in rows[batch]])
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        predictions.extend(logits.argmax(dim=-1).tolist())
    references = [ex.label for ex in examples]
    return Scores(**scores(predictions, references, num_labels), examples=len(examples))


def scores(predictions: list[int], references: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and F1 as GLUE reports them: binary F1 of the positive class, macro F1 for more classes."""
    accuracy = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)
    if num_labels == 2:
        return {"accuracy": accuracy, "f1": _f1(predictions, references, 1)}
    present = sorted(set(predictions) | set(references))  # as scikit-learn's macro average: classes seen
    return {"accuracy": accuracy, "f1": sum(_f1(predictions, references, c) for c in present) / len(present)}


def _f1(predictions: list[int], references: list[int], positive: int) -> float:
    tp = sum(p == positive and r == positive for p, r in zip(predictions, references, strict=True))
    fp = sum(p == positive and r != positive for p, r in zip(predictions, references, strict=True))
    fn = sum(p != positive and r == positive for p, r in zip(predictions, references, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
