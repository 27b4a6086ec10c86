"""The `sparselm` command line. Each command lives in its own module and registers itself on `app` (`_app`)."""

from __future__ import annotations

from ._app import app

# One import per line: each registers its commands on `app`.
from . import analyze  # noqa: F401
from . import models  # noqa: F401
from . import prune  # noqa: F401
from . import evaluate  # noqa: F401
from . import finetune  # noqa: F401
from . import study  # noqa: F401
from . import pack  # noqa: F401
from . import bench  # noqa: F401

__all__ = ["app", "main"]


def main() -> None:
    app()
