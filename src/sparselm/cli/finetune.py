"""`sparselm finetune`: mask-keeping fine-tuning on a classification task or causal LM, or distilling a teacher."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..models import DEVICE_HELP, resolve_device
from ..distill import DEFAULT_TEMPERATURE, Distillation, check_distillation, check_token_budget
from ..errors import SparselmError
from ..evaluation.tasks import check_task, is_classification, task_names
from ..finetune import DEFAULT_LR, OPTIMIZERS, check_causal_lm, finetune
from ..io import check_output_dir
from ._app import app
from ._common import FORCE_HELP, handles_errors, model_inputs, out_console, print_json, progress_bar, text_inputs


@app.command("finetune")
@handles_errors
def finetune_command(
    model: str = typer.Argument(..., help="Embedded alias, local model directory (e.g. a pruned one) or hub id."),
    task: str = typer.Option(..., "--task", "-t", help=f"One of: {', '.join(task_names())}."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (written atomically)."),
    epochs: float = typer.Option(3.0, "--epochs", help="Training epochs."),
    lr: float = typer.Option(DEFAULT_LR, "--lr", help="Peak learning rate (linear decay)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples (or LM windows) per step."),
    max_examples: int | None = typer.Option(None, "--max-examples", help="Use only the first N training examples/windows."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and of a new classification head."),
    optimizer: str = typer.Option("adamw", "--optimizer", help=f"One of: {', '.join(OPTIMIZERS)} (sgd with momentum 0.9)."),
    seqlen: int | None = typer.Option(None, "--seqlen", help="Window length for causal-LM tasks (default: context, at most 512)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Local WikiText-2 or GLUE MRPC files."),
    teacher: str | None = typer.Option(
        None, "--teacher", help="Distil from this dense model (same architecture and tokenizer): the loss is "
        "KL(teacher || student) on logits, not the text's next-token labels.",
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help=f"Softmax temperature of the distillation KL (default {DEFAULT_TEMPERATURE}).",
    ),
    hidden_weight: float | None = typer.Option(
        None, "--hidden-weight", help="Add this weight × the SquareHead loss on every block's hidden states "
        "(MSE normalised by the teacher's; default 0).",
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Causal LM: stop after N training tokens (overrides --epochs).",
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Fine-tune on the task's train split; pruned weights, their gradients and optimizer state stay exactly zero."""
    check_task(task)
    check_token_budget(task, max_tokens)
    inputs = model_inputs([model])
    if not is_classification(task):
        check_causal_lm(model, task)
    distillation = _distillation(teacher, temperature, hidden_weight)
    if distillation is not None:
        check_distillation(model, task, distillation)
        inputs += model_inputs([distillation.teacher])
    check_output_dir(out, [*inputs, *text_inputs(task), *([data_dir] if data_dir else [])], force)
    with progress_bar() as progress:
        report = finetune(
            model, task, out, epochs=epochs, lr=lr, max_steps=max_steps, batch_size=batch_size,
            max_examples=max_examples, seed=seed, optimizer=optimizer, seqlen=seqlen, data_dir=data_dir,
            progress=progress, distillation=distillation, max_tokens=max_tokens, force=force,
            device=resolve_device(device),
        )
    if json_out:
        print_json(report.to_json())
        return
    kept = "identical" if report.sparsity_identical else "[red]CHANGED[/red]"
    how = f"distilled from {escape(teacher)}" if teacher else "fine-tuned"
    loss = "distillation loss" if teacher else "train loss"
    out_console.print(
        f"{how} [bold]{escape(model)}[/bold] on {escape(task)}: {report.steps} steps over {report.examples} "
        f"examples ({report.tokens_seen} tokens), {loss} {report.train_loss:.4f}; sparsity of "
        f"{report.masked_matrices} masked matrices {kept} → {escape(str(out))}",
        highlight=False,
    )


def _distillation(teacher: str | None, temperature: float | None, hidden_weight: float | None) -> Distillation | None:
    if teacher is None:
        if temperature is not None or hidden_weight is not None:
            raise SparselmError(
                "--temperature and --hidden-weight set the distillation loss; add --teacher DENSE_MODEL"
            )
        return None
    return Distillation(
        teacher,
        DEFAULT_TEMPERATURE if temperature is None else temperature,
        0.0 if hidden_weight is None else hidden_weight,
    )
