"""sparselm: weight sparsity for transformer language models."""

from typing import Any

from .errors import SparselmError
from .models import load, load_tokenizer
from .pruning import prune
from .sources import resolve

__all__ = ["SparselmError", "SparsityCallback", "load", "load_tokenizer", "resolve", "prune"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`sparselm.SparsityCallback` is imported on first use: it pulls in the Trainer, which `import sparselm` avoids."""
    if name == "SparsityCallback":
        from .finetune import SparsityCallback

        return SparsityCallback
    raise AttributeError(f"module 'sparselm' has no attribute '{name}'")
