"""Atomic outputs: what may be replaced, what never is, modes from the umask, and nothing left behind."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sparselm import io
from sparselm.errors import SparselmError
from sparselm.io import (
    MARKER, atomic_dir, atomic_write_bytes, check_output_dir, current_umask, replace_dir, replace_with_empty_dir,
    sparselm_wrote,
)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def user_tree(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("notes\n")
    (path / "sub" / "code.py").write_text("print(1)\n")
    return path


def written_dir(path: Path) -> Path:
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"w")
    return path


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or "probe" in p.name)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- what "sparselm wrote it" means


def test_marker_lists_exactly_the_entries_sparselm_wrote(tmp_path):
    out = written_dir(tmp_path / "out")
    marker = json.loads((out / MARKER).read_text())
    assert marker == {"written_by": "sparselm", "entries": ["config.json", "model.safetensors"]}
    assert sparselm_wrote(out)


def test_an_entry_added_after_sparselm_wrote_makes_it_a_users_directory(tmp_path):
    out = written_dir(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    assert not sparselm_wrote(out)
    (out / "notes.txt").unlink()
    (out / "sub").mkdir()
    assert not sparselm_wrote(out)


@pytest.mark.parametrize("marker", ['{"written_by": "someone", "entries": ["a"]}', "{broken", '["a"]'])
def test_a_marker_sparselm_did_not_write_is_not_trusted(tmp_path, marker):
    out = tmp_path / "out"
    (out / ".sparselm").mkdir(parents=True)
    (out / MARKER).write_text(marker)
    (out / "a").write_text("x")
    assert not sparselm_wrote(out)


def test_legacy_outputs_are_recognised_by_sparselm_json_files_only_when_flat(tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "provenance.json").write_text('{"base_model": "x", "quantized_from": null}')
    assert sparselm_wrote(legacy)
    (legacy / "sub").mkdir()
    assert not sparselm_wrote(legacy)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "provenance.json").write_text("not json")
    assert not sparselm_wrote(plain)
    assert not sparselm_wrote(user_tree(tmp_path / "user"))


def test_a_symlink_to_a_sparselm_directory_is_not_sparselm_written(tmp_path):
    out = written_dir(tmp_path / "out")
    (tmp_path / "link").symlink_to(out)
    assert sparselm_wrote(out) and not sparselm_wrote(tmp_path / "link")


# --- check_output_dir


def test_absent_empty_and_sparselm_written_outputs_pass(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    check_output_dir(written_dir(tmp_path / "out"))
    assert leftovers(tmp_path) == []


def test_a_users_directory_or_file_needs_force(tmp_path):
    user = user_tree(tmp_path / "user")
    with pytest.raises(SparselmError, match=r"'.*user' is a directory that sparselm did not write.*--force"):
        check_output_dir(user)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SparselmError, match=r"is a file that sparselm did not write.*--force"):
        check_output_dir(tmp_path / "file.txt")
    (tmp_path / "link").symlink_to(written_dir(tmp_path / "out"))
    with pytest.raises(SparselmError, match="'.*link' is a symbolic link that sparselm did not write.*--force"):
        check_output_dir(tmp_path / "link")
    for path in (user, tmp_path / "file.txt", tmp_path / "link"):
        check_output_dir(path, force=True)
    assert (user / "sub" / "code.py").read_text() == "print(1)\n"


@pytest.mark.parametrize("force", [False, True])
def test_inputs_are_never_replaced_even_with_force(tmp_path, force):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    with pytest.raises(SparselmError, match=f"^output '{model}' is the input '{model}'; choose an output outside it$"):
        check_output_dir(model, [model], force)
    with pytest.raises(SparselmError, match=f"^output '{tmp_path / 'models'}' holds the input '{model}'"):
        check_output_dir(tmp_path / "models", [model], force)
    with pytest.raises(SparselmError, match=f"^output '{model / 'pruned'}' lies inside the input '{model}'"):
        check_output_dir(model / "pruned", [model], force)
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(SparselmError, match="is the input"):
        check_output_dir(tmp_path / "alias", [model], force)
    check_output_dir(tmp_path / "models" / "m2", [model], force)


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_the_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SparselmError, match="current directory"):
        check_output_dir(Path(out), force=True)
    check_output_dir(Path("sub"))


def test_unwritable_places_fail_before_any_work(tmp_path):
    with pytest.raises(SparselmError, match="cannot write to output directory '/proc/x'"):
        check_output_dir(Path("/proc/x"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SparselmError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file" / "a" / "b")
    assert not (tmp_path / "file" / "a").exists() and leftovers(tmp_path) == []


# --- atomic_dir and atomic writes


def test_atomic_dir_replaces_a_previous_output_and_leaves_nothing_behind(tmp_path):
    out = written_dir(tmp_path / "out")
    with atomic_dir(out) as tmp:
        (tmp / "new.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".sparselm", "new.json"]
    assert json.loads((out / MARKER).read_text())["entries"] == ["new.json"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_the_previous_output(tmp_path):
    out = written_dir(tmp_path / "out")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [".sparselm", "config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []


def tree_of(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_atomic_dir_refuses_a_users_directory_file_or_link_before_writing_and_force_replaces_them(tmp_path):
    user = user_tree(tmp_path / "user")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "link").symlink_to(user)
    before = tree_of(user)
    cases = ((user, "a directory"), (tmp_path / "file.txt", "a file"), (tmp_path / "link", "a symbolic link"))
    for path, kind in cases:
        entered = []
        with pytest.raises(SparselmError, match=rf"'{path}' is {kind} that sparselm did not write.*force=True"):
            with atomic_dir(path) as tmp:
                entered.append(tmp)
        assert entered == []  # refused before the temporary directory exists
    assert tree_of(user) == before and (tmp_path / "file.txt").read_text() == "x" and leftovers(tmp_path) == []
    with atomic_dir(user, force=True) as tmp:
        (tmp / "new.json").write_text("{}")
    assert sorted(p.name for p in user.iterdir()) == [".sparselm", "new.json"]


def test_atomic_dir_refuses_when_a_person_adds_to_the_output_while_it_works(tmp_path):
    out = written_dir(tmp_path / "out")
    with pytest.raises(SparselmError, match="sparselm did not write"), atomic_dir(out) as tmp:
        (tmp / "new.json").write_text("{}")
        (out / "mine.txt").write_text("mine")  # added during the work: the directory is now partly theirs
    assert (out / "mine.txt").read_text() == "mine" and (out / "model.safetensors").read_bytes() == b"w"
    assert leftovers(tmp_path) == []


def test_replace_with_empty_dir_takes_the_place_of_a_file_or_directory(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for path in (user_tree(tmp_path / "user"), tmp_path / "file.txt"):
        replace_with_empty_dir(path)
        assert path.is_dir() and list(path.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_a_directory_the_command_continues_passes_without_force(tmp_path):
    user = user_tree(tmp_path / "study")
    check_output_dir(user, resumes=lambda path: (path / "notes.txt").is_file())
    with pytest.raises(SparselmError, match="sparselm did not write"):
        check_output_dir(user, resumes=lambda path: False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SparselmError, match="is a file that sparselm did not write"):
        check_output_dir(tmp_path / "file.txt", resumes=lambda path: True)  # only a directory is ever continued


def test_a_relative_output_gets_its_temporary_sibling_next_to_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    with atomic_dir(Path("rel")) as tmp:
        seen.append(tmp)
    assert seen[0].parent == tmp_path and (tmp_path / "rel" / MARKER).is_file() and leftovers(tmp_path) == []


def test_replace_dir_puts_the_previous_directory_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    final = written_dir(tmp_path / "out")
    src = tmp_path / "src"
    src.mkdir()
    real_replace = os.replace

    def failing_replace(a, b):
        if Path(a) == src:
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError):
        replace_dir(src, final)
    assert (final / "model.safetensors").read_bytes() == b"w" and leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, mask):
    with umask(mask):
        assert current_umask() == mask
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors creates it 0600
            (tmp / "sub").mkdir(mode=0o700)
            atomic_write_bytes(tmp / "sub" / "a.json", b"{}")
        atomic_write_bytes(tmp_path / "alone.txt", b"x")
    out = tmp_path / "out"
    for path in (out, out / "sub", out / ".sparselm"):
        assert mode(path) == 0o777 & ~mask, path
    for path in (out / "model.safetensors", out / "sub" / "a.json", out / MARKER, tmp_path / "alone.txt"):
        assert mode(path) == 0o666 & ~mask, path


# --- every library writer goes through atomic_dir, so Python callers are protected as the CLI's users are


@pytest.fixture(scope="module")
def library_writers(tmp_path_factory) -> dict[str, Callable[..., Any]]:
    from evaluation_fixtures import save_tiny

    from sparselm.finetune import finetune
    from sparselm.pruning import PruneSettings, prune_to_dir
    from sparselm.storage import pack, unpack

    root = tmp_path_factory.mktemp("sources")
    src = save_tiny(root / "bert", "bert")
    packed = root / "packed"
    pack(src, packed)
    settings = PruneSettings(method="magnitude", sparsity=0.5)
    return {
        "prune_to_dir": lambda out, **kw: prune_to_dir(str(src), settings, out, **kw),
        "pack": lambda out, **kw: pack(src, out, **kw),
        "unpack": lambda out, **kw: unpack(packed, out, **kw),
        "finetune": lambda out, **kw: finetune(str(src), "wiki-pair", out, max_steps=1, batch_size=2,
                                               max_examples=4, **kw),
    }


@pytest.mark.parametrize("writer", ["prune_to_dir", "pack", "unpack", "finetune"])
def test_library_writers_never_replace_a_users_directory_unless_forced(tmp_path, library_writers, writer):
    user = user_tree(tmp_path / "user")
    before = tree_of(user)
    with pytest.raises(SparselmError, match="sparselm did not write.*force=True"):
        library_writers[writer](user)
    assert tree_of(user) == before and leftovers(tmp_path) == []
    library_writers[writer](user, force=True)
    assert not (user / "notes.txt").exists() and (user / "config.json").is_file() and sparselm_wrote(user)
    library_writers[writer](user)  # its own output is replaced without force
    assert sparselm_wrote(user)
