"""`sparselm study --out`: a new, empty or study folder is used; anything else is refused, or replaced with --force."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparselm.cli import app
from sparselm.cli import study as study_cli
from sparselm.study.config import load_config
from sparselm.study.run import StudySummary
from sparselm.study.store import STORE_FILE, ResultStore


@pytest.fixture
def started(monkeypatch) -> list[tuple[Path, list[str]]]:
    """Each study the command starts, with what its folder held at that moment (the study itself is not run)."""
    calls: list[tuple[Path, list[str]]] = []

    def fake_run_study(config, out, *args, **kwargs):
        calls.append((Path(out), sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else []))
        return StudySummary(Path(out), config.hash, planned=0, already_done=0)

    monkeypatch.setattr(study_cli, "run_study", fake_run_study)
    return calls


def invoke(*args: object):
    return CliRunner().invoke(app, ["study", *(str(a) for a in args), "--json"])


def users_folder(path: Path) -> Path:
    (path / "thesis").mkdir(parents=True)
    (path / "thesis" / "chapter1.tex").write_text("text")
    return path


def test_a_users_folder_is_refused_before_the_study_starts(tmp_path, started):
    out = users_folder(tmp_path / "docs")
    result = invoke("--out", out)
    assert result.exit_code != 0 and started == []
    assert "is a directory that sparselm did not write" in result.output and "--force" in result.output
    assert (out / "thesis" / "chapter1.tex").read_text() == "text"


def test_force_replaces_a_users_folder_with_an_empty_study_folder(tmp_path, started):
    out = users_folder(tmp_path / "docs")
    result = invoke("--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert started == [(out, [])]


def test_a_study_folder_is_continued_not_replaced(tmp_path, started):
    out = tmp_path / "results"
    out.mkdir()
    ResultStore.open_for(out, load_config(None))  # what a first run of the default study leaves
    (out / "models").mkdir()
    result = invoke("--out", out)
    assert result.exit_code == 0, result.output
    assert started == [(out, ["models", STORE_FILE])]


def test_a_new_or_empty_folder_is_used(tmp_path, started):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert invoke("--out", out).exit_code == 0
    assert [call[0] for call in started] == [tmp_path / "new", tmp_path / "empty"]


def test_the_config_file_is_never_replaced_even_with_force(tmp_path, started):
    config = tmp_path / "lab" / "study.yaml"
    config.parent.mkdir()
    config.write_text(load_config(None).model_dump_json())  # any valid config: JSON is YAML
    for extra in ((), ("--force",)):
        result = invoke(config, "--out", tmp_path / "lab", *extra)
        assert result.exit_code != 0 and "holds the input" in result.output
    assert config.is_file() and started == []
