"""taylor: Taylor estimates of Δloss (first order, or with the empirical-Fisher second-order term) from one
forward and backward pass per batch (labelled exact=False; :mod:`critnet.engine.taylor_terms`)."""

from __future__ import annotations

from typing import Any

from critnet.engine.taylor_terms import estimate_outcome, taylor_estimates
from critnet.engine.unit_run import EvaluationMethod, UnitRun
from critnet.scoring import UnitOutcome


class Taylor(EvaluationMethod):
    name = "taylor"
    deterministic = False

    def settings(self, run: UnitRun) -> dict[str, Any]:
        return {"taylor_order": run.taylor_order}

    def evaluate(self, run: UnitRun) -> dict[int, UnitOutcome]:
        estimates = taylor_estimates(run.model, run.units, run.perturbation, run.data, run.taylor_order,
                                     run.output, run.memory_budget_mb)
        run.jobs.count(len(estimates))
        return {i: estimate_outcome(run.units[i], e) for i, e in enumerate(estimates)}


METHOD = Taylor()
