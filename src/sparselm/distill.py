"""Distillation with the mask kept: the pruned student learns to match its dense teacher on training text.

The target of recovery is the dense model's outputs on calibration/training text, never the next-token labels of
any text: the loss is KL(teacher ‖ student) on the logits at temperature T (times T², so that gradients keep their
size as T changes), plus, with `hidden_weight` w > 0, w × the SquareHead feature loss of Kurtic et al. 2023
("Sparse Fine-tuning for Inference Acceleration of Large Language Models"): for each block's output hidden state,
MSE(student, teacher) / MSE(teacher, 0), averaged over blocks (the paper sums them; the mean keeps w independent of
depth). Every position of the window is a target: both models predict the next token at each one.

The teacher is loaded once, frozen and in eval mode, in the student's dtype; it runs under `torch.no_grad` rather
than `inference_mode`, because the KL's gradient needs the teacher's probabilities saved for backward and tensors
made in inference mode cannot be. Teacher and student must be the same architecture (model_type), with the same
vocabulary size and the same tokenizer vocabulary; the hidden loss also needs equal hidden sizes and block counts.
`check_distillation` says which of these fails, in one line, before any weight is loaded.

`finetune(..., distillation=Distillation(teacher))` trains with `distillation_trainer`'s Trainer, the same as plain
fine-tuning with `SparsityCallback` keeping the pruned weights at zero. `TokenBudget` stops training after a number
of training tokens (any causal-LM fine-tuning, distilled or not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .errors import SparselmError
from .evaluation.objectives import load_language_model
from .evaluation.tasks import is_classification
from .facts import config_of, hidden_size
from .models import load_config, load_tokenizer
from .sources import resolve

DEFAULT_TEMPERATURE = 1.0
# Guards the SquareHead ratio against a teacher layer whose outputs are all zero.
NORM_FLOOR = 1e-12


@dataclass(frozen=True)
class Distillation:
    """What the student learns: `teacher`'s logits at `temperature`, and its hidden states × `hidden_weight`."""

    teacher: str
    temperature: float = DEFAULT_TEMPERATURE
    hidden_weight: float = 0.0

    def settings(self) -> dict[str, Any]:
        """The loss as recorded in finetune.json."""
        return {
            "teacher": self.teacher,
            "logit_loss": "kl(teacher||student)",
            "temperature": self.temperature,
            "hidden_loss": "squarehead" if self.hidden_weight > 0 else None,
            "hidden_weight": self.hidden_weight,
            "label_loss": None,
        }


def check_distillation(student: str, task: str, distillation: Distillation) -> None:
    """Refuse, in one line and before any weight is loaded, a teacher the student cannot be distilled from."""
    if is_classification(task):
        raise SparselmError(
            f"--teacher distils a causal LM on text, and '{task}' is a classification task; use --task ptb, wiki, "
            "wikitext2 or text:PATH"
        )
    if not distillation.temperature > 0 or not math.isfinite(distillation.temperature):
        raise SparselmError(f"--temperature must be a positive number, got {distillation.temperature}")
    if not distillation.hidden_weight >= 0 or not math.isfinite(distillation.hidden_weight):
        raise SparselmError(f"--hidden-weight must be zero or a positive number, got {distillation.hidden_weight}")
    teacher = distillation.teacher
    try:
        teacher_config = config_of(load_config(resolve(teacher).path, teacher))
    except SparselmError as exc:
        raise SparselmError(f"--teacher: {exc}") from None
    student_config = config_of(load_config(resolve(student).path, student))
    _check_same_architecture(student, student_config, teacher, teacher_config)
    _check_same_tokenizer(student, teacher)
    if distillation.hidden_weight > 0:
        _check_same_hidden_states(student_config, teacher, teacher_config)


def _check_same_architecture(student: str, student_config: Any, teacher: str, teacher_config: Any) -> None:
    if teacher_config.model_type != student_config.model_type:
        raise SparselmError(
            f"teacher '{teacher}' is a {teacher_config.model_type} model and student '{student}' a "
            f"{student_config.model_type} model; distil from a teacher of the same architecture (e.g. the dense "
            "model the student was pruned from)"
        )
    if teacher_config.vocab_size != student_config.vocab_size:
        raise SparselmError(
            f"teacher '{teacher}' has a vocabulary of {teacher_config.vocab_size} tokens and student '{student}' "
            f"{student_config.vocab_size}; distil from a teacher with the student's vocabulary"
        )


