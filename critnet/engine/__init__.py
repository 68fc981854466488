"""The fast ranking engine (Lightning-free): evaluation set, baseline and per-unit evaluations by any method."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: the evaluation loop (critnet.evaluation) builds on engine.data while engine.core builds on
# the evaluation loop, so this package must not import core merely because engine.data was imported.
_EXPORTS = {
    "METHODS": "critnet.choices",
    "EvaluationSet": "critnet.engine.data",
    "evaluate_baseline": "critnet.engine.core",
    "evaluate_units": "critnet.engine.core",
    "reference_pass": "critnet.engine.core",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'critnet.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
