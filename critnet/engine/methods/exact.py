"""exact: the naive scores bit for bit, computing only the part of the network after each unit
(:mod:`critnet.engine.suffix`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from critnet.engine.suffix import SuffixEvaluator
from critnet.engine.unit_run import EvaluationMethod, UnitRun
from critnet.scoring import UnitOutcome


def exact_outcomes(run: UnitRun, indices: Sequence[int]) -> dict[int, UnitOutcome]:
    """The exact outcomes of the units at ``indices``, shared among ranks by their suffix cost."""
    evaluator = SuffixEvaluator(run.model, run.perturbation, run.data, run.memory_budget_mb, run.reference(),
                                run.output)
    with torch.no_grad():
        return run.evaluate(indices, "exact", evaluator.run, evaluator.costs)


class Exact(EvaluationMethod):
    name = "exact"

    def evaluate(self, run: UnitRun) -> dict[int, UnitOutcome]:
        return exact_outcomes(run, range(len(run.units)))


METHOD = Exact()
