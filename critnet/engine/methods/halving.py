"""halving: a sequential test on growing random parts of the data eliminates the units that cannot be among the top
k at a stated error probability (:mod:`critnet.engine.certify`); the survivors get exact full-set scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from critnet.choices import SettingError
from critnet.engine import certify
from critnet.engine.certify import SequentialTestRecord
from critnet.engine.suffix import SuffixEvaluator, budget_bytes
from critnet.engine.taylor_terms import per_sample_estimates
from critnet.engine.unit_run import EvaluationMethod, Samples, UnitRun
from critnet.evaluation import tally_samples
from critnet.evaluation_set import EvaluationSet
from critnet.perturb import Unit
from critnet.scoring import (
    Tally,
    UnitOutcome,
    criticality_key,
    in_first_half,
    per_sample_criticality,
    score_of,
    sum_halves,
)

#: Per-sample results of one unit on some images: (their positions in the set, (losses, top1, top5)).
Part = tuple[list[int], Samples]


def _loss_score(score: str) -> bool:
    return score in ("loss", "delta_loss")


class Halving(EvaluationMethod):
    """The sequential test of :mod:`critnet.engine.certify`, evaluating the network on each stage's new images.
    A unit that reaches the end has been evaluated on every image, and its per-image results are summed batch by
    batch exactly as the exact method sums them, so its scores are the exact full-set scores. The test's record
    (:class:`~critnet.engine.certify.SequentialTestRecord`) is left in ``run.top_k_test``."""

    name = "halving"

    def settings(self, run: UnitRun) -> dict[str, Any]:
        settings = {"score": run.score, "top_k": int(run.top_k), "first_stage": certify.FIRST_STAGE,
                    "top_k_confidence": float(run.top_k_confidence), "seed": int(run.seed),
                    "test": certify.TEST_VERSION, "bound": run.bound}
        if run.bound == "betting" and _loss_score(run.score):
            settings.update(loss_clip=float(run.loss_clip))
        return settings

    def evaluate(self, run: UnitRun) -> dict[int, UnitOutcome]:
        stages = Stages(run)
        remaining, record = _sequential_test(run, stages)
        n, reference = run.data.samples, run.reference()
        outcomes = {i: tally_over(stages.parts.pop(i), n, run.data, reference, run.units[i], exact=i in remaining)
                    for i in range(len(run.units))}
        record.ties_at_boundary = ties_at_boundary(outcomes, remaining, reference, run.score, int(run.top_k))
        run.top_k_test = record
        return outcomes


class Stages:
    """Evaluates the remaining units on each stage's new images (as the sequential test asks) and keeps every
    unit's per-sample results in :attr:`parts`."""

    def __init__(self, run: UnitRun) -> None:
        self.run = run
        self.parts: dict[int, list[Part]] = {i: [] for i in range(len(run.units))}

    def __call__(self, stage: int, remaining: list[int], positions: list[int]) -> torch.Tensor:
        """The per-image criticality of every remaining unit on the images at ``positions`` (one row each)."""
        run = self.run
        evaluator = SuffixEvaluator(run.model, run.perturbation, run.data.subset(positions),
                                    run.memory_budget_mb, output=run.output)
        with torch.no_grad():
            scored = run.evaluate(remaining, f"halving/{stage}",
                                  lambda work, record: evaluator.run(work, record, per_sample=True),
                                  evaluator.costs, per_sample=True)
        index = torch.tensor(positions)
        base = tuple(v[index] for v in run.reference())
        every = torch.arange(len(positions))
        rows = []
        for i in remaining:
            samples = tuple(v.cpu() for v in scored[i])
            self.parts[i].append((positions, samples))
            rows.append(per_sample_criticality(samples, base, every, run.score))
        return torch.stack(rows)


def _sequential_test(run: UnitRun, stages: Stages) -> tuple[list[int], SequentialTestRecord]:
    """The units that survive the test (exact full-set scores) and its record."""
    reference = run.reference()
    betting, loss_score = run.bound == "betting", _loss_score(run.score)
    covariate, covariate_mean = (None, None)
    if run.bound == "normal" and loss_score:
        covariate, covariate_mean = control_variate(run)
    floor, width = certify.per_image_range(run.score, reference, run.loss_clip) if betting else (None, None)
    distributed = run.jobs.distributed
    # every rank decides alike on the CPU; on GPUs a backward pass may round differently, so rank 0 decides
    agree = (lambda keep: distributed.gather(keep)[0]) if distributed.world_size > 1 else None
    remaining, _, record = certify.sequential_test(
        len(run.units), run.data.samples, int(run.top_k), stages, bound=run.bound,
        confidence=float(run.top_k_confidence), floor=floor, width=width,
        loss_clip=float(run.loss_clip) if betting and loss_score else None, seed=int(run.seed),
        first_stage=certify.FIRST_STAGE, covariate=covariate, covariate_mean=covariate_mean, agree=agree)
    return remaining, record


