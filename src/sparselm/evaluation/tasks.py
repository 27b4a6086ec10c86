"""The evaluation tasks: text sources for language modelling and a registry of classification tasks.

Language-modelling tasks are the text sources of `sparselm.data` (`ptb`, `wiki`, `wikitext2`, `text:PATH`).
Classification tasks are registered here by name:

* `mrpc` — GLUE MRPC (sentence pairs, paraphrase or not) through `datasets` when the hub is reachable, or the GLUE
  files `train.tsv` / `dev.tsv` from `--data-dir`. GLUE hides the test labels, so `test` evaluates on `dev`.
* `wiki-pair` — the offline stand-in for MRPC: an article's short description vs the first sentence of an extract;
  label 1 when both come from the same article, 0 when the sentence is from another article of the same topic.
  One positive and one negative per article (balanced); articles are split 80/10/10 by the SHA-1 of their title
  (`sparselm.data.wiki_split_of`); the Uncategorized bucket is left out because "same topic" means nothing there.
* `wiki-topic` — the topic of an article's extract, 11 classes (Uncategorized dropped).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .._optional import optional_import
from ..data import normalise_split, parse_source, wiki_articles, wiki_split_of
from ..errors import SparselmError
from ..sources import hub_reachable

LM_TASKS: tuple[str, ...] = ("ptb", "wiki", "wikitext2", "text:PATH")
UNCATEGORIZED = "Uncategorized"
MRPC_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "dev.tsv"}


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    label_names: Callable[[], tuple[str, ...]]
    pair: bool
    loader: Callable[[str, Path | None], list[Example]]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.label_names()

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def examples(self, split: str = "test", data_dir: Path | None = None, max_examples: int | None = None) -> list[Example]:
        rows = self.loader(normalise_split(split), data_dir)
        return rows if max_examples is None else rows[:max_examples]

    def split_used(self, split: str) -> str:
        """The split actually read (MRPC's `test` is its labelled `dev` set)."""
        split = normalise_split(split)
        return "validation" if self.name == "mrpc" and split == "test" else split


CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {}


def register(name: str, labels: Callable[[], tuple[str, ...]], pair: bool) -> Callable:
    """Register a loader of a split's examples; `labels` is called lazily (the Wikipedia topics need the data)."""

    def add(loader: Callable[[str, Path | None], list[Example]]) -> Callable:
        CLASSIFICATION_TASKS[name] = ClassificationTask(name, labels, pair, loader)
        return loader

    return add


def task_names() -> list[str]:
    return [*LM_TASKS, *CLASSIFICATION_TASKS]


def is_classification(task: str) -> bool:
    return task in CLASSIFICATION_TASKS


def classification_task(task: str) -> ClassificationTask:
    if task not in CLASSIFICATION_TASKS:
        raise SparselmError(f"unknown task '{task}'; use one of: {', '.join(task_names())}")
    return CLASSIFICATION_TASKS[task]


def check_task(task: str) -> None:
    """Fail with the list of tasks when `task` is neither a text source nor a classification task."""
    if is_classification(task):
        return
    if task.startswith("text:"):
        parse_source(task)  # its own message for a missing path
        return
    try:
        parse_source(task)
    except SparselmError:
        raise SparselmError(f"unknown task '{task}'; use one of: {', '.join(task_names())}") from None


def _title_order(title: str) -> str:
    """A deterministic shuffle: articles ordered by the SHA-1 of their title."""
    return hashlib.sha1(title.encode("utf-8")).hexdigest()


def first_sentence(text: str) -> str:
    """The extract up to the first full stop, question or exclamation mark followed by white space."""
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def topic_labels() -> tuple[str, ...]:
    return tuple(sorted({a["topic"] for a in wiki_articles()} - {UNCATEGORIZED}))


def _topical_articles(split: str) -> list[dict[str, str]]:
    rows = [a for a in wiki_articles() if a["topic"] != UNCATEGORIZED and wiki_split_of(a["title"]) == split]
    return sorted(rows, key=lambda a: _title_order(a["title"]))


@register("wiki-pair", labels=lambda: ("different", "same"), pair=True)
def wiki_pair_examples(split: str, data_dir: Path | None = None) -> list[Example]:
    """One same-article and one same-topic-other-article pair per article with a description."""
    return list(_wiki_pairs(split))


@lru_cache(maxsize=3)
def _wiki_pairs(split: str) -> tuple[Example, ...]:
    articles = [a for a in _topical_articles(split) if a["description"].strip()]
    by_topic: dict[str, list[dict[str, str]]] = {}
    for article in articles:
        by_topic.setdefault(article["topic"], []).append(article)
    position = {a["title"]: i for peers in by_topic.values() for i, a in enumerate(peers)}
    rows: list[Example] = []
    for article in articles:
        peers = by_topic[article["topic"]]
        if len(peers) < 2:
            continue
        step = 1 + int(_title_order(article["title"]), 16) % (len(peers) - 1)
        other = peers[(position[article["title"]] + step) % len(peers)]
        rows.append(Example(article["description"], 1, first_sentence(article["extract"])))
        rows.append(Example(article["description"], 0, first_sentence(other["extract"])))
    return tuple(rows)


@register("wiki-topic", labels=topic_labels, pair=False)
def wiki_topic_examples(split: str, data_dir: Path | None = None) -> list[Example]:
    labels = {name: i for i, name in enumerate(topic_labels())}
    return [Example(a["extract"], labels[a["topic"]]) for a in _topical_articles(split)]


@register("mrpc", labels=lambda: ("not_equivalent", "equivalent"), pair=True)
def mrpc_examples(split: str, data_dir: Path | None = None) -> list[Example]:
    if data_dir is not None:
        return _mrpc_from_files(Path(data_dir), split)
    if not hub_reachable():
        raise SparselmError(
            "GLUE MRPC is not available offline: download the GLUE MRPC files (train.tsv, dev.tsv) where there is a "
            "network and pass --data-dir DIR, or use --task wiki-pair (the offline stand-in)"
        )
    load_dataset = optional_import("datasets", "hub", "GLUE MRPC from the hub").load_dataset
    hub_split = "validation" if split == "test" else split
    data = load_dataset("nyu-mll/glue", "mrpc", split=hub_split)
    return [Example(r["sentence1"], int(r["label"]), r["sentence2"]) for r in data]


def _mrpc_from_files(data_dir: Path, split: str) -> list[Example]:
    path = data_dir / MRPC_FILES[split]
    if not path.is_file():
        raise SparselmError(
            f"no GLUE MRPC file at '{path}'; --data-dir must hold GLUE's MRPC train.tsv and dev.tsv"
        )
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        needed = {"Quality", "#1 String", "#2 String"}
        if not needed <= set(reader.fieldnames or ()):
            raise SparselmError(f"'{path}' is not a GLUE MRPC file (needs columns {', '.join(sorted(needed))})")
        return [Example(r["#1 String"], int(r["Quality"]), r["#2 String"]) for r in reader]
