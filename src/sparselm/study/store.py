"""The results store: one SQLite row per finished cell, written in one transaction each.

A row exists only once its cell is complete (the INSERT commits atomically), so a study killed at any moment loses
at most the cells that were running, and a restart skips every row already there. The unique key
(model, method, options, sparsity, task, config_hash) makes a duplicate impossible.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SparselmError
from .config import StudyConfig

STORE_FILE = "results.sqlite"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    config_hash TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    options TEXT NOT NULL,
    sparsity REAL NOT NULL,
    task TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    metrics TEXT NOT NULL,
    settings TEXT NOT NULL,
    provenance TEXT NOT NULL,
    error TEXT,
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    UNIQUE (model, method, options, sparsity, task, config_hash)
);
"""
COLUMNS = (
    "model", "method", "options", "sparsity", "task", "kind", "status", "metrics", "settings", "provenance",
    "error", "started", "seconds",
)


@dataclass(frozen=True)
class Row:
    """One finished cell as stored: its key, what it measured and how."""

    model: str
    method: str
    options: dict[str, Any]
    sparsity: float
    task: str
    kind: str
    status: str
    metrics: dict[str, Any]
    settings: dict[str, Any]
    provenance: dict[str, Any]
    error: str | None
    started: float
    seconds: float

    @property
    def key(self) -> tuple[str, str, str, float, str]:
        return (self.model, self.method, canonical(self.options), self.sparsity, self.task)

    def to_json(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in COLUMNS}


def canonical(obj: Any) -> str:
    """The one JSON spelling of a value, so equal options give equal keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class ResultStore:
    """DIR/results.sqlite, bound to one study configuration (by its hash)."""

    def __init__(self, path: Path, config_hash: str) -> None:
        self.path = Path(path)
        self.config_hash = config_hash

    @classmethod
    def open_for(cls, out: Path, config: StudyConfig) -> ResultStore:
        """Create the store, or reopen it when it belongs to the same study; refuse a different study's store."""
        path = Path(out) / STORE_FILE
        with closing(_connect(path)) as conn, conn:
            conn.executescript(SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("config_hash", config.hash),
                        ("config", canonical(config.hashed_json())),
                        ("name", config.name),
                        ("created", str(time.time())),
                    ],
                )
            elif meta.get("config_hash") != config.hash:
                raise SparselmError(_different_study(path, meta, config))
        return cls(path, config.hash)

    @classmethod
    def open_existing(cls, out: Path) -> ResultStore:
        """Open a store for reading (results, report), whatever study wrote it."""
        path = Path(out) / STORE_FILE
        if not path.is_file():
            raise SparselmError(f"no results store at '{path}'; run `sparselm study --out {out}` first")
        with closing(_connect(path)) as conn:
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.DatabaseError as exc:
                raise SparselmError(f"'{path}' is not a sparselm results store ({exc})") from None
        return cls(path, meta["config_hash"])

    def meta(self) -> dict[str, str]:
        with closing(_connect(self.path)) as conn:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def config_json(self) -> dict[str, Any]:
        return json.loads(self.meta()["config"])

    def record(self, row: Row) -> None:
        """Write one finished cell in its own transaction; a failed row is replaced when the cell later succeeds."""
        values = [
            row.model, row.method, canonical(row.options), row.sparsity, row.task, row.kind, row.status,
            json.dumps(row.metrics), json.dumps(row.settings), json.dumps(row.provenance), row.error,
            row.started, row.seconds,
        ]
        with closing(_connect(self.path)) as conn, conn:
            conn.execute(
                f"INSERT INTO results (config_hash, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
                " ON CONFLICT (model, method, options, sparsity, task, config_hash) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[5:])
                + " WHERE results.status != 'ok'",
                [self.config_hash, *values],
            )

    def rows(self, status: str | None = None) -> list[Row]:
        query = f"SELECT {', '.join(COLUMNS)} FROM results WHERE config_hash = ?"
        args: list[Any] = [self.config_hash]
        if status:
            query += " AND status = ?"
            args.append(status)
        with closing(_connect(self.path)) as conn:
            return [_row(r) for r in conn.execute(query + " ORDER BY id", args)]

    def done_keys(self) -> set[tuple[str, str, str, float, str]]:
        return {r.key for r in self.rows(status="ok")}

    def count(self) -> int:
        with closing(_connect(self.path)) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def is_study_dir(path: Path) -> bool:
    """Whether `path` holds a results store sparselm wrote: a study folder, which running its study again continues
    (a different study's folder is refused by `ResultStore.open_for`, naming what differs)."""
    store = Path(path) / STORE_FILE
    if not store.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT value FROM meta WHERE key = 'config_hash'").fetchone() is not None
    except sqlite3.Error:
        return False


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=30.0)
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise SparselmError(
            f"'{path}' is not a sparselm results store, or cannot be opened ({exc}); use another --out directory"
        ) from None
    return conn


def _row(values: tuple) -> Row:
    d = dict(zip(COLUMNS, values))
    for key in ("options", "metrics", "settings", "provenance"):
        d[key] = json.loads(d[key])
    return Row(**d)


def _different_study(path: Path, meta: dict[str, str], config: StudyConfig) -> str:
    old = json.loads(meta.get("config", "{}"))
    new = config.hashed_json()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return (
        f"'{path}' holds results of a different study (config hash {meta.get('config_hash')}, "
        f"'{meta.get('name')}'; this config is {config.hash}, differing in: {', '.join(changed) or 'unknown'}); "
        "mixing them would make the report wrong: use another --out directory, or delete that one to start over"
    )

