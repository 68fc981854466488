"""critnet: which parameters and neurons of a trained image classifier are critical, how it holds up when pruned.

The public API is Lightning-free and works on any ``nn.Module`` classifier and any iterable of ``(inputs, targets)``
batches::

    import critnet
    model = critnet.load_model("resnet20", weights="resnet20-cifar10")
    ranking = critnet.rank(model, loader, unit="channel", perturbation="zero", score="delta_loss")
    sweep = critnet.prune_sweep(model, loader, method="connections", p_prune=[0.1, 0.2])
    comparison = critnet.compare_orders(model, loader, criticality=ranking, ratios=[0.05, 0.1])
    campaign = critnet.fault_campaign(model, loader, faults=1000, stratify=("layer", "bit"))

The command line (``analyze.py``) and the Lightning callbacks call these same functions.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use (PEP 562). Importing the package itself
# stays cheap, and imports nothing before the command line has imported Lightning: a `typing` cache collision makes
# Lightning's `Optional[Union[int, float]]` annotations read `Union[float, int]` (so `--trainer.limit_val_batches 1`
# parses as 100 %) when rich was imported first.
_EXPORTS = {
    "CritnetError": "critnet.errors",
    "DataError": "critnet.errors",
    "ModelInputError": "critnet.errors",
    "OutputError": "critnet.errors",
    "Distributed": "critnet.distributed",
    "EvaluationSet": "critnet.evaluation_set",
    "Perturbation": "critnet.perturb",
    "RankSettings": "critnet.analyses.ranking",
    "Selection": "critnet.selection",
    "SweepSettings": "critnet.analyses.pruning",
    "OrderSettings": "critnet.analyses.pruning",
    "Ranking": "critnet.results",
    "SettingError": "critnet.choices",
    "Sweep": "critnet.results",
    "Unit": "critnet.perturb",
    "Campaign": "critnet.results",
    "CampaignSettings": "critnet.analyses.campaign",
    "compare_accuracy": "critnet.models.quantization",
    "compare_orders": "critnet.analyses.pruning",
    "evaluate": "critnet.evaluation",
    "fault_campaign": "critnet.analyses.campaign",
    "list_models": "critnet.models",
    "load_model": "critnet.models",
    "logits_of": "critnet.outputs",
    "prune_sweep": "critnet.analyses.pruning",
    "quantize_int8": "critnet.models.quantization",
    "rank": "critnet.analyses.ranking",
    "select_units": "critnet.selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'critnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
