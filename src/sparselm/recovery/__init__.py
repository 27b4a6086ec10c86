"""Recovering what pruning loses: the ADMM weight update, block reconstruction and the gradual-pruning schedule.

Pure building blocks on tensors and modules; the pruning driver and the CLI wire them in.
"""

from .admm import AdmmSettings, admm_prune, admm_update
from .reconstruct import ReconstructResult, ReconstructSettings, reconstruct_block
from .schedule import cubic_schedule

__all__ = [
    "AdmmSettings", "ReconstructResult", "ReconstructSettings", "admm_prune", "admm_update", "cubic_schedule",
    "reconstruct_block",
]
