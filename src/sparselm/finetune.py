"""Fine-tuning that keeps pruned weights pruned, on the Hugging Face Trainer (accelerate underneath).

The mask is the set of exact zeros of every weight matrix (`sparselm.weights.select_matrices`, embeddings and heads
included) when training starts. Three things keep those entries at zero, because any one alone can be defeated:

1. a gradient hook multiplies each masked weight's gradient by the mask, so pruned entries get no gradient (and do
   not count towards gradient clipping);
2. after every optimizer step the weight is multiplied by the mask, which undoes any drift from weight decay or
   numerical noise;
3. at the same moment the pruned entries of the optimizer's per-weight state (Adam's moments, SGD's momentum
   buffer) are zeroed, so momentum accumulated before a mask existed, or restored from a checkpoint, cannot revive
   them.

`SparsityCallback` does all three on any `transformers.Trainer` (a user's own, with the optimizer the Trainer
builds); `finetune()` is a Trainer with that callback. `MaskKeeper.attached` does the same for a hand-written loop.

Tasks: the classification tasks (`wiki-pair`, `wiki-topic`, `mrpc`) and causal LM on a text source (`ptb`, `wiki`,
`wikitext2`, `text:PATH`) for models that predict left to right (decoder-only, or the decoder of an encoder-decoder);
encoder-only models are refused for causal LM. The output directory is written atomically, by the main process only
when several run (`torchrun` / `accelerate launch`): the model and tokenizer, `provenance.json` (with the task
added), the source's `sparsity.json` when there is one, and `finetune.json` with the settings, the training loss and
the sparsity of every matrix before and after.

With a `Distillation` (`sparselm.distill`) the causal-LM loss is the distance to a dense teacher's outputs instead
of the next-token labels; `max_tokens` budgets causal-LM training by training tokens.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from .data import joined_text, parse_source
from .distill import (
    Distillation, TokenBudget, budget_steps, check_distillation, check_token_budget, distillation_trainer, load_teacher,
)
from .errors import SparselmError
from .evaluation.classification import DEFAULT_MAX_LENGTH, encode, load_classifier, uses_segment_ids
from .evaluation.objectives import load_language_model
from .evaluation.perplexity import model_context
from .evaluation.tasks import check_task, classification_task, is_classification
from .facts import FINETUNE_JSON, SPARSITY_JSON, family, trains_as_causal_lm
from .io import atomic_dir, atomic_write_json, ensure_writable_dir
from .masks import apply_keep
from .models import load_config
from .progress import SILENT, Progress
from .sources import read_provenance, resolve, write_provenance
from .weights import select_matrices

OptimizerName = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
DEFAULT_LR = 5e-5
DEFAULT_LM_SEQLEN = 512
SGD_MOMENTUM = 0.9


class MaskKeeper:
    """The keep-masks (True = kept) of the weight matrices that hold zeros, and the hooks that enforce them."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for matrix in select_matrices(model, include_embeddings=True):
            param = matrix.parameter
            keep = param.detach() != 0
            if not bool(keep.all()):
                self.masks.append((matrix.name, param, keep))

    def mask_gradients(self) -> list[RemovableHandle]:
        """Hooks that zero each pruned entry's gradient as it is computed; the caller removes them."""
        return [param.register_hook(_masking_hook(keep)) for _, param, keep in self.masks]

    @contextmanager
    def attached(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """For a hand-written loop: gradient hooks and an optimizer post-step hook, always removed after."""
        handles = self.mask_gradients()
        handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply(opt)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned entries of each weight and of its optimizer state (moments, momentum buffers)."""
        for _, param, keep in self.masks:
            keep = keep.to(param.device)
            apply_keep(param, keep)
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    apply_keep(value, keep)


def _masking_hook(keep: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * keep.to(grad.device)

    return hook


class SparsityCallback(TrainerCallback):
    """Keeps every pruned weight of the model a `transformers.Trainer` trains at exactly zero.

        trainer = Trainer(model=pruned, args=args, train_dataset=data, callbacks=[sparselm.SparsityCallback()])

    At train begin the mask is taken from the model as it is then: every exact zero of a weight matrix (embeddings
    and heads included) is a pruned weight. From then on pruned entries get no gradient (so they do not count towards
    gradient clipping either), and after every optimizer step the pruned entries of the weights and of the
    optimizer's per-weight state (Adam's moments, SGD's momentum) are set to +0.0, so neither weight decay nor
    momentum can revive them. The optimizer is the one the Trainer builds (or the one you hand it); state restored
    from a checkpoint is cleaned at train begin. Works under data parallelism (`torchrun`, `accelerate launch`);
    models sharded by FSDP or DeepSpeed ZeRO-3 are refused, since no process sees whole matrices there.
    `keeper` holds the masks of the last (or current) training run.
    """

    def __init__(self) -> None:
        self.keeper: MaskKeeper | None = None
        self._handles: list[RemovableHandle] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        _check_whole_matrices(args)
        self.release()
        self.keeper = MaskKeeper(model)
        self._handles = self.keeper.mask_gradients()
        self.keeper.apply(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN201
        self.keeper.apply(optimizer)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.release()

    def release(self) -> None:
        """Remove the gradient hooks (done at train end; call it when training stopped on an error)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_whole_matrices(args: TrainingArguments) -> None:
    from accelerate.utils import parse_flag_from_env
    from transformers.integrations import is_deepspeed_zero3_enabled

    if args.fsdp or parse_flag_from_env("ACCELERATE_USE_FSDP") or is_deepspeed_zero3_enabled():
        raise SparselmError(
            "SparsityCallback needs whole weight matrices in every process, and FSDP / DeepSpeed ZeRO-3 shard them; "
            "train with plain data parallelism (torchrun or accelerate launch without FSDP/ZeRO-3)"
        )


def matrix_sparsity(model: nn.Module) -> dict[str, dict[str, float | int]]:
    """Zeros and sparsity of every weight matrix, by name."""
    rows = {}
    for matrix in select_matrices(model, include_embeddings=True):
        zeros = int((matrix.parameter == 0).sum())
        rows[matrix.name] = {"zeros": zeros, "numel": matrix.numel, "sparsity": zeros / matrix.numel}
    return rows


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    raise SparselmError(f"unknown optimizer '{name}'; use one of: {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class FinetuneReport:
    """What a fine-tuning run did; `to_json()` is finetune.json and what `sparselm finetune --json` prints."""

    model: str
    task: str
    out: Path
    train_loss: float
    steps: int
    examples: int
    settings: dict[str, Any]
    tokens_seen: int
    distillation: dict[str, Any] | None
    masked_matrices: int
    sparsity_before: dict[str, dict[str, float | int]]
    sparsity_after: dict[str, dict[str, float | int]]

    @property
    def sparsity_identical(self) -> bool:
        """Every matrix has exactly the zeros it had before training."""
        before, after = self.sparsity_before, self.sparsity_after
        return all(before[k]["zeros"] == after[k]["zeros"] for k in before)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "out": str(self.out),
            "train_loss": self.train_loss,
            "steps": self.steps,
            "examples": self.examples,
            "settings": self.settings,
            "tokens_seen": self.tokens_seen,
            "distillation": self.distillation,
            "masked_matrices": self.masked_matrices,
            "sparsity_identical": self.sparsity_identical,
            "sparsity_before": self.sparsity_before,
            "sparsity_after": self.sparsity_after,
        }


def finetune(
    model_or_dir: str,
    task: str,
    out_dir: Path,
    *,
    epochs: float = 3.0,
    lr: float = DEFAULT_LR,
    max_steps: int | None = None,
    batch_size: int = 8,
    max_examples: int | None = None,
    seed: int = 0,
    optimizer: OptimizerName = "adamw",
    seqlen: int | None = None,
    data_dir: Path | None = None,
    progress: Progress = SILENT,
    distillation: Distillation | None = None,
    max_tokens: int | None = None,
    force: bool = False,
    device: torch.device | None = None,
) -> FinetuneReport:
    """Fine-tune on `task`'s train split keeping every pruned weight at zero; write the model to `out_dir` (replaced
    only when sparselm wrote it, or it is empty, unless `force`).

    With `distillation`, learn the teacher's outputs on that text instead of its labels; `max_tokens` stops causal-LM
    training after that many training tokens (overriding `epochs`; `max_steps` still caps it).
    """
    check_task(task)
    _check_budget(epochs, lr, max_steps, batch_size, max_examples)
    check_token_budget(task, max_tokens)
    if optimizer not in OPTIMIZERS:
        raise SparselmError(f"unknown optimizer '{optimizer}'; use one of: {', '.join(OPTIMIZERS)}")
    if not is_classification(task):
        check_causal_lm(model_or_dir, task)
    if distillation is not None:
        check_distillation(model_or_dir, task, distillation)
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir.parent)
    model, tokenizer, dataset, collator, extra = _prepare(model_or_dir, task, max_examples, seed, seqlen, data_dir)
    before = matrix_sparsity(model)
    opt = make_optimizer(model, optimizer, lr)
    masks = SparsityCallback()
    steps_cap, budget = max_steps, []
    if max_tokens is not None:
        steps_cap = min(max_steps or math.inf, budget_steps(max_tokens, len(dataset), batch_size, extra["seqlen"]))
        budget = [TokenBudget(max_tokens)]
    make_trainer = None
    if distillation is not None:
        make_trainer = distillation_trainer(load_teacher(distillation, model), distillation)
    run = _train(
        model, dataset, collator, opt, masks, epochs, steps_cap, batch_size, seed, progress, make_trainer, budget,
        use_cpu=device.type == "cpu" if device is not None else not torch.accelerator.is_available(),
    )
    settings = {
        "epochs": epochs, "lr": lr, "max_steps": max_steps, "batch_size": batch_size, "max_examples": max_examples,
        "seed": seed, "optimizer": optimizer, "momentum": SGD_MOMENTUM if optimizer == "sgd" else None, **extra,
        "max_tokens": max_tokens,
    }
    report = FinetuneReport(
        model_or_dir, task, out_dir, run.train_loss, run.steps, len(dataset), settings, run.tokens_seen,
        distillation.settings() if distillation is not None else None, len(masks.keeper.masks), before,
        matrix_sparsity(model),
    )
    if run.main_process:  # under torchrun / accelerate launch every process trains, one writes
        _save(model, tokenizer, model_or_dir, task, out_dir, report, force)
    return report


