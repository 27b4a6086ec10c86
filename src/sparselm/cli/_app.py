"""The Typer application every command module registers itself on (imported by them, so it sits below them)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sparselm",
    help="Weight sparsity for transformer language models: analyse, prune, fine-tune, evaluate, pack and run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
