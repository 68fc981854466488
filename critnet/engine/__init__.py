"""The fast ranking engine (Lightning-free): evaluation set, baseline and per-unit evaluations by any method."""

from critnet.engine.core import METHODS, evaluate_baseline, evaluate_units
from critnet.engine.data import EvaluationSet

__all__ = ["METHODS", "EvaluationSet", "evaluate_baseline", "evaluate_units"]
