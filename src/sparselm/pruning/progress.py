"""What the library tells a user interface while it prunes (the CLI draws rich bars from it)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, stage: str, total: int) -> None: ...

    def advance(self) -> None: ...

    def note(self, message: str) -> None: ...


class SilentProgress:
    """Progress for callers that show none."""

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass
