"""`sparselm eval`: perplexity (token, word, byte) and classification accuracy/F1."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..evaluation import evaluate
from ..evaluation.tasks import task_names
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
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Evaluate a model: token_ppl (SparseGPT/Wanda protocol) with word_ppl, byte_ppl and bits_per_byte
    (lm-evaluation-harness) in one pass, masked-LM perplexity, or accuracy and F1 on a classification task."""
    with progress_bar() as progress:
        result = evaluate(
            model, task, split=split, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
            objective=objective, data_dir=data_dir, max_examples=max_examples, seed=seed, progress=progress,
        )
    if json_out:
        print_json(result)
        return
    _print_result(result)


def _print_result(result: dict) -> None:
    head = f"[bold]{escape(result['model'])}[/bold] on {escape(result['task'])} ({escape(result['split'])})"
    if "accuracy" in result:
        body = f"accuracy {result['accuracy']:.4f}, F1 {result['f1']:.4f} over {result['examples']} examples"
    elif "mlm_ppl" in result:
        body = f"masked-LM perplexity {result['mlm_ppl']:.3f} ({result['masked_tokens']} masked tokens, seqlen {result['seqlen']})"
    else:
        body = (
            f"token_ppl {result['token_ppl']:.3f} ({result['windows']}×{result['seqlen']} tokens), "
            f"word_ppl {result['word_ppl']:.3f}, byte_ppl {result['byte_ppl']:.4f}, bits_per_byte {result['bits_per_byte']:.4f}"
        )
    out_console.print(f"{head}: {body}", highlight=False)
    for note in result.get("notes", []):
        out_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
