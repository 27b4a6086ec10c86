"""One entry point for every method: pick the matrices, calibrate when needed, prune, and report what was done."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..calibration import (
    BlockRef,
    choose_seqlen,
    module_hooks,
    run_blocks,
    sample_windows,
    token_stream,
    total_blocks,
)
from ..errors import SparselmError
from ..io import atomic_dir, atomic_write_json
from ..masks import NM, Pattern, apply_keep, check_shape, keep_mask
from ..models import ModelSource, load_with_source, write_provenance
from ..weights import Matrix, select_matrices
from .magnitude import prune_global
from .owl import outlier_ratio, owl_sparsities
from .settings import PruneSettings, settings_from
from .sparsegpt import HessianAccumulator, sparsegpt_prune
from .wanda import ColumnNorms, wanda_scores

SPARSITY_FILE = "sparsity.json"
CALIBRATION_SPLIT = "train"


class Progress(Protocol):
    """What the library tells a user interface while it works (the CLI draws rich bars from it)."""

    def start(self, stage: str, total: int) -> None: ...

    def advance(self) -> None: ...

    def note(self, message: str) -> None: ...


class SilentProgress:
    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class PruneReport:
    """What a pruning run did; `to_json()` is the content of sparsity.json."""

    settings: PruneSettings
    target_sparsity: float
    matrices: list[dict[str, Any]]
    calibration: dict[str, Any] | None
    block_sparsity: dict[str, float] | None
    outlier_ratio: dict[str, float] | None
    seconds: float
    calibration_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def zeros(self) -> int:
        return sum(m["zeros"] for m in self.matrices)

    @property
    def weights(self) -> int:
        return sum(m["numel"] for m in self.matrices)

    @property
    def achieved_sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "method": s.method,
            "sparsity": self.target_sparsity,
            "scope": s.scope,
            "pattern": s.pattern,
            "allocation": s.allocation,
            "include_embeddings": s.include_embeddings,
            "parameters": s.model_dump(),
            "calibration": self.calibration,
            "achieved_sparsity": self.achieved_sparsity,
            "pruned_weights": self.zeros,
            "prunable_weights": self.weights,
            "block_sparsity": self.block_sparsity,
            "owl_outlier_ratio": self.outlier_ratio,
            "matrices": self.matrices,
            "seconds": round(self.seconds, 3),
            "calibration_seconds": round(self.calibration_seconds, 3),
            "notes": self.notes,
            "sparselm_version": _version(),
        }


def prune(
    model: nn.Module,
    settings: PruneSettings | None = None,
    tokenizer: Any = None,
    progress: Progress | None = None,
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
    progress = progress or SilentProgress()
    started = time.perf_counter()
    matrices = select_matrices(model, settings.include_embeddings)
    pattern = settings.parsed_pattern
    for m in matrices:
        check_shape(pattern, m.shape, m.name)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        progress.note(message)

    calibration = None
    if settings.needs_calibration:
        windows, calibration = _calibration_windows(model, settings, tokenizer, windows, note, progress)
    calibrated_at = time.perf_counter()
    block_sparsity, ratios = None, None
    if settings.allocation == "owl":
        owl = owl or owl_allocation(model, settings, windows, progress)
        block_sparsity, ratios = owl.block_sparsity, owl.outlier_ratio
    targets = {m.name: _target(m, settings, block_sparsity) for m in matrices}
    if settings.method == "magnitude":
        _prune_magnitude(matrices, settings, targets, progress)
    else:
        _prune_calibrated(model, matrices, settings, targets, windows, note, progress)
    return PruneReport(
        settings=settings,
        target_sparsity=settings.target_sparsity,
        matrices=[_matrix_row(m, targets[m.name], settings) for m in matrices],
        calibration=calibration,
        block_sparsity=block_sparsity,
        outlier_ratio=ratios,
        seconds=time.perf_counter() - started,
        calibration_seconds=calibrated_at - started if calibration else 0.0,
        notes=notes,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparselm")
    except PackageNotFoundError:
        return "unknown"


def _block_name(m: Matrix) -> str | None:
    return f"{m.block_path}.{m.block}" if m.block_path is not None else None


def _target(m: Matrix, settings: PruneSettings, block_sparsity: dict[str, float] | None) -> float:
    name = _block_name(m)
    if block_sparsity is not None and name in block_sparsity:
        return block_sparsity[name]
    return settings.target_sparsity


def _pattern_at(pattern: Pattern, sparsity: float) -> Pattern:
    """N:M under a per-block sparsity keeps M and moves N (OWL's mixed N:M); other patterns take `sparsity`."""
    if isinstance(pattern, NM):
        n = min(pattern.m, max(1, round((1 - sparsity) * pattern.m)))
        return NM(n, pattern.m)
    return pattern


def _matrix_row(m: Matrix, target: float, settings: PruneSettings) -> dict[str, Any]:
    zeros = int((m.weight() == 0).sum())
    pattern = _pattern_at(settings.parsed_pattern, target)
    return {
        "name": m.name,
        "shape": list(m.shape),
        "block": _block_name(m),
        "target_sparsity": pattern.sparsity if isinstance(pattern, NM) else target,
        "pattern": str(pattern),
        "zeros": zeros,
        "numel": m.numel,
        "sparsity": zeros / m.numel,
    }


def _calibration_windows(
    model: nn.Module,
    settings: PruneSettings,
    tokenizer: Any,
    windows: torch.Tensor | None,
    note: Any,
    progress: Progress,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if windows is not None:
        return windows, {"source": "given token windows", "samples": windows.shape[0], "seqlen": windows.shape[1]}
    if tokenizer is None:
        raise SparselmError(
            f"{settings.method} needs calibration text but the model has no tokenizer; "
            "save the tokenizer next to the model (tokenizer.save_pretrained) or use --method magnitude"
        )
    seqlen = choose_seqlen(model, settings.calib_samples, settings.calib_seqlen, note)
    progress.start(f"tokenising {settings.calib} ({CALIBRATION_SPLIT})", 1)
    stream = token_stream(tokenizer, settings.calib, CALIBRATION_SPLIT)
    progress.advance()
    source = f"{settings.calib} {CALIBRATION_SPLIT}"
    windows = sample_windows(stream, settings.calib_samples, seqlen, settings.seed, source)
    info = {
        "source": settings.calib,
        "split": CALIBRATION_SPLIT,
        "samples": settings.calib_samples,
        "seqlen": seqlen,
        "seed": settings.seed,
        "tokens_in_text": int(stream.numel()),
    }
    return windows, info


def _by_block(matrices: list[Matrix]) -> dict[tuple[str, int], list[Matrix]]:
    groups: dict[tuple[str, int], list[Matrix]] = {}
    for m in matrices:
        if m.block_path is not None and m.block is not None:
            groups.setdefault((m.block_path, m.block), []).append(m)
    return groups


def _collect(
    mats: list[Matrix], make: Any, run: Any
) -> dict[str, ColumnNorms | HessianAccumulator]:
    """Run the block once with hooks that feed each matrix's inputs to its accumulator; hooks are then removed."""
    stats = {m.name: make(m.shape[1]) for m in mats}

    def hook_for(name: str) -> Any:
        return lambda _module, inputs, _output: stats[name].add(inputs[0])

    with module_hooks({m.module: hook_for(m.name) for m in mats}):
        run()
    return stats


@dataclass(frozen=True)
class OwlAllocation:
    """Per-block target sparsities and the outlier ratios of the dense model's Wanda scores behind them."""

    block_sparsity: dict[str, float]
    outlier_ratio: dict[str, float]

    def block_patterns(self, pattern: Pattern) -> dict[str, str]:
        """The pattern each block is pruned with under this allocation (for N:M, OWL moves N and keeps M)."""
        return {name: str(_pattern_at(pattern, s)) for name, s in self.block_sparsity.items()}


def owl_allocation(
    model: nn.Module, settings: PruneSettings, windows: torch.Tensor, progress: Progress | None = None
) -> OwlAllocation:
    """Per-block sparsities from the dense model's Wanda-score outlier ratios (one read-only calibration pass)."""
    progress = progress or SilentProgress()
    groups = _by_block(select_matrices(model, settings.include_embeddings))
    ratios: dict[str, float] = {}
    sizes: dict[str, int] = {}

    def visit(ref: BlockRef, run: Any) -> None:
        mats = groups.get((ref.stack.path, ref.index), [])
        if not mats:
            return
        stats = _collect(mats, ColumnNorms, run)
        scores = [wanda_scores(m.weight(), stats[m.name].sum_sq) for m in mats]  # type: ignore[union-attr]
        ratios[ref.name] = outlier_ratio(scores, settings.owl_threshold)
        sizes[ref.name] = sum(m.numel for m in mats)

    progress.start("OWL outlier ratios", total_blocks(model))
    run_blocks(model, windows, visit, lambda _ref: progress.advance(), read_only=True)
    names = list(ratios)
    spars = owl_sparsities(
        [ratios[n] for n in names], [sizes[n] for n in names], settings.target_sparsity, settings.owl_lambda
    )
    return OwlAllocation(dict(zip(names, spars)), ratios)


def _prune_magnitude(
    matrices: list[Matrix], settings: PruneSettings, targets: dict[str, float], progress: Progress
) -> None:
    pattern = settings.parsed_pattern
    if settings.scope == "global":
        progress.start("global magnitude", 1)
        prune_global([m.weight() for m in matrices], settings.target_sparsity, pattern)
        progress.advance()
        return
    progress.start("magnitude per matrix", len(matrices))
    for m in matrices:
        _magnitude_one(m, pattern, targets[m.name])
        progress.advance()


def _magnitude_one(m: Matrix, pattern: Pattern, sparsity: float) -> None:
    w = m.weight()
    apply_keep(w, keep_mask(w.abs().float(), _pattern_at(pattern, sparsity), sparsity))


def _prune_calibrated(
    model: nn.Module,
    matrices: list[Matrix],
    settings: PruneSettings,
    targets: dict[str, float],
    windows: torch.Tensor,
    note: Any,
    progress: Progress,
) -> None:
    """Wanda or SparseGPT block by block; matrices outside blocks (embeddings, heads) fall back to magnitude."""
    groups = _by_block(matrices)
    pattern = settings.parsed_pattern
    make = ColumnNorms if settings.method == "wanda" else HessianAccumulator

    def visit(ref: BlockRef, run: Any) -> None:
        mats = groups.get((ref.stack.path, ref.index), [])
        if not mats:
            return
        stats = _collect(mats, make, run)
        for m in mats:
            if stats[m.name].tokens == 0:
                note(f"{m.name} saw no calibration input; pruned by magnitude instead")
                _magnitude_one(m, pattern, targets[m.name])
            else:
                _prune_one(m, stats[m.name], settings, targets[m.name])

    progress.start(f"{settings.method} block by block", total_blocks(model))
    run_blocks(model, windows, visit, lambda _ref: progress.advance())
    for m in matrices:
        if m.block_path is None:
            _magnitude_one(m, pattern, targets[m.name])


def _prune_one(m: Matrix, stats: ColumnNorms | HessianAccumulator, settings: PruneSettings, sparsity: float) -> None:
    pattern = _pattern_at(settings.parsed_pattern, sparsity)
    w = m.weight()
    if isinstance(stats, ColumnNorms):
        keep = keep_mask(wanda_scores(w, stats.sum_sq), pattern, sparsity, per_row=True)
        apply_keep(w, keep.to(w.device))
        return
    pruned, _keep = sparsegpt_prune(
        w,
        stats.hessian,
        sparsity,
        pattern if isinstance(pattern, NM) else None,
        settings.sparsegpt_blocksize,
        settings.sparsegpt_percdamp,
    )
    m.set_weight(pruned)


def _load_tokenizer(source: ModelSource) -> Any:
    """The model's tokenizer, or None when its directory has none (magnitude pruning does not need one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, TypeError):
        return None


def prune_to_dir(
    model_name_or_path: str, settings: PruneSettings, out_dir: Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Load, prune and write a plain Hugging Face directory with sparsity.json and provenance.json, atomically."""
    model, source = load_with_source(model_name_or_path)
    tokenizer = _load_tokenizer(source)
    report = prune(model, settings, tokenizer, progress)
    result = {"model": model_name_or_path, **report.to_json()}
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SPARSITY_FILE, result)
        write_provenance(tmp, source, pruned={"method": settings.method, "sparsity": report.target_sparsity})
    return result
