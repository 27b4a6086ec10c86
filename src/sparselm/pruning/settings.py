"""What a pruning run does, as one typed, serialisable object (a typo in a field name fails loudly)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..data import parse_source
from ..errors import SparselmError
from ..masks import NM, Block, Pattern, parse_pattern
from ..recovery.reconstruct import ReconstructSettings
from .registry import Pruner, pruner, registered_methods

DEFAULT_SPARSITY = 0.5
OWL_THRESHOLD = 5.0  # OWL's M: a score is an outlier when it exceeds M × the block's mean score
OWL_LAMBDA = 0.08  # OWL's λ: per-block sparsities spread over [s − λ, s + λ]


class PruneSettings(BaseModel):
    """One pruning run. `sparsity`: the fraction of zeros asked for (default 0.5); N:M fixes it at 1 − N/M.

    `reconstruct`: after each block's masks are chosen, train its kept weights (masks fixed) for
    `reconstruct_epochs` passes at Adam learning rate `reconstruct_lr` towards the dense block's outputs.
    `steps`: gradual pruning in that many rounds per block on the cubic schedule (`pruning.driver`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "magnitude"  # a registered method (`registered_methods()`)
    sparsity: float | None = None
    scope: Literal["global", "layer"] = "layer"
    pattern: str = "unstructured"
    allocation: Literal["uniform", "owl"] = "uniform"
    calib: str = "ptb"
    calib_samples: int = 128
    calib_seqlen: int | None = None
    seed: int = 0
    include_embeddings: bool = False
    owl_threshold: float = OWL_THRESHOLD
    owl_lambda: float = OWL_LAMBDA
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    reconstruct: bool = False
    reconstruct_epochs: int = ReconstructSettings.epochs
    reconstruct_lr: float = ReconstructSettings.lr
    steps: int = 1

    @field_validator("method")
    @classmethod
    def _method_registered(cls, value: str) -> str:
        return pruner(value).name

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value < 1.0:
            raise SparselmError(f"sparsity {value} is outside [0, 1); give the fraction of weights to remove, e.g. 0.5")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_known(cls, value: str) -> str:
        return str(parse_pattern(value))

    @field_validator("calib")
    @classmethod
    def _calib_known(cls, value: str) -> str:
        return parse_source(value).describe()

    @field_validator("calib_samples")
    @classmethod
    def _samples_positive(cls, value: int) -> int:
        if value < 1:
            raise SparselmError(f"--calib-samples must be at least 1, got {value}")
        return value

    @field_validator("calib_seqlen")
    @classmethod
    def _seqlen_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise SparselmError(f"--calib-seqlen must be at least 1, got {value}")
        return value

    @field_validator("reconstruct_epochs")
    @classmethod
    def _epochs_positive(cls, value: int) -> int:
        if value < 1:
            raise SparselmError(f"--reconstruct-epochs must be at least 1, got {value}")
        return value

    @field_validator("reconstruct_lr")
    @classmethod
    def _lr_positive(cls, value: float) -> float:
        if not 0 < value < float("inf"):
            raise SparselmError(f"--reconstruct-lr must be a positive learning rate such as 1e-3, got {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_positive(cls, value: int) -> int:
        if value < 1:
            raise SparselmError(f"--steps must be at least 1 (1 prunes in one shot), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneSettings:
        pattern = self.parsed_pattern
        if self.scope == "global" and not self.pruner.ranks_globally:
            raise SparselmError(
                "--scope global ranks weights of all matrices together, which only "
                f"{_methods_where(lambda p: p.ranks_globally)} can do; {self.method} compares weights within each "
                "matrix: use --scope layer"
            )
        if self.scope == "global" and self.allocation == "owl":
            raise SparselmError("OWL sets one sparsity per block, which a global ranking ignores; use --scope layer")
        if isinstance(pattern, Block) and not self.pruner.block_patterns:
            raise SparselmError(
                f"block patterns work with {_methods_where(lambda p: p.block_patterns)}; "
                "use --pattern unstructured or N:M"
            )
        if isinstance(pattern, NM) and self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise SparselmError(
                f"pattern {pattern} fixes the sparsity at {pattern.sparsity:g}, but {self.sparsity:g} was asked; "
                f"omit --sparsity or pass {pattern.sparsity:g}"
            )
        if self.steps > 1 and self.scope == "global":
            raise SparselmError(
                "--steps prunes each block in rounds, but --scope global ranks all matrices once before any block is "
                "visited; use --scope layer or --steps 1"
            )
        if self.steps > 1 and not self.reconstruct and not self.pruner.updates_weights:
            raise SparselmError(
                f"--steps needs a recovery between rounds, and {self.method} does not update the kept weights, so "
                f"its rounds would give the one-shot mask; add --reconstruct or use a method that does "
                f"({_methods_where(lambda p: p.updates_weights)})"
            )
        return self

    @property
    def pruner(self) -> Pruner:
        return pruner(self.method)

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The sparsity the run aims at: N:M fixes it, otherwise the requested value."""
        pattern = self.parsed_pattern
        if isinstance(pattern, NM):
            return pattern.sparsity
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    @property
    def needs_calibration(self) -> bool:
        """The method scores with calibration inputs, OWL needs them to allocate sparsity per block, or block
        reconstruction needs them as its training data."""
        return self.pruner.needs_calibration or self.allocation == "owl" or self.reconstruct

    @property
    def calibration_user(self) -> str:
        """Who asks for calibration text, as the user would name it (for errors)."""
        if self.pruner.needs_calibration:
            return self.method
        return "--reconstruct" if self.reconstruct else "--allocation owl"

    @property
    def reconstruct_settings(self) -> ReconstructSettings:
        """The block-reconstruction settings of this run (the other knobs keep their defaults; the seed is ours)."""
        return ReconstructSettings(lr=self.reconstruct_lr, epochs=self.reconstruct_epochs, seed=self.seed)


def _methods_where(test: Callable[[Pruner], bool]) -> str:
    """The registered methods passing `test`, as prose: `magnitude`, `magnitude and wanda`, `a, b and c`."""
    names = [name for name in registered_methods() if test(pruner(name))]
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def settings_from(**fields: object) -> PruneSettings:
    """PruneSettings from keyword fields, turning pydantic's multi-line errors into one clear line."""
    from pydantic import ValidationError

    try:
        return PruneSettings(**fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise SparselmError(f"invalid {field} ({first['msg']}); got {first.get('input')!r}") from None