def control_variate(run: UnitRun) -> tuple[Callable[[int, list[int], list[int]], torch.Tensor] | None,
                                           torch.Tensor | None]:
    """The normal bound's control variate: each image's first-order Taylor estimate of the unit's loss change,
    whose full-set mean one forward and backward pass gives; it removes the part of the per-image spread the
    estimate explains. ``(None, None)`` where the model has no such estimates."""
    data, n = run.data, run.data.samples
    sizes = certify.stage_sizes(n, certify.FIRST_STAGE)
    if len(sizes) < 2:
        return None, None
    # The same pass also keeps each unit's estimates on the images the tests will see (all stages but the last),
    # unless those would not fit the memory budget; then each stage makes its own pass over its new images.
    tested = torch.zeros(n, dtype=torch.bool)
    tested[certify.sample_order(n, int(run.seed))[: sizes[-2]]] = True
    budget_mb = run.memory_budget_mb
    budget = budget_bytes(budget_mb)
    fits = len(run.units) * int(tested.sum()) * 8 <= budget
    column = torch.cumsum(tested.long(), 0) - 1  # an image's column among the kept ones (set order)
    try:
        found = per_sample_estimates(run.model, run.units, run.perturbation, data, sums=True,
                                     keep=tested if fits else None, output=run.output,
                                     memory_budget_mb=budget_mb)
    except (SettingError, RuntimeError):
        # a module without a tensor output, an attention whose output is not its projection's, or a model
        # autograd cannot differentiate: the test runs without the covariate
        return None, None
    sums, kept = found if fits else (found, None)

    def covariate(stage: int, remaining: list[int], positions: list[int]) -> torch.Tensor:
        if kept is not None:
            return kept[remaining][:, column[torch.tensor(positions)]]
        return per_sample_estimates(run.model, [run.units[i] for i in remaining], run.perturbation,
                                    data.subset(positions), output=run.output, memory_budget_mb=budget_mb)

    return covariate, sums / n


def ties_at_boundary(outcomes: dict[int, UnitOutcome], remaining: list[int], reference: Samples, score: str,
                     top_k: int) -> int:
    """How many surviving units beyond the top k have the k-th's exact full-set score: they cannot be told apart
    from it, so they are reported, not cut."""
    n = len(reference[0])
    common = Tally(reference[0].sum().item(), int(reference[1].sum()), int(reference[2].sum()), n)
    keys = sorted(criticality_key(score_of(outcomes[i].total, common, score)) for i in remaining)
    return sum(key == keys[top_k - 1] for key in keys[top_k:]) if len(keys) > top_k else 0


def _scatter(parts: list[Part], n: int) -> Samples:
    """Per-sample results scattered over the set into full-length vectors (zeros where not evaluated)."""
    losses = torch.zeros(n, dtype=torch.float64)
    top1 = torch.zeros(n, dtype=torch.bool)
    top5 = torch.zeros(n, dtype=torch.bool)
    for positions, (l, t1, t5) in parts:
        index = torch.tensor(positions)
        losses[index], top1[index], top5[index] = l.cpu(), t1.cpu(), t5.cpu()
    return losses, top1, top5


def tally_over(parts: list[Part], n: int, data: EvaluationSet, reference: Samples, unit: Unit,
               exact: bool) -> UnitOutcome:
    """The outcome of per-sample results scattered over the set, with the paired sums against ``reference``.

    A complete set of samples is summed per batch of the evaluation set and half, in the order the exact method
    sums them, so its tallies are bit-identical to the exact method's; a partial one (an eliminated unit's) is
    summed per half at once, and also gets the unperturbed tally over the same samples."""
    losses, top1, top5 = _scatter(parts, n)
    present = torch.zeros(n, dtype=torch.bool)
    for positions, _ in parts:
        present[torch.tensor(positions)] = True
    if exact or present.all():
        pair = tally_samples((losses, top1, top5), data, reference)
        return UnitOutcome(unit, pair.total, pair.halves, exact=exact)
    halves = []
    even = in_first_half(0, n)
    for half in (present & even, present & ~even):
        index = half.nonzero().squeeze(1)
        mine = tuple(v[index][None] for v in (losses, top1, top5))
        # from offset 0 sum_halves splits these by their own parity; all of them are in one half of the set
        first, second = sum_halves(*mine, 0, tuple(v[index] for v in reference))[0]
        halves.append(first + second)
    base = Tally(reference[0][present].sum().item(), int(reference[1][present].sum()),
                 int(reference[2][present].sum()), int(present.sum()))
    return UnitOutcome(unit, halves[0] + halves[1], (halves[0], halves[1]), exact=False, reference=base)


METHOD = Halving()
