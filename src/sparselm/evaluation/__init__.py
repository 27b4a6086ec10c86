"""Evaluation: causal-LM and masked-LM perplexity, and sentence(-pair) classification."""

from .classification import Scores
from .mlm import MaskedPerplexity
from .perplexity import Perplexity, perplexity
from .run import ClassificationEvaluation, Evaluation, LMEvaluation, evaluate

__all__ = [
    "ClassificationEvaluation", "Evaluation", "LMEvaluation", "MaskedPerplexity", "Perplexity", "Scores", "evaluate",
    "perplexity",
]
