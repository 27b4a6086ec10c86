"""Executors: Ray (a real local cluster with 2 CPUs) and local worker processes give the same results as in-process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from study_helpers import assert_same_results, comparable, reference_study, tiny_study_yaml
from typer.testing import CliRunner

from sparselm.cli import app
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


def test_an_unreachable_ray_address_fails_fast_and_clearly(root: Path, tmp_path: Path) -> None:
    with pytest.raises(SparselmError, match=r"Ray cluster at '127.0.0.1:9' does not answer .*ray start --head"):
        check_ray_address("127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(SparselmError, match="does not answer"):
        check_ray_address("ray://10.255.255.1:10001", timeout=0.5)  # non-routable: the connection times out
    assert time.monotonic() - t0 < 5
    with pytest.raises(SparselmError, match="not a Ray address"):
        check_ray_address("http://example.org:80")
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
