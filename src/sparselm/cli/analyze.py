"""`sparselm analyze`: the weight-distribution study."""

from __future__ import annotations

from pathlib import Path

import typer

from ..analysis import analyze_models
from . import app
from ._common import handles_errors, out_console, print_json, progress_bar


@app.command("analyze")
@handles_errors
def analyze_command(
    models: list[str] = typer.Argument(..., help="Embedded aliases (see `sparselm models`), local directories or hub ids."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; each model gets DIR/<model>/."),
    include_embeddings: bool = typer.Option(
        False, "--include-embeddings", help="Also analyse embeddings and untied heads (excluded by default)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Histograms and |w| CDFs (log2 axis) per model and per block, with stats.json and layers.csv behind them."""
    with progress_bar(quiet=False) as progress:

        def on_model(slug: str, total: int):
            task = progress.add_task(f"analysing {slug}", total=total)
            return lambda _name: progress.advance(task)

        summary = analyze_models(models, out, include_embeddings, on_model)
    if json_out:
        print_json(summary)
        return
    for slug, info in summary["models"].items():
        note = f" ({'dequantised from ' + info['quantized_from']})" if info["quantized_from"] else ""
        out_console.print(
            f"[bold]{slug}[/bold]{note}: {info['weights']:,} weights in {info['matrices']} matrices, "
            f"median |w| {info['median_abs']:.4g}, {info['fraction_abs_le_2^-10']:.1%} with |w| ≤ 2^-10 → {info['dir']}"
        )
    if "compare" in summary:
        out_console.print(f"comparison figure → {summary['compare']}")
