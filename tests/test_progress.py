"""One progress interface (issue 12 item 6): library code reports start/advance/note through `Progress`, never draws
with rich itself; the command line's one adapter (`cli._common.RichProgress`) draws the bars."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from evaluation_fixtures import SAMPLE, tiny_lm, tiny_tokenizer
from rich.progress import Progress as Bars

import sparselm
from sparselm.analysis import measure_distribution
from sparselm.cli._common import RichProgress
from sparselm.evaluation import perplexity
from sparselm.evaluation.classification import classify
from sparselm.evaluation.mlm import masked_perplexity
from sparselm.evaluation.tasks import Example
from sparselm.progress import SILENT
from sparselm.weights import select_matrices

PACKAGE = Path(sparselm.__file__).parent


class Recorder:
    """A Progress that keeps every event: ("start", stage, total), ("advance", n), ("note", message)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, stage: str, total: int | None) -> None:
        self.events.append(("start", stage, total))

    def advance(self, amount: int = 1) -> None:
        self.events.append(("advance", amount))

    def note(self, message: str) -> None:
        self.events.append(("note", message))

    def stages(self) -> list[tuple[str, int | None, int]]:
        """(stage, total, steps advanced in it) for each stage in order."""
        out: list[list] = []
        for event in self.events:
            if event[0] == "start":
                out.append([event[1], event[2], 0])
            elif event[0] == "advance":
                out[-1][2] += event[1]
        return [tuple(s) for s in out]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_library_module_imports_rich():
    library = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]
    assert len(library) > 30  # the whole package, not an empty glob
    offenders = [
        str(p.relative_to(PACKAGE)) for p in library if any(m == "rich" or m.startswith("rich.") for m in imported_modules(p))
    ]
    assert offenders == []


def test_the_cli_adapter_is_the_only_rich_progress():
    cli = PACKAGE / "cli"
    users = sorted(p.name for p in cli.glob("*.py") if "rich.progress" in imported_modules(p))
    assert users == ["_common.py"]


@pytest.mark.parametrize(
    "function",
    ["sparselm.pruning:prune", "sparselm.pruning:prune_to_dir", "sparselm.pruning:owl_allocation",
     "sparselm.evaluation:evaluate", "sparselm.evaluation:perplexity", "sparselm.evaluation.mlm:masked_perplexity",
     "sparselm.evaluation.classification:classify", "sparselm.finetune:finetune", "sparselm.storage:pack",
     "sparselm.storage:unpack", "sparselm.runtime:accelerate", "sparselm.runtime:bench", "sparselm.runtime:generate",
     "sparselm.analysis:analyze_models", "sparselm.analysis:measure_distribution"],
)
def test_every_long_library_step_takes_a_silent_progress(function):
    import importlib

    module, name = function.split(":")
    parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters["progress"]
    assert parameter.default is SILENT


def test_evaluation_loops_report_every_item_once():
    model, tok = tiny_lm("llama", "causal-lm"), tiny_tokenizer("llama")
    model.train()
    recorder = Recorder()
    result = perplexity(model, tok, SAMPLE, seqlen=32, batch_size=3, progress=recorder)
    assert recorder.stages() == [(f"perplexity ({result.windows}×32 tokens)", result.windows, result.windows)]
    assert [e[1] for e in recorder.events[1:]] == [3] * (result.windows // 3) + ([result.windows % 3] if result.windows % 3 else [])
    assert model.training  # the shared loop gives the model its own mode back
    bert, bert_tok = tiny_lm("bert"), tiny_tokenizer("bert")
    recorder = Recorder()
    masked = masked_perplexity(bert, bert_tok, SAMPLE, seqlen=40, batch_size=2, progress=recorder)
    assert recorder.stages() == [(f"masked-LM perplexity ({masked.windows}×40)", masked.windows, masked.windows)]
    classifier = tiny_lm("bert", "sequence-classification", num_labels=2)
    examples = [Example(text=f"sentence {i}", label=i % 2) for i in range(5)]
    recorder = Recorder()
    scores = classify(classifier, bert_tok, examples, 2, batch_size=2, progress=recorder)
    assert recorder.stages() == [("classifying 5 examples", 5, 5)] and scores.examples == 5
    assert [e[1] for e in recorder.events[1:]] == [2, 2, 1]


def test_analysis_advances_once_per_matrix():
    model = tiny_lm("gpt2")
    recorder = Recorder()
    measure_distribution(model, "tiny", progress=recorder)
    n = len(select_matrices(model))
    assert recorder.stages() == [("analysing tiny", n, n)] and n > 0


def test_rich_adapter_labels_stages_counts_steps_and_closes_unknown_ones():
    bars = Bars(disable=True)
    progress = RichProgress(bars).labelled("magnitude s=0.5")
    progress.start("tokenising [ptb]", None)
    progress.advance(3)
    progress.start("per matrix", 4)
    progress.advance()
    first, second = bars.tasks
    assert first.description == r"magnitude s=0.5: tokenising \[ptb]"  # shown as typed, not as markup
    assert (first.total, first.completed) == (3, 3)  # an unknown-size stage is complete once the next starts
    assert (second.total, second.completed) == (4, 1)
