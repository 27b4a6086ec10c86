"""`sparselm models`: the embedded aliases and whether their weights are installed."""

from __future__ import annotations

import typer
from rich.table import Table

from ..sources import describe_embedded
from ._app import app
from ._common import handles_errors, out_console, print_json


@app.command("models")
@handles_errors
def models_command(
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON for programs."),
) -> None:
    """List the embedded model aliases: architecture, size, where the weights come from, and how to install them."""
    rows = describe_embedded()
    if json_out:
        print_json(rows)
        return
    table = Table(title="embedded models (anything else: a Hugging Face id or a local directory)")
    for col in ("alias", "architecture", "parameters", "weights from", "installed"):
        table.add_column(col)
    for r in rows:
        origin = r["origin"] + (f" [yellow](quantised: {r['quantized_from']})[/yellow]" if r["quantized_from"] else "")
        installed = "[green]yes[/green]" if r["installed"] else f"[red]no[/red] — {r['install']}"
        table.add_row(r["alias"], r["architecture"], f"{r['parameters'] / 1e6:.1f}M", origin, installed)
    out_console.print(table)
