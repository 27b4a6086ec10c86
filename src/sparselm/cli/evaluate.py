"""`sparselm eval`: perplexity (token, word, byte) and classification accuracy/F1."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..evaluation import ClassificationEvaluation, Evaluation, MaskedPerplexity, evaluate
from ..evaluation.tasks import task_names
from ..facts import parse_size
from ..models import DEVICE_HELP, resolve_device
from ._app import app
from ._common import handles_errors, out_console, print_json, progress_bar


@app.command("eval")
@handles_errors
def eval_command(
    model: str = typer.Argument(..., help="Embedded alias, local model directory or hub id."),
    task: str = typer.Option(..., "--task", "-t", help=f"One of: {', '.join(task_names())}."),
    split: str = typer.Option("test", "--split", help="train, validation or test (text:PATH is always the whole file)."),
    seqlen: int | None = typer.Option(None, "--seqlen", help="Window length in tokens (default: context, at most 2048)."),
    max_windows: int | None = typer.Option(None, "--max-windows", help="Evaluate only the first N windows."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows or examples per forward pass."),
    objective: str = typer.Option("clm", "--objective", help="clm (causal LM) or mlm (masked LM, encoders only)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Local WikiText-2 or GLUE MRPC files."),
    max_examples: int | None = typer.Option(None, "--max-examples", help="Classify only the first N examples."),
    seed: int = typer.Option(0, "--seed", help="Masking seed (mlm) and seed of an untrained classification head."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    max_memory: str | None = typer.Option(
        None, "--max-memory", help="Perplexity of a model bigger than memory: keep at most this much of its weights "
        "in memory (e.g. 2GB), the rest offloaded to disk by accelerate and read per forward; same numbers.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Evaluate a model: token_ppl (SparseGPT/Wanda protocol) with word_ppl, byte_ppl and bits_per_byte
    (lm-evaluation-harness) in one pass, masked-LM perplexity, or accuracy and F1 on a classification task."""
    limit = parse_size(max_memory) if max_memory is not None else None
    torch_device = resolve_device(device)
    with progress_bar() as progress:
        result = evaluate(
            model, task, split=split, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
            objective=objective, data_dir=data_dir, max_examples=max_examples, seed=seed, progress=progress,
            device=torch_device, max_memory=limit,
        )
    if json_out:
        print_json(result.to_json())
        return
    _print_result(result)


def _print_result(result: Evaluation) -> None:
    head = f"[bold]{escape(result.model)}[/bold] on {escape(result.task)} ({escape(result.split)})"
    m = result.metrics
    if isinstance(result, ClassificationEvaluation):
        body = f"accuracy {m.accuracy:.4f}, F1 {m.f1:.4f} over {m.examples} examples"
    elif isinstance(m, MaskedPerplexity):
        body = f"masked-LM perplexity {m.mlm_ppl:.3f} ({m.masked_tokens} masked tokens, seqlen {m.seqlen})"
    else:
        body = (
            f"token_ppl {m.token_ppl:.3f} ({m.windows}×{m.seqlen} tokens), "
            f"word_ppl {m.word_ppl:.3f}, byte_ppl {m.byte_ppl:.4f}, bits_per_byte {m.bits_per_byte:.4f}"
        )
    out_console.print(f"{head}: {body}", highlight=False)
    for note in result.notes:
        out_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
