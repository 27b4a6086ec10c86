"""Atomic file and directory writes: a result is either complete or absent, never half-written.

Every directory sparselm writes through `atomic_dir` carries a marker, `.sparselm/output.json`, that lists the
entries sparselm put there. `check_output_dir` (commands, before any work) and `atomic_dir` itself (every library
call, when it writes) replace a path only when it is absent, an empty directory, or a directory sparselm wrote whose
entries are still exactly its own (nothing a person added since); anything else needs `force`. The marker is a
directory so that code copying a model's small files (which copies plain files only) never carries it into another
output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SparselmError
from .facts import PROVENANCE_JSON, STATS_JSON

MARKER_DIR = ".sparselm"
MARKER = Path(MARKER_DIR) / "output.json"
WRITTEN_BY = "sparselm"
# Files by which directories written before the marker existed are recognised (each a JSON object sparselm wrote).
LEGACY_OUTPUT_FILES = (PROVENANCE_JSON, STATS_JSON)


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` if needed and prove it is writable, or fail with a clear message."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sparselm-probe-"):
            pass
    except OSError as exc:
        raise SparselmError(
            f"cannot write to output directory '{path}' ({exc.strerror or exc}); choose a writable --out"
        ) from exc
    return path


def sparselm_wrote(path: Path) -> bool:
    """Whether `path` is a real directory sparselm wrote and nobody has added anything to since.

    With the marker: every entry but the marker is one the marker lists. Without it (written by an older sparselm):
    only plain files, one of them a JSON object named in LEGACY_OUTPUT_FILES.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()} - {MARKER_DIR}
    marker = _read_json_object(path / MARKER)
    if marker is not None:
        listed = marker.get("entries")
        return marker.get("written_by") == WRITTEN_BY and isinstance(listed, list) and entries <= set(listed)
    plain_files = all((path / name).is_file() and not (path / name).is_symlink() for name in entries)
    if (path / MARKER_DIR).exists() or not plain_files:
        return False
    return any(_read_json_object(path / name) is not None for name in LEGACY_OUTPUT_FILES)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_output_dir(
    out: Path, inputs: Iterable[Path] = (), force: bool = False, resumes: Callable[[Path], bool] | None = None
) -> None:
    """Refuse, before any work starts, an output directory that must not or cannot be replaced.

    Never allowed, even with `force`: the current directory or one holding it, and a path that is, holds or lies
    inside an input. Allowed without `force`: an absent path, an empty directory, a directory sparselm wrote, and
    a directory `resumes` accepts (one the command continues rather than replaces, such as a study's folder).
    The nearest existing ancestor must be a writable directory (so that `/proc/x` fails now, not after the work).
    """
    target = Path(os.path.abspath(Path(out).expanduser()))
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise SparselmError(
            f"output '{out}' is the current directory or holds it, which cannot be replaced; "
            "name a new directory instead (e.g. --out ./out)"
        )
    for given in inputs:
        source = Path(given).expanduser().resolve()
        relation = "is" if real == source else "holds" if real in source.parents else "lies inside"
        if real == source or real in source.parents or source in real.parents:
            raise SparselmError(f"output '{out}' {relation} the input '{given}'; choose an output outside it")
    continued = resumes is not None and not target.is_symlink() and target.is_dir() and resumes(target)
    if _present(target) and not force and not continued and not _replaceable(target):
        raise SparselmError(
            f"'{out}' is {_kind(target)} that sparselm did not write; "
            "choose another --out, or pass --force to replace it"
        )
    _check_creatable(target, out)


def _present(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def _kind(path: Path) -> str:
    return "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "a file"


def _replaceable(path: Path) -> bool:
    return sparselm_wrote(path) or (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))


def _check_creatable(target: Path, shown: Path) -> None:
    """The nearest existing ancestor of `target` is a directory in which a new entry can be created."""
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SparselmError(
            f"cannot write to output directory '{shown}': '{ancestor}' is a file, not a directory; "
            "choose a writable --out"
        )
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".sparselm-probe-"))
    except OSError as exc:
        raise SparselmError(
            f"cannot write to output directory '{shown}' ({exc.strerror or exc} in '{ancestor}'); "
            "choose a writable --out"
        ) from None


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename, on error it is removed.

    `final` may already be there only as a directory sparselm wrote (or an empty one), unless `force`: checked
    before anything is written and again just before the rename, so nothing a person made in between is lost.
    The finished directory gets the marker listing its entries, and every entry the mode the umask gives a new file
    or directory (mkdtemp and safetensors create theirs private).
    """
    final = Path(os.path.abspath(Path(final).expanduser()))
    _refuse_foreign(final, force)
    ensure_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        write_marker(tmp)
        apply_umask(tmp)
        _refuse_foreign(final, force)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_foreign(final: Path, force: bool) -> None:
    if _present(final) and not force and not _replaceable(final):
        raise SparselmError(
            f"'{final}' is {_kind(final)} that sparselm did not write; choose another output directory, "
            "or pass force=True (--force on the command line) to replace it"
        )


def replace_with_empty_dir(path: Path) -> None:
    """Put an empty directory where `path` is (a file, a link or a directory), with no moment where neither exists."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    empty = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(empty, 0o777 & ~current_umask())
    replace_dir(empty, path)


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes `mkdir`/`open` would: 0777/0666 less the umask (x bits kept)."""
    umask = current_umask()
    for path in (root, *Path(root).rglob("*")):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def write_marker(path: Path) -> None:
    """Record that sparselm wrote `path` and which entries it holds."""
    entries = sorted(p.name for p in Path(path).iterdir() if p.name != MARKER_DIR)
    (Path(path) / MARKER_DIR).mkdir(mode=0o777, exist_ok=True)
    atomic_write_json(Path(path) / MARKER, {"written_by": WRITTEN_BY, "entries": entries})


def replace_dir(src: Path, final: Path) -> None:
    """Move a finished directory into place, replacing any previous one without a window where neither exists.

    If the new directory cannot be moved in, the previous one is put back.
    """
    if not (final.exists() or final.is_symlink()):
        os.replace(src, final)
        return
    trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    try:
        os.replace(final, trash / final.name)
    except BaseException:
        os.rmdir(trash)
        raise
    try:
        os.replace(src, final)
    except BaseException:
        os.replace(trash / final.name, final)
        os.rmdir(trash)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and one rename, with the mode the umask gives a new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
