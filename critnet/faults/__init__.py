"""Bit-flip fault-injection campaigns (Lightning-free): which parameters are critical under hardware faults.

``fault_campaign(model, data, ...)`` draws a fault list sized by Leveugle's formula (or replays one), evaluates every
fault exactly against the golden run and returns a :class:`Campaign` with per-fault outcomes and rates.
"""

from critnet.faults.campaign import STRATIFY_KEYS, check_campaign_settings, fault_campaign
from critnet.faults.evaluate import FaultCounts, FaultEvaluator
from critnet.faults.injection import (
    FAULT_MODELS,
    FAULT_TARGETS,
    Fault,
    FaultListError,
    Site,
    injected,
    read_fault_list,
    write_fault_list,
)
from critnet.faults.results import Campaign
from critnet.faults.stats import achieved_margin, leveugle_sample_size, wilson_interval

__all__ = [
    "FAULT_MODELS",
    "FAULT_TARGETS",
    "STRATIFY_KEYS",
    "Campaign",
    "Fault",
    "FaultCounts",
    "FaultEvaluator",
    "FaultListError",
    "Site",
    "achieved_margin",
    "check_campaign_settings",
    "fault_campaign",
    "injected",
    "leveugle_sample_size",
    "read_fault_list",
    "wilson_interval",
    "write_fault_list",
]
