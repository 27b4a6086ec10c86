"""`sparselm analyze`: the weight-distribution study."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..analysis import COMPARE_FIGURE, analyze_models
from ..errors import SparselmError
from ..facts import STATS_JSON
from ..io import check_output_dir, sparselm_wrote
from ..sources import model_slug
from ._app import app
from ._common import FORCE_HELP, handles_errors, model_inputs, out_console, print_json, progress_bar


@app.command("analyze")
@handles_errors
def analyze_command(
    models: list[str] = typer.Argument(..., help="Embedded aliases (see `sparselm models`), local directories or hub ids."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; each model gets DIR/<model>/."),
    include_embeddings: bool = typer.Option(
        False, "--include-embeddings", help="Also analyse embeddings and untied heads (excluded by default)."
    ),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Histograms and |w| CDFs (log2 axis) per model and per block, with stats.json and layers.csv behind them."""
    check_analysis_outputs(models, out, force)
    with progress_bar(quiet=False) as progress:
        summary = analyze_models(models, out, include_embeddings, progress, force=force)
    if json_out:
        print_json(summary)
        return
    for slug, info in summary["models"].items():
        note = f" ({'dequantised from ' + info['quantized_from']})" if info["quantized_from"] else ""
        out_console.print(
            f"[bold]{escape(slug)}[/bold]{escape(note)}: {info['weights']:,} weights in {info['matrices']} matrices, "
            f"median |w| {info['median_abs']:.4g}, {info['fraction_abs_le_2^-10']:.1%} with |w| ≤ 2^-10 → "
            f"{escape(info['dir'])}",
            highlight=False,
        )
    if "compare" in summary:
        out_console.print(f"comparison figure → {escape(summary['compare'])}", highlight=False)


def check_analysis_outputs(models: list[str], out: Path, force: bool) -> None:
    """Every model resolves and every DIR/<model> may be replaced, before the first model is analysed.

    DIR itself is only added to. The comparison figure, a file that carries no marker, is replaced when DIR already
    holds an analysis sparselm wrote (a directory with stats.json), or with --force.
    """
    inputs = model_inputs(models)
    slugs = [model_slug(name) for name in models]
    repeated = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if repeated:
        raise SparselmError(
            f"several models would write to the same folder '{out / repeated[0]}'; analyse them in separate runs "
            "with different --out"
        )
    for slug in slugs:
        check_output_dir(out / slug, inputs, force)
    figure = out / COMPARE_FIGURE
    if len(models) > 1 and (figure.exists() or figure.is_symlink()) and not force and not _holds_analysis(out):
        raise SparselmError(
            f"'{figure}' is a file that sparselm did not write; choose another --out, or pass --force to replace it"
        )


def _holds_analysis(out: Path) -> bool:
    return any(sparselm_wrote(d) and (d / STATS_JSON).is_file() for d in out.iterdir())
