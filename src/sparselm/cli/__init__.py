"""The `sparselm` command line. Each command lives in its own module and registers itself on `app`."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sparselm",
    help="Weight sparsity for transformer language models: analyse, prune, fine-tune, evaluate, pack and run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One import per line: each registers its commands on `app`.
from . import analyze  # noqa: E402,F401
from . import models  # noqa: E402,F401
from . import prune  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import finetune  # noqa: E402,F401
from . import study  # noqa: E402,F401
from . import pack  # noqa: E402,F401
from . import bench  # noqa: E402,F401


def main() -> None:
    app()
