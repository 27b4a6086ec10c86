"""Which sparselm code made a benchmark's cached result: a hash over the package's source files, so that a result
made by other code is made again."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sparselm

PACKAGE = Path(sparselm.__file__).parent


def with_sources(digest: Any, files: Iterable[Path]) -> Any:
    """`digest` (a hashlib object) updated with each package file's path and bytes, in path order."""
    for path in sorted(files):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest
