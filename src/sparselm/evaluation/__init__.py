"""Evaluation: causal-LM and masked-LM perplexity, and sentence(-pair) classification."""

from .perplexity import perplexity
from .run import evaluate

__all__ = ["evaluate", "perplexity"]