def _check_same_tokenizer(student: str, teacher: str) -> None:
    """The logits are compared position by position, so each id must mean the same token to both models."""
    student_vocab = load_tokenizer(student, required=True).get_vocab()
    try:
        teacher_vocab = load_tokenizer(teacher, required=True).get_vocab()
    except SparselmError as exc:
        raise SparselmError(f"--teacher: {exc}") from None
    if teacher_vocab != student_vocab:
        differ = sum(teacher_vocab.get(t) != student_vocab.get(t) for t in teacher_vocab.keys() | student_vocab.keys())
        raise SparselmError(
            f"the tokenizers of teacher '{teacher}' and student '{student}' map tokens to different ids "
            f"({differ} tokens differ); distil from a teacher with the student's tokenizer"
        )


def _check_same_hidden_states(student_config: Any, teacher: str, teacher_config: Any) -> None:
    widths = hidden_size(teacher_config), hidden_size(student_config)
    blocks = getattr(teacher_config, "num_hidden_layers", None), getattr(student_config, "num_hidden_layers", None)
    if widths[0] != widths[1] or blocks[0] != blocks[1]:
        raise SparselmError(
            f"--hidden-weight matches hidden states block by block, and teacher '{teacher}' has {blocks[0]} blocks of "
            f"width {widths[0]} where the student has {blocks[1]} of width {widths[1]}; use --hidden-weight 0"
        )


def load_teacher(distillation: Distillation, student: nn.Module) -> nn.Module:
    """The teacher as a causal LM, loaded as the student was, frozen, in eval mode and in the student's dtype."""
    teacher = load_language_model(distillation.teacher, "clm").model
    teacher.to(dtype=next(student.parameters()).dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² × the mean over positions (those where `keep` is set) of KL(softmax(teacher/T) ‖ softmax(student/T))."""
    student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(-1)
    return _mean_over_positions(per_position, keep) * temperature**2


def squarehead_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean over layers of MSE(student, teacher) / MSE(teacher, 0), each taken over the kept positions."""
    ratios = []
    for student, teacher in zip(student_hidden, teacher_hidden, strict=True):
        teacher = teacher.float()
        error = _mean_over_positions((student.float() - teacher).pow(2).mean(-1), keep)
        scale = _mean_over_positions(teacher.pow(2).mean(-1), keep)
        ratios.append(error / scale.clamp_min(NORM_FLOOR))
    return torch.stack(ratios).mean()


def _mean_over_positions(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The mean of a (batch, positions) tensor over the positions `keep` marks (all of them without one)."""
    if keep is None:
        return values.mean()
    weights = keep.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def distillation_trainer(teacher: nn.Module, distillation: Distillation) -> Callable[..., Any]:
    """A Trainer factory with the Trainer's signature, for `finetune`'s training loop: a Trainer whose loss is the
    distance to a frozen teacher's outputs; labels in the batch are never used. The class is built by this call, not
    at import, because `transformers.Trainer` pulls in `datasets`, which no other command needs."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
            inputs = {k: v for k, v in inputs.items() if k != "labels"}  # the target is the teacher, never the text
            hidden = distillation.hidden_weight > 0
            student = model(**inputs, output_hidden_states=hidden, use_cache=False)
            with torch.no_grad():  # not inference_mode: the KL's backward needs the teacher's probabilities
                outputs = self.teacher(**inputs, output_hidden_states=hidden, use_cache=False)
            keep = inputs.get("attention_mask")
            loss = kl_to_teacher(student.logits, outputs.logits, distillation.temperature, keep)
            if hidden:  # hidden_states[0] is the embedding output; one entry per block follows
                feature = squarehead_loss(student.hidden_states[1:], outputs.hidden_states[1:], keep)
                loss = loss + distillation.hidden_weight * feature
            return (loss, student) if return_outputs else loss

    return DistillationTrainer


def check_token_budget(task: str, max_tokens: int | None) -> None:
    if max_tokens is None:
        return
    if max_tokens < 1:
        raise SparselmError(f"--max-tokens must be at least 1, got {max_tokens}")
    if is_classification(task):
        raise SparselmError(f"--max-tokens budgets causal-LM training on text, and '{task}' is a classification task; "
                            "use --max-steps or --max-examples")


def budget_steps(max_tokens: int, windows: int, batch_size: int, seqlen: int) -> int:
    """Optimizer steps after which one process has seen at least `max_tokens` of `windows` windows of `seqlen`
    tokens, `batch_size` windows a step (the last batch of each epoch holds the windows left over)."""
    epochs, rest = divmod(max_tokens, windows * seqlen)
    return epochs * math.ceil(windows / batch_size) + math.ceil(rest / (batch_size * seqlen))


class TokenBudget(TrainerCallback):
    """Stops training at the end of the step in which the tokens seen (all processes together) reach `max_tokens`.

    Needs `TrainingArguments(include_num_input_tokens_seen="all")`. `budget_steps` is the step count that sets the
    learning-rate schedule; under several processes each step sees more tokens and this callback stops earlier.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (Trainer's signature)
        if state.num_input_tokens_seen >= self.max_tokens:
            control.should_training_stop = True