def check_causal_lm(model_or_dir: str, task: str) -> None:
    """Refuse next-token training of a model that cannot learn it (an encoder) before anything is loaded."""
    config = load_config(resolve(model_or_dir).path, model_or_dir)
    if not trains_as_causal_lm(config):
        raise SparselmError(
            f"'{model_or_dir}' is an {family(config)} model ({config.model_type}), not a causal LM, so fine-tuning it "
            f"on '{task}' would train junk; fine-tune it on a classification task instead (e.g. --task wiki-pair)"
        )


def _check_budget(epochs: float, lr: float, max_steps: int | None, batch_size: int, max_examples: int | None) -> None:
    if not epochs > 0 or not math.isfinite(epochs):
        raise SparselmError(f"--epochs must be a positive number, got {epochs}")
    if not lr > 0 or not math.isfinite(lr):
        raise SparselmError(f"--lr must be a positive number, got {lr}")
    for flag, value in (("--max-steps", max_steps), ("--batch-size", batch_size), ("--max-examples", max_examples)):
        if value is not None and value < 1:
            raise SparselmError(f"{flag} must be at least 1, got {value}")


def _prepare(
    model_or_dir: str, task: str, max_examples: int | None, seed: int, seqlen: int | None, data_dir: Path | None
) -> tuple[nn.Module, Any, list[dict[str, Any]], Any, dict[str, Any]]:
    """Model, tokenizer, tokenised train split, collator and the settings that shaped them."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if is_classification(task):
        spec = classification_task(task)
        loaded = load_classifier(model_or_dir, spec, seed)
        max_length = min(DEFAULT_MAX_LENGTH, model_context(loaded.model) or DEFAULT_MAX_LENGTH)
        examples = spec.examples("train", data_dir, max_examples)
        rows = encode(loaded.tokenizer, examples, max_length, uses_segment_ids(loaded.model))
        loaded.model.config.id2label = dict(enumerate(spec.labels))
        loaded.model.config.label2id = {name: i for i, name in enumerate(spec.labels)}
        extra = {"head": loaded.head, "max_length": max_length, "split": "train"}
        return loaded.model, loaded.tokenizer, rows, DataCollatorWithPadding(loaded.tokenizer), extra
    source = parse_source(task)
    lm = load_language_model(model_or_dir, "clm")
    context = model_context(lm.model)
    seqlen = seqlen or min(context or DEFAULT_LM_SEQLEN, DEFAULT_LM_SEQLEN)
    if context is not None and seqlen > context:
        raise SparselmError(f"--seqlen {seqlen} is above the model's context of {context} tokens; use {context} or less")
    ids = lm.tokenizer(joined_text(source, "train", data_dir), return_attention_mask=False)["input_ids"]
    windows = len(ids) // seqlen
    if windows == 0:
        raise SparselmError(f"the training text has {len(ids)} tokens, fewer than one window of {seqlen}; lower --seqlen")
    windows = windows if max_examples is None else min(windows, max_examples)
    rows = [{"input_ids": ids[i * seqlen : (i + 1) * seqlen], "labels": ids[i * seqlen : (i + 1) * seqlen]} for i in range(windows)]
    extra = {"head": lm.head, "seqlen": seqlen, "split": "whole file" if source.kind == "text" else "train"}
    return lm.model, lm.tokenizer, rows, default_data_collator, extra


@dataclass(frozen=True)
class TrainingRun:
    train_loss: float
    steps: int
    main_process: bool  # the process that writes outputs (the only one unless launched on several)
    tokens_seen: int  # input tokens of every training batch, all processes together


def _train(
    model: nn.Module, dataset: list[dict[str, Any]], collator: Any, optimizer: torch.optim.Optimizer,
    masks: SparsityCallback, epochs: float, max_steps: int | None, batch_size: int, seed: int,
    progress: Progress, make_trainer: Callable[..., Any] | None = None, budget: Sequence[TrainerCallback] = (),
    use_cpu: bool = True,
) -> TrainingRun:
    """Train with `make_trainer` (default: the plain `transformers.Trainer`, imported here: it pulls in `datasets`,
    which nothing else a command runs needs)."""
    if make_trainer is None:
        from transformers import Trainer

        make_trainer = Trainer
    callbacks: list[TrainerCallback] = [masks, *budget, _ProgressCallback(progress)]
    with tempfile.TemporaryDirectory(prefix="sparselm-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, max_steps=max_steps or -1,
            per_device_train_batch_size=batch_size, learning_rate=optimizer.defaults["lr"], seed=seed, data_seed=seed,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False,
            # said explicitly on a machine without an accelerator, so that processes started by torchrun train as
            # one data-parallel job (gloo) with ranks, instead of as independent copies that all believe they are rank 0
            use_cpu=use_cpu, include_num_input_tokens_seen="all",
        )
        trainer = make_trainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator, optimizers=(optimizer, None),
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # it prints dicts on stdout, which must stay clean for --json
        try:
            output = trainer.train()
        finally:
            masks.release()
    model.eval()
    return TrainingRun(
        float(output.training_loss), int(output.global_step), trainer.is_world_process_zero(),
        int(trainer.state.num_input_tokens_seen),
    )


class _ProgressCallback(TrainerCallback):
    """Reports optimizer steps as progress (the Trainer's own tqdm is turned off)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.done = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (Trainer's signature)
        self.progress.start("fine-tuning (masks kept)", state.max_steps)
        self.done = state.global_step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.progress.advance(state.global_step - self.done)
        self.done = state.global_step


def _save(
    model: nn.Module, tokenizer: Any, model_or_dir: str, task: str, out_dir: Path, report: FinetuneReport, force: bool
) -> None:
    source = resolve(model_or_dir)
    with atomic_dir(out_dir, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        previous = read_provenance(source.path)
        kept = {k: v for k, v in previous.items() if k not in ("base_model", "quantized_from")}
        write_provenance(tmp, source, **{**kept, "finetuned_task": task, "finetuned_from": model_or_dir})
        if (source.path / SPARSITY_JSON).is_file():
            shutil.copy2(source.path / SPARSITY_JSON, tmp / SPARSITY_JSON)
        atomic_write_json(tmp / FINETUNE_JSON, report.to_json())
