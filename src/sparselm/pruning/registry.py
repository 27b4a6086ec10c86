"""The pruning methods, registered by name. A method is one class: how it collects statistics of each matrix's
calibration inputs (if it needs any), which patterns and scopes it supports, and how it prunes one matrix.

Methods register themselves with `@register` when their module is imported; `sparselm.pruning` imports every
method module explicitly, so adding a method is one new module (plus its import there and its tests). The CLI's
choices, `PruneSettings` and the study configuration read the names from `registered_methods()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from ..errors import SparselmError
from ..masks import Pattern
from ..weights import Matrix

if TYPE_CHECKING:
    from .settings import PruneSettings


S = TypeVar("S")  # the statistics a method's collector gathers (None for methods without calibration)


class Pruner(ABC, Generic[S]):
    """One pruning method.

    `needs_calibration`: the method scores weights with calibration inputs, gathered per matrix by `collector`.
    `ranks_globally`: `--scope global` (all matrices ranked together, `prune_together`) applies to it.
    `block_patterns`: it can keep or prune whole block:RxC tiles.
    `updates_weights`: it re-solves the kept weights (so a gradual round re-pruning its own output changes more than
    the mask; without that, `--steps` needs `--reconstruct` to mean anything).
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    ranks_globally: ClassVar[bool] = False
    block_patterns: ClassVar[bool] = True
    updates_weights: ClassVar[bool] = False

    def collector(self, in_features: int) -> S:
        """A new statistic of one matrix's inputs (methods that need calibration override this)."""
        raise TypeError(f"{self.name} does not collect calibration statistics")

    @abstractmethod
    def prune_matrix(
        self, matrix: Matrix, stats: S, pattern: Pattern, sparsity: float, settings: PruneSettings
    ) -> None:
        """Prune one matrix in place to `sparsity` under `pattern`; `stats` is its collector (None without one)."""

    def prune_together(self, matrices: list[Matrix], sparsity: float, pattern: Pattern) -> None:
        """Rank the weights of all matrices together (methods with `ranks_globally` override this)."""
        raise TypeError(f"{self.name} does not rank weights across matrices")


_PRUNERS: dict[str, Pruner] = {}
P = TypeVar("P", bound=type[Pruner])  # register returns the class it was given


def normalise(name: str) -> str:
    return name.strip().lower()


def register(cls: P) -> P:
    """Class decorator: make the method available under its `name`."""
    name = normalise(cls.name)
    if name in _PRUNERS:
        raise ValueError(f"pruning method '{name}' is registered twice")
    _PRUNERS[name] = cls()
    return cls


def registered_methods() -> tuple[str, ...]:
    """The method names, in registration order (magnitude, wanda, sparsegpt, admm)."""
    return tuple(_PRUNERS)


def pruner(name: str) -> Pruner:
    """The registered method of that name, or one clear error listing the names there are."""
    found = _PRUNERS.get(normalise(name))
    if found is None:
        raise SparselmError(f"unknown method '{name}'; use one of: {', '.join(registered_methods())}")
    return found
