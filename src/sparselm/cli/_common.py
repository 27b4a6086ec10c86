"""Shared CLI plumbing: one-line errors, output checks, JSON output and progress bars."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..data import parse_source, read_text_file
from ..errors import SparselmError
from ..sources import resolve

F = TypeVar("F", bound=Callable[..., Any])
FILE_SYSTEM_FIXES = {
    errno.ENOSPC: "free space or choose another location",
    errno.EDQUOT: "free space or choose another location",
    errno.EROFS: "choose a writable location",
}
FORCE_HELP = "Replace --out even when it is a file or a directory sparselm did not write (never an input)."
err_console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line (the message is shown as written: square brackets in paths are not markup)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handles_errors(fn: F) -> F:
    """Turn SparselmError (and a few well-understood OS errors) into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SparselmError as exc:
            raise fail(str(exc)) from None
        except PermissionError as exc:
            raise fail(f"permission denied: {exc.filename or exc}; choose a writable location") from None
        except OSError as exc:
            if exc.errno not in FILE_SYSTEM_FIXES:
                raise
            raise fail(f"{exc.strerror}: '{exc.filename}'; {FILE_SYSTEM_FIXES[exc.errno]}") from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing half-written was left behind", 130) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    """A rich progress bar on stderr (so --json output on stdout stays clean)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )
    with progress:
        yield progress


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SparselmError(f"{what} must be a number or a comma-separated list of numbers, got '{text}'") from None


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SparselmError(f"{what} must be an integer or a comma-separated list of integers, got '{text}'") from None


def model_inputs(names: Iterable[str]) -> list[Path]:
    """Each model's local directory, found now so that a bad name fails before any work or any output."""
    return [resolve(name).path for name in names]


def text_inputs(spec: str) -> list[Path]:
    """The file behind a `text:PATH` source, checked now and never to be replaced by an output; none otherwise."""
    try:
        path = parse_source(spec).path
    except SparselmError:
        return []  # not a text source: the command names the problem itself
    if path is None:
        return []
    read_text_file(path)
    return [path]
