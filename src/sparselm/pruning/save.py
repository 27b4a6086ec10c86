"""Prune a model by name or path into a new Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..facts import SPARSITY_JSON, format_size
from ..io import atomic_dir, atomic_write_json
from ..models import load_tokenizer, load_with_source
from ..progress import SILENT, Progress
from ..sources import write_provenance
from .driver import prune
from .report import PrunedModel
from .settings import PruneSettings
from .stream import needs_streaming, prune_streamed


def prune_to_dir(
    model_name_or_path: str,
    settings: PruneSettings,
    out_dir: Path,
    progress: Progress = SILENT,
    force: bool = False,
    max_memory: int | None = None,
    device: torch.device | None = None,
) -> PrunedModel:
    """Load, prune and write a plain Hugging Face directory with sparsity.json and provenance.json, atomically.

    `out_dir` is replaced only when sparselm wrote it (or it is empty) unless `force`. With `max_memory` (bytes), or
    when the weights would not fit in the available memory, the model is pruned block by block from disk
    (`stream.py`)."""
    notes: tuple[str, ...] = ()
    too_big = needs_streaming(model_name_or_path) if max_memory is None else None
    if too_big is not None:
        weights, max_memory = too_big
        notes = (
            f"the model's weights ({format_size(weights)}) do not fit in the available memory "
            f"({format_size(max_memory)}): pruned block by block from disk",
        )
    if max_memory is not None:
        return prune_streamed(model_name_or_path, settings, out_dir, max_memory, progress, force, device, notes)
    model, source = load_with_source(model_name_or_path)
    if device is not None:
        model.to(device)
    tokenizer = load_tokenizer(source.path, required=False)  # magnitude needs none; prune() names who does
    report = prune(model, settings, tokenizer, progress)
    result = PrunedModel(model_name_or_path, Path(out_dir), report)
    with atomic_dir(Path(out_dir), force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SPARSITY_JSON, result.to_json())
        write_provenance(tmp, source, pruned={"method": settings.method, "sparsity": report.target_sparsity})
    return result
