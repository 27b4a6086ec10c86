"""What a pruning run did: the content of sparsity.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..masks import NM, Pattern, count_zeros
from ..weights import Matrix
from .owl import block_pattern
from .settings import PruneSettings

RECONSTRUCTION_LOSS = (
    "mean squared error of the block's output against the dense block's output on the dense model's inputs, divided "
    "by the variance of that target; loss_before: masks applied, before training; loss_after: after the last epoch; "
    "trained_weights_kept: false where training ended above loss_before and the untrained weights were put back"
)


@dataclass(frozen=True)
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
    recovery: dict[str, Any] | None = None  # gradual rounds and reconstruction per block (`driver._recovery_record`)

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
            "recovery": self.recovery,
            "sparselm_version": sparselm_version(),
        }


def matrix_row(m: Matrix, target: float, pattern: Pattern) -> dict[str, Any]:
    """One matrix of the report: its target (N:M: the block's pattern's own sparsity) and the zeros it has now."""
    zeros = count_zeros(m.parameter)
    own = block_pattern(pattern, target)
    return {
        "name": m.name,
        "shape": list(m.shape),
        "block": m.block_name,
        "target_sparsity": own.sparsity if isinstance(own, NM) else target,
        "pattern": str(own),
        "zeros": zeros,
        "numel": m.numel,
        "sparsity": zeros / m.numel,
    }


def sparselm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparselm")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class PrunedModel:
    """A pruned directory written by `prune_to_dir`; `to_json()` is the content of its sparsity.json."""

    model: str
    out: Path
    report: PruneReport

    @property
    def achieved_sparsity(self) -> float:
        return self.report.achieved_sparsity

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, **self.report.to_json()}
