"""The one inference loop of the evaluations (perplexity, masked-LM perplexity, classification)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..facts import evaluating
from ..progress import Progress


def forward_batches(model: nn.Module, total: int, batch_size: int, stage: str, progress: Progress) -> Iterator[slice]:
    """Slices of `total` items, `batch_size` at a time, while the model is in eval and inference mode (its own mode
    comes back afterwards); progress advances by each batch's size once the caller is done with it."""
    progress.start(stage, total)
    with evaluating(model):
        for start in range(0, total, batch_size):
            batch = slice(start, min(start + batch_size, total))
            yield batch
            progress.advance(batch.stop - batch.start)
