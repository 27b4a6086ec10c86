"""Running a study: prepare DIR, skip what is done, run the rest, write the report.

DIR layout: results.sqlite (the results), config.yaml (the effective configuration), models/ (pruned models, shared
by cells and kept), analysis/ (weight distributions), work/ (scratch, emptied at every start), figs/, report.html,
report.md. One study at a time per DIR (a lock file); a restarted study removes the temporary directories a killed
one left and carries on.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SparselmError
from ..io import atomic_write_text, ensure_writable_dir
from .cells import WORK_DIR, Cell, failed_row, is_complete_model_dir, model_dir, plan
from .config import StudyConfig
from .executors import make_executor, schedule
from .store import ResultStore, Row

LOCK_FILE = ".study.lock"


@dataclass
class StudySummary:
    out: Path
    config_hash: str
    planned: int
    already_done: int
    ran: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "config_hash": self.config_hash, "planned": self.planned,
            "already_done": self.already_done, "ran": self.ran, "failed": self.failed, "seconds": self.seconds,
            "report": str(self.report) if self.report else None,
        }


def run_study(
    config: StudyConfig,
    out: Path,
    executor: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
    write_report: bool = True,
) -> StudySummary:
    """Run every cell of `config` not yet in DIR's store; safe to kill at any moment and run again."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    runner = make_executor(executor, config, str(out), workers, ray_address)  # a bad executor fails before DIR is touched
    try:
        ensure_writable_dir(out)
        with study_lock(out):
            store = ResultStore.open_for(out, config)
            cells = plan(config)
            done = _trusted_done(store, cells, out)
            summary = StudySummary(out, config.hash, len(cells), len(done & {c.key for c in cells}))
            remove_leftovers(out)
            effective = yaml.safe_dump(config.model_dump(mode="json", exclude={"quick", "full"}), sort_keys=False)
            atomic_write_text(out / "config.yaml", effective)
            if on_start:
                on_start(summary.planned, summary.already_done)

            def record(cell: Cell, row: dict[str, Any]) -> None:
                store.record(Row(**row))
                summary.ran += 1
                if row["status"] != "ok":
                    summary.failed.append(f"{cell.label}: {row['error']}")
                if on_cell:
                    on_cell(cell, row)

            def skip(cell: Cell, reason: str) -> None:
                record(cell, failed_row(cell, config, runner.name, reason))

            schedule(cells, done, runner, record, skip)
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    finally:
        runner.close()
    if write_report:
        from .report import write_report as write

        summary.report = write(out)
    summary.seconds = time.perf_counter() - t0
    return summary


def _trusted_done(store: ResultStore, cells: list[Cell], out: Path) -> set[tuple]:
    """Finished cells, except prune cells whose model directory has gone while cells still need it."""
    done = store.done_keys()
    needed = {c.prune_cell.key for c in cells if c.prune_cell is not None and c.key not in done}
    return {
        key for key in done
        if not (key[4] == "prune" and key in needed and not is_complete_model_dir(model_dir(out, Cell(*key))))
    }


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the scratch directory and the temporary files and directories of atomic writes a killed study left."""
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    leftovers = [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    removed = []
    for path in sorted(leftovers, key=lambda p: len(p.parts)):  # outermost first; inner ones go with them
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
        removed.append(path)
    return removed


@contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """One study per directory at a time; the lock dies with its process, so a killed study never blocks a restart."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SparselmError(
                f"another study is running in '{out}'; wait for it to finish or use another --out directory"
            ) from None
        yield
    finally:
        os.close(fd)
