"""Lightning callbacks, thin adapters over the library: they turn the datamodule into data, call the public API with
the distributed handle, and have rank 0 report."""

from critnet.callbacks.critical_ranking import CriticalRanking
from critnet.callbacks.fault_campaign import FaultCampaign
from critnet.callbacks.prune_sweep import PruneSweep
from critnet.callbacks.run_summary import RunSummary

__all__ = ["CriticalRanking", "FaultCampaign", "PruneSweep", "RunSummary"]
