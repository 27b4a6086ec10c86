"""sparselm: weight sparsity for transformer language models."""

from .errors import SparselmError
from .models import load, load_tokenizer, resolve

__all__ = ["SparselmError", "load", "load_tokenizer", "resolve"]
__version__ = "0.1.0"
