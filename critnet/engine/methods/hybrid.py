"""hybrid: Taylor estimates for all units, then exact scores for the most critical by estimate."""

from __future__ import annotations

from typing import Any

from critnet.engine.methods.exact import exact_outcomes
from critnet.engine.taylor_terms import estimate_outcome, taylor_estimates
from critnet.engine.unit_run import EvaluationMethod, UnitRun
from critnet.evaluation import tally_samples
from critnet.scoring import Tally, UnitOutcome, criticality_key, score_of


def _order(outcomes: dict[int, UnitOutcome], baseline: Tally, score: str) -> list[int]:
    """Indices of ``outcomes``, most critical first (ties by unit order)."""
    return sorted(outcomes, key=lambda i: (criticality_key(score_of(outcomes[i].total, baseline, score)), i))


class Hybrid(EvaluationMethod):
    """Taylor estimates for every unit, then exact scores in the order of the estimates, in rounds of ``top_k``
    units, until a whole round (after at least two) brings no unit into the exact top ``top_k``."""

    name = "hybrid"

    def settings(self, run: UnitRun) -> dict[str, Any]:
        return {"score": run.score, "top_k": int(run.top_k), "taylor_order": run.taylor_order}

    def evaluate(self, run: UnitRun) -> dict[int, UnitOutcome]:
        top_k, score = int(run.top_k), run.score
        estimates = taylor_estimates(run.model, run.units, run.perturbation, run.data, run.taylor_order,
                                     run.output, run.memory_budget_mb)
        baseline = tally_samples(run.reference(), run.data).total
        order = sorted(range(len(run.units)), key=lambda i: (criticality_key(estimates[i]), i))
        exact: dict[int, UnitOutcome] = {}
        position = 0
        while position < len(order):
            size = 2 * top_k if position == 0 else top_k
            batch = order[position : position + size]
            position += len(batch)
            exact.update(exact_outcomes(run, batch))
            if position > len(batch) and not set(batch) & set(_order(exact, baseline, score)[:top_k]):
                break
        outcomes = {i: estimate_outcome(run.units[i], e) for i, e in enumerate(estimates)}
        for i, outcome in exact.items():
            outcomes[i] = UnitOutcome(outcome.unit, outcome.total, outcome.halves, exact=True, estimate=estimates[i])
        return outcomes


METHOD = Hybrid()
