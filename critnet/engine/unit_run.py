"""What every evaluation method works with: the state of one ``evaluate_units`` call (:class:`UnitRun`), the
method interface (:class:`EvaluationMethod`), and the record codecs of unit outcomes and per-sample results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from critnet.engine.certify import LOSS_CLIP, TOP_K_CONFIDENCE, SequentialTestRecord
from critnet.engine.jobs import Codec, Jobs
from critnet.evaluation import sample_pass
from critnet.evaluation_set import EvaluationSet
from critnet.outputs import OutputSelector
from critnet.perturb import Perturbation, Unit
from critnet.scoring import Tally, UnitOutcome

#: The unperturbed (or a perturbed) network's per-sample ``(losses, top1, top5)`` over a set.
Samples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _outcome_value(outcome: UnitOutcome) -> dict[str, Any]:
    return {
        "halves": [[t.loss_sum, t.top1_correct, t.top5_correct, t.samples, t.delta_sq_sum, t.top1_changed,
                    t.top5_changed, t.paired] for t in outcome.halves],
        "exact": outcome.exact,
        "estimate": outcome.estimate,
    }


def _outcome_of(value: dict[str, Any], unit: Unit) -> UnitOutcome:
    first, second = (Tally(float(h[0]), int(h[1]), int(h[2]), int(h[3]), float(h[4]), int(h[5]), int(h[6]), int(h[7]))
                     for h in value["halves"])
    estimate = value["estimate"]
    return UnitOutcome(unit=unit, total=first + second, halves=(first, second), exact=bool(value["exact"]),
                       estimate=None if estimate is None else float(estimate))


#: A unit's outcome (its tallies per half) as a record.
OUTCOMES = Codec(_outcome_value, _outcome_of)

#: A unit's per-sample results as a record (float64 losses, bool hits).
SAMPLES = Codec(
    lambda samples: [samples[0].tolist(), samples[1].int().tolist(), samples[2].int().tolist()],
    lambda value, unit: (torch.tensor(value[0], dtype=torch.float64), torch.tensor(value[1], dtype=torch.bool),
                         torch.tensor(value[2], dtype=torch.bool)),
)


@dataclass
class UnitRun:
    """The state of one ``evaluate_units`` call: the model, its units, the data, the settings the methods read
    (see :func:`critnet.engine.evaluate_units` for each), and the job runner that shares units among ranks and keeps
    their records."""

    model: nn.Module
    units: list[Unit]
    perturbation: Perturbation
    data: EvaluationSet
    output: OutputSelector = None
    score: str = "loss"
    top_k: int = 20
    memory_budget_mb: float | None = None
    taylor_order: int = 1
    top_k_confidence: float = TOP_K_CONFIDENCE
    bound: str = "betting"
    loss_clip: float = LOSS_CLIP
    seed: int = 0
    jobs: Jobs = field(default_factory=Jobs)
    #: The unperturbed per-sample results, when the caller has them (else made on first use).
    samples: Samples | None = None
    #: What halving's sequential test recorded (None for the other methods).
    test: SequentialTestRecord | None = None

    def evaluate(self, indices: Sequence[int], phase: str,
                 runner: Callable[[list[tuple[int, Unit]], Callable[[int, Any], None]], None],
                 costs: Callable[[list[Unit]], list[float]] | None = None, per_sample: bool = False) -> dict[int, Any]:
        """Outcomes of ``indices`` on every rank (with ``per_sample``, ``(losses, top1, top5)`` vectors): resumed
        where recorded, the rest shared among ranks and evaluated by ``runner(work, record)``."""
        work = [(i, self.units[i]) for i in indices]
        return self.jobs.run(phase, work, runner, SAMPLES if per_sample else OUTCOMES, costs)

    def reference(self) -> Samples:
        """The unperturbed per-sample results over the whole set (computed once), which the outcomes' paired sums
        are taken against."""
        if self.samples is None:
            with torch.no_grad():
                self.samples = sample_pass(self.model, self.data, self.output)
        return self.samples


class EvaluationMethod:
    """One way of evaluating every unit of a run (a module of :mod:`critnet.engine.methods` each).

    ``name`` is its ``method=`` value; :meth:`settings` lists what its results depend on besides the model,
    units, perturbation and data (they key the resume file); :meth:`evaluate` gives every unit's outcome.
    """

    name: ClassVar[str]
    #: Whether it runs under deterministic (bit-reproducible) kernels; estimates from backward passes need not.
    deterministic: ClassVar[bool] = True

    def settings(self, run: UnitRun) -> dict[str, Any]:
        return {}

    def evaluate(self, run: UnitRun) -> dict[int, UnitOutcome]:
        raise NotImplementedError
