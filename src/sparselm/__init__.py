"""sparselm: weight sparsity for transformer language models."""

from .errors import SparselmError
from .models import load, load_tokenizer, resolve
from .pruning import prune

__all__ = ["SparselmError", "load", "load_tokenizer", "resolve", "prune"]
__version__ = "0.1.0"
