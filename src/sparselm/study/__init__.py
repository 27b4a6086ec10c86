"""The study: models × methods × sparsities × tasks, run resumably (locally or on Ray) into SQLite, then reported."""

from .config import StudyConfig, load_config
from .run import StudySummary, run_study

__all__ = ["StudyConfig", "StudySummary", "load_config", "run_study"]
