"""Lightning callbacks: they schedule analyses, synchronise ranks and hand results to the reports."""

from critnet.callbacks.summary import RunSummary

__all__ = ["RunSummary"]
