"""What every evaluation method works with: its settings (:class:`MethodSettings`), the state of one
``evaluate_units`` call (:class:`UnitRun`), the method interface (:class:`EvaluationMethod`), and the record codecs
of unit outcomes and per-sample results."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from critnet.choices import (
    BOUNDS,
    METHODS,
    SCORES,
    TAYLOR_ORDERS,
    Bound,
    Method,
    Score,
    TaylorOrder,
    check_choice,
    check_positive_int,
    check_positive_number,
    check_probability,
)
from critnet.engine.certify import LOSS_CLIP, TOP_K_CONFIDENCE, SequentialTestRecord
from critnet.engine.jobs import Codec, Jobs
from critnet.evaluation import sample_pass
from critnet.evaluation_set import EvaluationSet
from critnet.outputs import OutputSelector, check_selector
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


@dataclass(eq=False)
class MethodSettings:
    """How the engine evaluates the units: the method and the settings its results depend on, checked when built
    (a one-line :class:`~critnet.choices.SettingError` naming the key). A ranking's settings
    (:class:`~critnet.analyses.ranking.RankSettings`) build on these.

    Args:
        method: The engine: ``exact`` (suffix-only exact evaluation, the naive scores bit for bit), ``naive`` (a
            full forward pass per unit; the reference), ``taylor`` (Taylor estimates only), ``hybrid`` (estimates,
            then the top units exactly) or ``halving`` (the exact full-set top ``top_k`` with exact full-set
            scores, found by a sequential test on growing random parts of the data; see
            :mod:`critnet.engine.certify`).
        score: What ranks the units (larger = more critical): the perturbed ``loss`` (the original), ``delta_loss``
            against the unperturbed baseline, ``top1_drop`` or ``top5_drop`` (percentage points). ``hybrid`` and
            ``halving`` select their exact top by it; the other methods return every tally and do not depend on it.
        top_k: Rows shown in tables and TensorBoard, and the exact top of ``hybrid`` and ``halving`` (at least 1).
        taylor_order: The estimates of ``taylor`` and ``hybrid``: ``1`` (first order) or ``2`` (plus the
            empirical-Fisher second-order term, which helps where first-order terms cancel, e.g. ``add`` on whole
            tensors, and adds noise for zeroed channels).
        top_k_confidence: ``halving``: the probability that its top ``top_k`` is the exact full-set top ``top_k``
            (family-wise over every unit and stage); strictly between 0 and 1. A finite-sample guarantee with
            ``bound: betting``, a nominal level with ``bound: normal``.
        bound: ``halving``'s confidence bounds: ``betting`` (finite-sample: betting confidence sequences for
            sampling without replacement, for values in a declared range) or ``normal`` (normal intervals with a
            Taylor control variate; faster, nominal).
        loss_clip: ``halving`` with ``bound: betting`` and a loss score: the declared largest per-image loss
            (nats) of a perturbed network, so that each image's Δloss lies in ``[−loss_i, loss_clip − loss_i]``;
            the run records the largest it saw and calls its guarantee void if one exceeded it.
        seed: ``halving``: the random order in which its stages draw images; ``noise`` perturbations: draws depend
            only on (seed, unit), so they are the same on any number of devices.
        output: Where the logits are in what the model returns (:func:`critnet.outputs.logits_of`): null takes a
            tensor as it is and reads ``.logits`` (attribute or key) from anything else (a Hugging Face
            ``ModelOutput``, a dict); a key (``scores``) or an index (``0`` for a tuple) selects them, and from
            Python also a callable that takes the model's output and returns the logits. With a resume directory
            a key or index enters the resume fingerprint as it is, a callable by its module and qualified name.

    >>> MethodSettings(method="halving", top_k=5).bound
    'betting'
    """

    method: Method = "exact"
    score: Score = "loss"
    top_k: int = 20
    taylor_order: TaylorOrder = 1
    top_k_confidence: float = TOP_K_CONFIDENCE
    bound: Bound = "betting"
    loss_clip: float = LOSS_CLIP
    seed: int = 0
    output: OutputSelector = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("score", self.score, SCORES)
        check_positive_int("top_k", self.top_k)
        check_choice("taylor_order", self.taylor_order, TAYLOR_ORDERS)
        check_probability("top_k_confidence", self.top_k_confidence)
        check_choice("bound", self.bound, BOUNDS)
        check_positive_number("loss_clip", self.loss_clip)
        check_positive_int("seed", self.seed, minimum=0)
        check_selector(self.output)


@dataclass(eq=False, kw_only=True)
class UnitRun(MethodSettings):
    """The state of one ``evaluate_units`` call: the model, its units, the data, the settings the methods read,
    and the job runner that shares units among ranks and keeps their records."""

    model: nn.Module
    units: list[Unit]
    perturbation: Perturbation
    data: EvaluationSet
    memory_budget_mb: Optional[float] = None
    jobs: Jobs = field(default_factory=Jobs)
    #: The unperturbed per-sample results, when the caller has them (else made on first use).
    samples: Optional[Samples] = None
    #: What halving's sequential test recorded (None for the other methods).
    top_k_test: Optional[SequentialTestRecord] = None

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
