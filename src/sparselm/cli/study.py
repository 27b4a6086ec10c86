"""`sparselm study`, `sparselm results` and `sparselm report`: the whole lab in one resumable command."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import SparselmError
from ..io import check_output_dir, replace_with_empty_dir
from ..sources import model_slug, reference_kind
from ..study.config import StudyConfig, default_config_text, load_config
from ..study.report import write_report
from ..study.report_data import method_label
from ..study.run import run_study
from ..study.store import ResultStore, Row, is_study_dir
from ._app import app
from ._common import err_console, handles_errors, out_console, print_json, progress_bar, text_inputs

FULL_SIZE_HINT = (
    "This study used small budgets so that it fits in about half an hour on 2 cores. The full-size study "
    "(every test window at seqlen 2048, 128 calibration windows of 2048 tokens, three epochs of fine-tuning on the "
    "whole training split, decode and 512-token prefill timings): add --full, e.g. "
    "`sparselm study --full --out results-full/` (many hours on a CPU; add `--executor ray --ray-address HOST:PORT` "
    "to spread it over a cluster that shares the output directory)."
)


@app.command("study")
@handles_errors
def study_command(
    config: Path | None = typer.Argument(
        None, help="Study YAML (default: the shipped study of the embedded models, see --print-default)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Study directory: results.sqlite, models/, report.html."),
    quick: bool = typer.Option(False, "--quick", help="Apply the config's `quick:` overrides (a few minutes)."),
    full: bool = typer.Option(False, "--full", help="Apply the config's `full:` overrides (the full-size study: hours)."),
    executor: str = typer.Option("local", "--executor", help="local (this machine) or ray (a Ray cluster)."),
    workers: int | None = typer.Option(None, "--workers", help="Local worker processes (default 1), or CPUs for a new local Ray."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="An existing Ray cluster (HOST:PORT, ray://HOST:PORT, auto)."),
    print_default: bool = typer.Option(False, "--print-default", help="Print the default config YAML and exit."),
    force: bool = typer.Option(False, "--force", help="Start the study in --out even when it is a file or a directory "
                               "that is not a study folder, replacing it (never an input)."),
    json_out: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Sweep models × methods × sparsities × tasks into DIR/results.sqlite; kill it any time and run it again.

    DIR is new, empty, or a study folder (the same config continues where it stopped); anything else needs --force."""
    if print_default:
        sys.stdout.write(default_config_text())
        return
    if out is None:
        raise SparselmError("--out DIR is required: the study directory for results, models and the report")
    if quick and full:
        raise SparselmError("choose one of --quick and --full")
    cfg = load_config(config, "quick" if quick else "full" if full else None)
    check_output_dir(out, study_inputs(cfg, config), force, resumes=is_study_dir)
    if not is_study_dir(out) and (out.is_symlink() or out.is_file() or (out.is_dir() and any(out.iterdir()))):
        replace_with_empty_dir(out)  # what check_output_dir lets go: another output sparselm wrote, or with --force
    quiet_library_progress()
    with progress_bar(quiet=False) as progress:

        def on_start(planned: int, done: int) -> None:
            progress.start(f"study {cfg.name} ({done} of {planned} cells already done)", planned - done)

        def on_cell(cell: Any, row: dict[str, Any]) -> None:
            mark = "" if row["status"] == "ok" else " [red]failed[/red]"
            err_console.print(f"{cell.label}: {row['seconds']:.1f} s{mark}", highlight=False)
            progress.advance()

        summary = run_study(cfg, out, executor, workers, ray_address, on_start, on_cell)
    if json_out:
        print_json(summary.to_json())
    else:
        out_console.print(
            f"study {cfg.name} ({cfg.hash}): {summary.planned} cells, {summary.already_done} already done, "
            f"{summary.ran} run now in {summary.seconds:.0f} s → {summary.out}/results.sqlite; report → {summary.report}"
        )
        if not (quick or full):
            out_console.print(FULL_SIZE_HINT, highlight=False)
    if summary.failed:
        err_console.print(f"{len(summary.failed)} cells failed (run again to retry):", highlight=False)
        for line in summary.failed[:20]:
            err_console.print(f"  {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def study_inputs(cfg: StudyConfig, config: Path | None) -> list[Path]:
    """What the study reads from disk (its YAML, local model directories, text: task files): never replaced by --out."""
    models = [Path(m.name) for m in cfg.models if reference_kind(m.name) == "local"]
    texts = [path for m in cfg.models for task in m.tasks for path in text_inputs(task)]
    return [*([config] if config else []), *models, *texts]


def quiet_library_progress() -> None:
    """transformers' own per-file bars would interleave with the study's; the study shows one bar per cell."""
    from transformers.utils import logging

    logging.disable_progress_bar()


RESULT_COLUMNS = ["model", "method", "sparsity", "task", "status", "seconds"]


def flat_row(row: Row) -> dict[str, Any]:
    """One row with its metrics flattened into columns (nested dicts as JSON)."""
    flat: dict[str, Any] = {
        "model": row.model, "method": method_label(row), "options": json.dumps(row.options), "sparsity": row.sparsity,
        "task": row.task, "status": row.status, "seconds": round(row.seconds, 3), "error": row.error or "",
    }
    for key, value in row.metrics.items():
        column = f"metric_{key}" if key in flat else key  # e.g. the sparsity a model measured vs the cell's target
        flat[column] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return flat


@app.command("results")
@handles_errors
def results_command(
    out: Path = typer.Argument(..., help="A study directory (holds results.sqlite)."),
    as_csv: bool = typer.Option(False, "--csv", help="Write every row and metric as CSV on stdout."),
    json_out: bool = typer.Option(False, "--json", help="Write every row (metrics, settings, provenance) as JSON."),
) -> None:
    """Print the results table of a study, or export it."""
    if as_csv and json_out:
        raise SparselmError("choose one of --csv and --json")
    rows = ResultStore.open_existing(out).rows()
    if json_out:
        print_json([r.to_json() for r in rows])
        return
    flat = [flat_row(r) for r in rows]
    if as_csv:
        columns = list(dict.fromkeys(k for row in flat for k in row))
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return
    table = Table(title=f"{len(rows)} results in {out}")
    headline = ["token_ppl", "accuracy", "ratio", "achieved_sparsity", "weights"]
    for column in RESULT_COLUMNS + ["metric"]:
        table.add_column(column)
    for row, f in zip(rows, flat):
        metric = next((f"{k}={f[k]:.4g}" for k in headline if isinstance(f.get(k), (int, float))), row.error or "")
        table.add_row(model_slug(row.model), *(str(f[c]) for c in RESULT_COLUMNS[1:]), metric)
    out_console.print(table)


@app.command("report")
@handles_errors
def report_command(out: Path = typer.Argument(..., help="A study directory (holds results.sqlite).")) -> None:
    """Write DIR/report.html (figures embedded), DIR/report.md and DIR/figs/ from the results store."""
    path = write_report(out)
    out_console.print(f"report → {path} (and {out}/report.md, {out}/figs/)")
