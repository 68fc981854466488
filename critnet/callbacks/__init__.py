"""Lightning callbacks: they schedule analyses, synchronise ranks and hand results to the reports."""

from critnet.callbacks.pruning import PruneSweep
from critnet.callbacks.ranking import CriticalRanking
from critnet.callbacks.summary import RunSummary

__all__ = ["CriticalRanking", "PruneSweep", "RunSummary"]
