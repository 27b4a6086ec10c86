"""One entry point for every method: pick the matrices, calibrate when needed, prune, and report what was done.

What each method does to one matrix is its registered `Pruner`'s business (`registry.py`); this module decides the
order: the calibration windows (`sparselm.windows`), OWL's per-block targets (`owl.py`), then the matrices — all
together (`--scope global`), one by one, or block by block through the calibration driver for methods that score
with calibration inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..calibration import BlockRef, collect_inputs, run_blocks, total_blocks
from ..errors import SparselmError
from ..masks import check_shape
from ..weights import Matrix, by_block, select_matrices
from ..windows import CALIBRATION_SPLIT, calibration_windows
from .magnitude import prune_by_magnitude
from .owl import OwlAllocation, block_pattern, owl_allocation
from ..progress import SILENT, Progress
from .report import PruneReport, matrix_row
from .settings import PruneSettings, settings_from

Note = Callable[[str], None]


def prune(
    model: nn.Module,
    settings: PruneSettings | None = None,
    tokenizer: Any = None,
    progress: Progress = SILENT,
    windows: torch.Tensor | None = None,
    owl: OwlAllocation | None = None,
    **fields: Any,
) -> PruneReport:
    """Prune `model` in place. Pass a PruneSettings or its fields (`method=`, `sparsity=`, …).

    `windows` (samples × seqlen token ids) replaces the calibration text when given. `owl` reuses an allocation
    from `owl_allocation` on the same dense model (it depends only on the dense model, the windows, the target
    sparsity and the OWL parameters), so several methods can share one calibration pass for it.
    """
    settings = settings if settings is not None else settings_from(**fields)
    started = time.perf_counter()
    matrices = select_matrices(model, settings.include_embeddings)
    for m in matrices:
        check_shape(settings.parsed_pattern, m.shape, m.name)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        progress.note(message)

    calibration = None
    if settings.needs_calibration:
        windows, calibration = _windows(model, settings, tokenizer, windows, note, progress)
    calibrated_at = time.perf_counter()
    allocation = (owl or owl_allocation(model, settings, windows, progress)) if settings.allocation == "owl" else None
    targets = {
        m.name: allocation.target(m.block_name, settings.target_sparsity) if allocation else settings.target_sparsity
        for m in matrices
    }
    if settings.scope == "global":
        progress.start(f"global {settings.method}", 1)
        settings.pruner.prune_together(matrices, settings.target_sparsity, settings.parsed_pattern)
        progress.advance()
    elif settings.pruner.needs_calibration:
        _prune_block_by_block(model, matrices, settings, targets, windows, note, progress)
    else:
        _prune_each(matrices, settings, targets, progress)
    return PruneReport(
        settings=settings,
        target_sparsity=settings.target_sparsity,
        matrices=[matrix_row(m, targets[m.name], settings.parsed_pattern) for m in matrices],
        calibration=calibration,
        block_sparsity=allocation.block_sparsity if allocation else None,
        outlier_ratio=allocation.outlier_ratio if allocation else None,
        seconds=time.perf_counter() - started,
        calibration_seconds=calibrated_at - started if calibration else 0.0,
        notes=notes,
    )


def _windows(
    model: nn.Module, settings: PruneSettings, tokenizer: Any, windows: torch.Tensor | None, note: Note,
    progress: Progress,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The given windows, or windows of the calibration text (which needs the model's tokenizer)."""
    if windows is not None:
        return windows, {"source": "given token windows", "samples": windows.shape[0], "seqlen": windows.shape[1]}
    if tokenizer is None:
        raise SparselmError(
            f"{settings.method} needs calibration text but the model has no tokenizer; "
            "save the tokenizer next to the model (tokenizer.save_pretrained) or use --method magnitude"
        )
    progress.start(f"tokenising {settings.calib} ({CALIBRATION_SPLIT})", 1)
    found = calibration_windows(
        model, tokenizer, settings.calib, settings.calib_samples, settings.calib_seqlen, settings.seed, note
    )
    progress.advance()
    return found


def _prune_one(m: Matrix, settings: PruneSettings, sparsity: float, stats: Any = None) -> None:
    settings.pruner.prune_matrix(m, stats, block_pattern(settings.parsed_pattern, sparsity), sparsity, settings)


def _prune_each(matrices: list[Matrix], settings: PruneSettings, targets: dict[str, float], progress: Progress) -> None:
    progress.start(f"{settings.method} per matrix", len(matrices))
    for m in matrices:
        _prune_one(m, settings, targets[m.name])
        progress.advance()


def _prune_by_magnitude(m: Matrix, settings: PruneSettings, sparsity: float) -> None:
    prune_by_magnitude(m.weight(), block_pattern(settings.parsed_pattern, sparsity), sparsity)


def _prune_block_by_block(
    model: nn.Module,
    matrices: list[Matrix],
    settings: PruneSettings,
    targets: dict[str, float],
    windows: torch.Tensor,
    note: Note,
    progress: Progress,
) -> None:
    """Calibrated methods, block by block; matrices outside blocks (embeddings, heads) fall back to magnitude."""
    groups = by_block(matrices)
    method = settings.pruner

    def visit(ref: BlockRef, run: Callable[[], object]) -> None:
        mats = groups.get(ref.name, [])
        if not mats:
            return
        stats = collect_inputs(mats, method.collector, run)
        for m in mats:
            if stats[m.name].tokens == 0:
                note(f"{m.name} saw no calibration input; pruned by magnitude instead")
                _prune_by_magnitude(m, settings, targets[m.name])
            else:
                _prune_one(m, settings, targets[m.name], stats[m.name])

    progress.start(f"{settings.method} block by block", total_blocks(model))
    run_blocks(model, windows, visit, lambda _ref: progress.advance())
    for m in matrices:
        if m.block_name is None:
            _prune_by_magnitude(m, settings, targets[m.name])
