"""The fast ranking engine (Lightning-free): baseline and per-unit evaluations by any method."""

from critnet.choices import METHODS
from critnet.engine.unit_evaluation import (
    evaluate_baseline,
    evaluate_units,
    reference_pass,
)

__all__ = ["METHODS", "evaluate_baseline", "evaluate_units", "reference_pass"]
