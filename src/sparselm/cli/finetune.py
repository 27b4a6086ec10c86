"""`sparselm finetune`: mask-keeping fine-tuning on a classification task or causal LM."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

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
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Fine-tune on the task's train split; pruned weights, their gradients and optimizer state stay exactly zero."""
    check_task(task)
    inputs = model_inputs([model])
    if not is_classification(task):
        check_causal_lm(model, task)
    check_output_dir(out, [*inputs, *text_inputs(task), *([data_dir] if data_dir else [])], force)
    with progress_bar() as progress:
        report = finetune(
            model, task, out, epochs=epochs, lr=lr, max_steps=max_steps, batch_size=batch_size,
            max_examples=max_examples, seed=seed, optimizer=optimizer, seqlen=seqlen, data_dir=data_dir,
            progress=progress, force=force,
        )
    if json_out:
        print_json(report.to_json())
        return
    kept = "identical" if report.sparsity_identical else "[red]CHANGED[/red]"
    out_console.print(
        f"fine-tuned [bold]{escape(model)}[/bold] on {escape(task)}: {report.steps} steps over {report.examples} "
        f"examples, train loss {report.train_loss:.4f}; sparsity of {report.masked_matrices} masked matrices "
        f"{kept} → {escape(str(out))}",
        highlight=False,
    )
