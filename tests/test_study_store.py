"""The SQLite results store: one row per cell, no duplicates, failed rows retried, another study's store refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sparselm.errors import SparselmError
from sparselm.study.config import StudyConfig
from sparselm.study.store import ResultStore, Row


def config(**changes) -> StudyConfig:
    base = {"models": [{"name": "minilm-l6", "tasks": ["wiki-pair"]}], "methods": [{"method": "magnitude"}], "sparsities": [0, 0.5]}
    return StudyConfig.model_validate({**base, **changes})


def row(status: str = "ok", accuracy: float = 0.75, task: str = "wiki-pair") -> Row:
    return Row(
        model="minilm-l6", method="magnitude", options={"scope": "global"}, sparsity=0.5, task=task,
        kind="classification", status=status, metrics={"accuracy": accuracy} if status == "ok" else {},
        settings={"max_steps": 2}, provenance={"seed": 0}, error=None if status == "ok" else "boom",
        started=1.0, seconds=2.5,
    )


def test_rows_round_trip_and_keys_are_unique(tmp_path: Path) -> None:
    store = ResultStore.open_for(tmp_path, config())
    store.record(row())
    store.record(row(accuracy=0.1))  # the same cell again: the finished row stays as it was
    (got,) = store.rows()
    assert got == row()
    assert store.done_keys() == {row().key}
    assert store.count() == 1


def test_failed_row_is_replaced_when_the_cell_succeeds(tmp_path: Path) -> None:
    store = ResultStore.open_for(tmp_path, config())
    store.record(row(status="failed"))
    assert store.done_keys() == set() and store.rows()[0].error == "boom"
    store.record(row())
    assert [r.status for r in store.rows()] == ["ok"]
    store.record(row(status="failed"))  # a later failure never overwrites a result
    assert [r.status for r in store.rows()] == ["ok"]


def test_reopening_with_the_same_config_keeps_results(tmp_path: Path) -> None:
    ResultStore.open_for(tmp_path, config()).record(row())
    again = ResultStore.open_for(tmp_path, config())
    assert again.done_keys() == {row().key}
    assert ResultStore.open_existing(tmp_path).rows() == again.rows()


def test_a_different_study_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    ResultStore.open_for(tmp_path, config()).record(row())
    other = config(sparsities=[0, 0.9], seed=3)
    with pytest.raises(SparselmError) as err:
        ResultStore.open_for(tmp_path, other)
    message = str(err.value)
    assert "different study" in message and other.hash in message and config().hash in message
    assert "differing in: seed, sparsities" in message and "another --out" in message
    assert ResultStore.open_existing(tmp_path).count() == 1  # untouched


def test_resources_do_not_change_the_hash() -> None:
    assert config(resources={"prune": {"cpus": 4}}).hash == config().hash
    assert config(finetune={"max_steps": 3}).hash != config().hash


def test_open_existing_needs_a_store(tmp_path: Path) -> None:
    with pytest.raises(SparselmError, match="no results store"):
        ResultStore.open_existing(tmp_path)
    (tmp_path / "results.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(SparselmError, match="not a sparselm results store"):
        ResultStore.open_existing(tmp_path)


def test_duplicates_are_impossible_at_the_database_level(tmp_path: Path) -> None:
    store = ResultStore.open_for(tmp_path, config())
    store.record(row())
    with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO results (config_hash, model, method, options, sparsity, task, kind, status, metrics, settings,"
            " provenance, started, seconds) SELECT config_hash, model, method, options, sparsity, task, kind, status,"
            " metrics, settings, provenance, started, seconds FROM results"
        )
