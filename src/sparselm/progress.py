"""The one way library code reports progress: stages with a size, steps done, and notes for the user.

Library functions take a `Progress` and default to `SILENT`; the command line passes an adapter that draws rich
bars (`sparselm.cli._common.RichProgress`). Library code never prints.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, stage: str, total: int | None) -> None:
        """A new stage begins; `total` steps (None when unknown)."""

    def advance(self, amount: int = 1) -> None:
        """`amount` steps of the current stage are done."""

    def note(self, message: str) -> None:
        """Something the user should read (a choice made for them, a fallback taken)."""


class SilentProgress:
    """Progress for callers that show none."""

    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass


SILENT: Progress = SilentProgress()
