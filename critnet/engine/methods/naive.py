"""naive: perturb a unit, run the full forward pass over the evaluation set, restore (the reference; slow)."""

from __future__ import annotations

import torch

from critnet.engine.suffix import full_passes
from critnet.engine.unit_run import EvaluationMethod, UnitRun
from critnet.scoring import UnitOutcome


class Naive(EvaluationMethod):
    name = "naive"

    def evaluate(self, run: UnitRun) -> dict[int, UnitOutcome]:
        def runner(work, record) -> None:
            full_passes(run.model, work, run.perturbation, run.data, record, run.reference(), run.output)

        with torch.no_grad():
            return run.evaluate(range(len(run.units)), "exact", runner)


METHOD = Naive()
