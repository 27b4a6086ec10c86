"""Prune a model by name or path into a new Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..facts import SPARSITY_JSON
from ..io import atomic_dir, atomic_write_json
from ..models import load_tokenizer, load_with_source
from ..sources import write_provenance
from .driver import prune
from ..progress import Progress
from .settings import PruneSettings


def prune_to_dir(
    model_name_or_path: str,
    settings: PruneSettings,
    out_dir: Path,
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Load, prune and write a plain Hugging Face directory with sparsity.json and provenance.json, atomically.

    `out_dir` is replaced only when sparselm wrote it (or it is empty) unless `force`."""
    model, source = load_with_source(model_name_or_path)
    tokenizer = load_tokenizer(source.path, required=False)  # magnitude needs none; prune() names who does
    report = prune(model, settings, tokenizer, progress)
    result = {"model": model_name_or_path, **report.to_json()}
    with atomic_dir(Path(out_dir), force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SPARSITY_JSON, result)
        write_provenance(tmp, source, pruned={"method": settings.method, "sparsity": report.target_sparsity})
    return result
