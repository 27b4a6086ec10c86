"""Executors: Ray (a real local cluster with 2 CPUs) and local worker processes give the same results as in-process."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from study_helpers import assert_same_results, comparable, reference_study, tiny_study_yaml
from typer.testing import CliRunner

from sparselm.cli import app
from sparselm.data import wikitext2_rows
from sparselm.errors import SparselmError
from sparselm.study.cells import plan
from sparselm.study.config import load_config
from sparselm.study.executors import ProcessPoolExecutor, check_ray_address, make_executor
from sparselm.study.run import run_study
from sparselm.study.store import ResultStore, Row


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "study-tiny"


@pytest.mark.slow
def test_ray_executor_gives_the_same_results_as_local(root: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is the optional extra sparselm[ray]; make test installs it")
    config, reference = reference_study(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        check_ray_address(ray.get_runtime_context().gcs_address)  # a live cluster passes the check
        summary = run_study(config, tmp_path / "ray", executor="ray", write_report=False)
    finally:
        ray.shutdown()
    assert not summary.failed, summary.failed
    assert_same_results(reference, tmp_path / "ray")
    rows = ResultStore.open_existing(tmp_path / "ray").rows()
    assert {r.provenance["executor"] for r in rows} == {"ray"}
    # Each task ran with the resources its kind declares (prune asks for more than the others in this config).
    granted = {r.kind: r.provenance["ray_resources"] for r in rows}
    assert granted["prune"]["CPU"] == config.resources.prune.cpus
    assert granted["pack"]["CPU"] == config.resources.pack.cpus
    assert granted["prune"].get("memory", 0) > 0  # estimated from the model's size


def test_local_worker_processes_give_the_same_rows(root: Path) -> None:
    config, reference = reference_study(root)
    cells = [c for c in plan(config) if c.method == "dense" and c.task in ("pack", "wiki-pair")]
    pool = ProcessPoolExecutor(config, str(reference), workers=2)
    try:
        for cell in cells:
            pool.submit(cell)
        rows = []
        while len(rows) < len(cells):
            rows += [Row(**row) for _, row in pool.wait()]
    finally:
        pool.close()
    stored = comparable([r for r in ResultStore.open_existing(reference).rows() if r.key in {c.key for c in cells}])
    got = comparable(rows)
    assert got.keys() == stored.keys()
    for key, metrics in got.items():
        assert metrics == pytest.approx(stored[key], rel=1e-4), key


def serve_once(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A local server that answers its first connection's first bytes with `reply` (b"": never answers)."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):  # the client may hang up at any point
            conn.recv(64)
            if reply:
                conn.sendall(reply)
            conn.recv(64)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return server, thread


HTTP2_SETTINGS_FRAME = bytes([0, 0, 6, 4, 0, 0, 0, 0, 0]) + bytes([0, 3, 0, 0, 0, 128])  # what any gRPC server sends first


def test_an_unreachable_ray_address_fails_fast_and_clearly(root: Path, tmp_path: Path) -> None:
    with pytest.raises(SparselmError, match=r"Ray cluster at '127.0.0.1:9' does not answer .*ray start --head"):
        check_ray_address("127.0.0.1:9")
    silent, _ = serve_once(b"")  # accepts the connection, never speaks: a firewall, a proxy, a hung host
    with silent:
        t0 = time.monotonic()
        with pytest.raises(SparselmError, match=r"does not answer \(127.0.0.1:\d+: timed out, waited at most 0.5 s\)"):
            check_ray_address(f"ray://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - t0 < 5
    web, _ = serve_once(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with web, pytest.raises(SparselmError, match="answers, but not as a gRPC server"):
        check_ray_address(f"127.0.0.1:{web.getsockname()[1]}", timeout=2)
    grpc, thread = serve_once(HTTP2_SETTINGS_FRAME)
    with grpc:
        check_ray_address(f"ray://127.0.0.1:{grpc.getsockname()[1]}", timeout=2)  # a gRPC server answers: passes
        thread.join(timeout=5)
    with pytest.raises(SparselmError, match="not a Ray address"):
        check_ray_address("http://example.org:80")
    with pytest.raises(SparselmError, match="not a Ray address"):
        check_ray_address("127.0.0.1:port")
    config_file = tiny_study_yaml(root)
    result = CliRunner().invoke(
        app, ["study", str(config_file), "--out", str(tmp_path / "out"), "--executor", "ray", "--ray-address", "127.0.0.1:9"]
    )
    assert result.exit_code != 0 and "does not answer" in result.output
    assert not (tmp_path / "out").exists()  # refused before the study directory was touched


def test_executor_options_are_checked(root: Path) -> None:
    config = load_config(tiny_study_yaml(root))
    with pytest.raises(SparselmError, match="only applies to --executor ray"):
        make_executor("local", config, "/tmp", None, "127.0.0.1:6379")
    with pytest.raises(SparselmError, match="unknown executor 'dask'"):
        make_executor("dask", config, "/tmp", None, None)
    with pytest.raises(SparselmError, match="--workers must be at least 1"):
        make_executor("local", config, "/tmp", 0, None)


class RayError(Exception):
    pass


class FakeRay:
    """Just enough of Ray's API for RayExecutor: tasks run in this process, and prune tasks' workers "die"."""

    exceptions = SimpleNamespace(RayError=RayError)

    def __init__(self) -> None:
        self.calls: dict[int, tuple[Any, tuple]] = {}

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 1.0, "memory": 8e9}

    def get_runtime_context(self) -> Any:
        return SimpleNamespace(get_assigned_resources=lambda: {"CPU": 1.0})

    def remote(self, fn: Any) -> Any:
        def submit(*args: Any) -> int:
            self.calls[len(self.calls)] = (fn, args)
            return len(self.calls) - 1

        return SimpleNamespace(options=lambda **_: SimpleNamespace(remote=submit))

    def wait(self, refs: list[int], num_returns: int) -> tuple[list[int], list[int]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: int) -> dict[str, Any]:
        fn, args = self.calls[ref]
        if args[0]["task"] == "prune":
            raise RayError("the worker died unexpectedly (out of memory)")
        return fn(*args)

    def cancel(self, ref: int, force: bool) -> None:
        pass


def test_a_dead_ray_worker_is_an_ordinary_failed_row(root: Path, tmp_path: Path, monkeypatch) -> None:
    """Its cell is stored as failed with Ray's reason, the cells needing its model are skipped, the rest runs."""
    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    overrides = {"analyze": "false", "sparsities": "[0, 0.5]", "methods": "[{method: magnitude}]", "encoder_tasks": "[]",
                 "size": "{enabled: false}", "runtime": "{enabled: false}"}
    config = load_config(tiny_study_yaml(root, name="fake-ray", **overrides))
    summary = run_study(config, tmp_path / "out", executor="ray", write_report=False)
    rows = {(r.model.rsplit("-", 1)[-1], r.method, r.task): r for r in ResultStore.open_existing(tmp_path / "out").rows()}
    text_task = next(task for _, _, task in rows if task.startswith("text:"))
    assert set(rows) == {("llama", "dense", text_task), ("llama", "magnitude", "prune"), ("llama", "magnitude", text_task),
                         ("bert", "magnitude", "prune")}
    for model in ("llama", "bert"):
        prune = rows[(model, "magnitude", "prune")]
        assert (prune.status, prune.kind, prune.metrics) == ("failed", "prune", {})
        assert prune.error == "Ray task failed: RayError: the worker died unexpectedly (out of memory)"
    skipped = rows[("llama", "magnitude", text_task)]
    assert skipped.status == "failed" and skipped.error.startswith("skipped: its pruned model could not be made")
    dense = rows[("llama", "dense", text_task)]
    assert dense.status == "ok" and dense.metrics["token_ppl"] > 1 and dense.provenance["executor"] == "ray"
    assert len(summary.failed) == 3


def test_missing_extras_name_the_package_to_install(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if Ray were not installed
    config = load_config(tiny_study_yaml(root))
    with pytest.raises(SparselmError, match=r"the Ray executor needs the `ray` package, which is optional: pip install 'sparselm\[ray\]'"):
        make_executor("ray", config, str(tmp_path), None, None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SparselmError, match=r"needs the `datasets` package, which is optional: pip install 'sparselm\[hub\]'"):
        wikitext2_rows("test", data_dir=tmp_path)  # a `datasets` folder
