"""Lightning callbacks, thin adapters over the library: they turn the datamodule into data, call the public API with
the distributed handle, and have rank 0 report."""

from critnet.callbacks.faults import FaultCampaign
from critnet.callbacks.pruning import PruneSweep
from critnet.callbacks.ranking import CriticalRanking
from critnet.callbacks.summary import RunSummary

__all__ = ["CriticalRanking", "FaultCampaign", "PruneSweep", "RunSummary"]
