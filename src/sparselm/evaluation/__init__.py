"""Evaluation: causal-LM and masked-LM perplexity, and sentence(-pair) classification."""

from .perplexity import perplexity

__all__ = ["perplexity"]
