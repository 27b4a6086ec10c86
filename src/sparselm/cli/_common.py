"""Shared CLI plumbing: one-line errors, output checks, JSON output and progress bars."""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

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


def show_library_messages() -> None:
    """Messages the library logs for the user (e.g. a one-time model conversion) appear on stderr, as notes do."""
    logger = logging.getLogger("sparselm")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=err_console, show_time=False, show_path=False, show_level=False))
        logger.setLevel(logging.INFO)


show_library_messages()


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


class RichProgress:
    """The library's `Progress` drawn by rich on stderr (so --json on stdout stays clean): one bar per stage,
    notes printed above the bars. Every command shows progress through this one adapter."""

    def __init__(self, bars: Progress, label: str = "") -> None:
        self.bars = bars
        self.label = label
        self.task: TaskID | None = None
        self.total: int | None = None
        self.done = 0

    def labelled(self, label: str) -> RichProgress:
        """An adapter on the same bars whose stages read `label: stage` (e.g. one run of several)."""
        return RichProgress(self.bars, label)

    def start(self, stage: str, total: int | None) -> None:
        self._finish()
        self.task = self.bars.add_task(escape(f"{self.label}: {stage}" if self.label else stage), total=total)
        self.total, self.done = total, 0

    def advance(self, amount: int = 1) -> None:
        if self.task is not None:
            self.bars.advance(self.task, amount)
            self.done += amount

    def note(self, message: str) -> None:
        err_console.print(f"[yellow]note:[/yellow] {escape(message)}", highlight=False)

    def _finish(self) -> None:
        """A stage of unknown size is complete when the next one starts (its bar stops spinning)."""
        if self.task is not None and self.total is None:
            self.bars.update(self.task, total=self.done, completed=self.done)


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[RichProgress]:
    """Rich progress bars on stderr for the library's progress events; `quiet` hides the bars (notes still show)."""
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )
    with bars:
        yield RichProgress(bars)


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
