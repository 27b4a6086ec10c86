"""Running a study end to end on tiny real models: every cell, resuming, and surviving SIGKILL at defined moments."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from study_helpers import assert_same_results, reference_study, tiny_study_yaml

from sparselm.errors import SparselmError
from sparselm.study.cells import MODELS_DIR, is_complete_model_dir, plan
from sparselm.study.config import load_config
from sparselm.study.run import run_study, study_lock
from sparselm.study.store import ResultStore


HANG_GUARD_S = 1800  # only stops a hung subprocess; no assertion depends on how fast the machine is


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "study-tiny"


def model_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / MODELS_DIR).glob("*/*") if not p.name.startswith("."))


def test_study_runs_every_cell_and_a_rerun_skips_them(root: Path) -> None:
    config, out = reference_study(root)
    rows = ResultStore.open_existing(out).rows()
    assert {r.key for r in rows} == {c.key for c in plan(config)}
    assert all(r.status == "ok" for r in rows)
    by_task = {(r.method, r.sparsity, r.task): r for r in rows if "llama" in r.model}
    assert by_task[("magnitude", 0.5, "prune")].metrics["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert next(r for k, r in by_task.items() if k[2].startswith("text:")).metrics["token_ppl"] > 1
    pair = next(r for r in rows if r.task == "wiki-pair" and r.method == "wanda")
    assert pair.metrics["finetune"]["sparsity_identical"] is True and 0 <= pair.metrics["accuracy"] <= 1
    pack = next(r for r in rows if r.task == "pack" and r.sparsity == 0.5)
    assert pack.metrics["packed_bytes"] < pack.metrics["dense_bytes"]  # tiny models: mostly the dense embeddings
    assert rows[0].provenance["packages"]["torch"] and rows[0].provenance["seed"] == 0
    # Every pruned model is a plain Hugging Face directory, and the scratch space is gone.
    dirs = model_dirs(out)
    assert len(dirs) == 2 * 2 and all(is_complete_model_dir(d) for d in dirs)
    assert not (out / "work").exists()

    again = run_study(config, out, write_report=False)
    assert again.ran == 0 and again.already_done == len(plan(config))


def test_a_deleted_model_dir_is_made_again_when_a_cell_still_needs_it(root: Path, tmp_path: Path) -> None:
    config, reference = reference_study(root)
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    victim = next(d for d in model_dirs(out) if d.name.startswith("wanda") and d.name.endswith("s0.5") and "llama" in str(d))
    shutil.rmtree(victim)
    with sqlite3.connect(out / "results.sqlite") as conn:  # forget one measurement of that model
        conn.execute("DELETE FROM results WHERE kind = 'perplexity' AND method = 'wanda' AND sparsity = 0.5")
    summary = run_study(config, out, write_report=False)
    assert summary.ran == 2 and not summary.failed  # the prune cell again (its row stays), then the measurement
    assert is_complete_model_dir(victim)
    assert_same_results(reference, out)


def test_a_second_study_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    with study_lock(tmp_path), pytest.raises(SparselmError, match="another study is running"):
        with study_lock(tmp_path):
            pass


def test_a_different_config_in_the_same_directory_is_refused_before_any_work(root: Path, tmp_path: Path) -> None:
    config, reference = reference_study(root)
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    other = load_config(tiny_study_yaml(root, name="other", sparsities="[0, 0.9]"))
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SparselmError, match="different study .* differing in: sparsities"):
        run_study(other, out)
    assert sorted(p.name for p in out.rglob("*")) == before


# Each run of the study is SIGKILLed by itself at one defined point (see KILL_DRIVER), in this order; each point is
# reached whatever the machine's speed, because the cells before it are done or skipped by then.
KILL_POINTS = (
    "record:2",  # while storing the second row: that cell ran, but its result is lost
    "model-rename:1",  # a pruned model fully written in its temporary directory, not yet renamed into place
    "finetune:1",  # a fine-tuned model in the scratch space, not yet evaluated
    "record:4",  # between cells again, later in the study
)
KILL_DRIVER = """
import os, signal, sys
from pathlib import Path

point, count = sys.argv[1].split(":")
count, out = int(count), Path(sys.argv[3]).resolve()
calls = [0]

def reached():
    calls[0] += 1
    if calls[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)

if point == "record":
    from sparselm.study.store import ResultStore
    record = ResultStore.record
    def patched(self, row):
        reached()
        record(self, row)
    ResultStore.record = patched
elif point == "model-rename":
    def guard(rename):
        def patched(src, dst, *args, **kwargs):
            if Path(dst).resolve().parent.parent == out / "models" and Path(src).name.startswith("."):
                reached()
            return rename(src, dst, *args, **kwargs)
        return patched
    os.replace, os.rename = guard(os.replace), guard(os.rename)
elif point == "finetune":
    import sparselm.finetune
    finetune = sparselm.finetune.finetune
    def patched(*args, **kwargs):
        result = finetune(*args, **kwargs)
        reached()
        return result
    sparselm.finetune.finetune = patched
from sparselm.cli import main
sys.argv = ["sparselm", "study", sys.argv[2], "--out", str(out)]
main()
"""


@pytest.mark.slow
def test_sigkill_at_defined_moments_loses_and_duplicates_nothing(root: Path, tmp_path: Path) -> None:
    """Kill a real study process at each of KILL_POINTS in turn, restart it, and compare with an uninterrupted run:
    the same cells, no duplicates, every model directory loadable, no temporary files left."""
    config, reference = reference_study(root)
    config_file = tiny_study_yaml(root)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows_before = 0
    for point in KILL_POINTS:
        killed = subprocess.run(
            [sys.executable, "-c", KILL_DRIVER, point, str(config_file), str(out)],
            capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
        )
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
        _assert_consistent(out)
        rows = _rows(out)
        assert rows >= rows_before, point  # nothing recorded before is lost
        rows_before = rows
        if point.startswith("model-rename"):
            assert [p for p in (out / MODELS_DIR).glob("*/.*") if ".tmp-" in p.name], "killed before the rename"
        if point.startswith("finetune"):
            assert any((out / "work").iterdir()), "killed with a fine-tuned model in the scratch space"
    assert rows_before < len(plan(config))
    final = subprocess.run(
        [str(Path(sys.executable).parent / "sparselm"), "study", str(config_file), "--out", str(out)],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=env,
    )
    assert final.returncode == 0, final.stderr[-2000:]
    _assert_consistent(out)
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name], "temporary files were left behind"
    assert not (out / "work").exists()
    assert_same_results(reference, out)
    assert (out / "report.html").is_file()


def _rows(out: Path) -> int:
    with sqlite3.connect(out / "results.sqlite", timeout=5) as conn:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def _assert_consistent(out: Path) -> None:
    """No duplicate cells, and every model directory that exists under its final name is complete and loadable."""
    if not (out / "results.sqlite").exists():
        return
    with sqlite3.connect(out / "results.sqlite") as conn:
        keys = conn.execute("SELECT model, method, options, sparsity, task FROM results").fetchall()
    assert len(keys) == len(set(keys))
    for d in model_dirs(out):
        assert is_complete_model_dir(d), d
        transformers.AutoModel.from_pretrained(d)
