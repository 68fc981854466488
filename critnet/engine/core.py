"""The engine's entry points: the baseline and the per-unit evaluations of a ranking, by any method.

Methods:
    naive: perturb, full forward pass over the evaluation set, restore (the reference; slow).
    exact: the same scores, computing only the part of the network after each unit (``critnet.engine.suffix``).
    taylor: Taylor estimates of Δloss (first order, or with the empirical-Fisher second-order term) from one
        forward and backward pass per batch (labelled exact=False).
    hybrid: taylor estimates for all units, then exact scores for the most critical by estimate.
    halving: a sequential test on growing random parts of the data eliminates the units that cannot be among the
        top k at a stated error probability (``critnet.engine.certify``); the survivors get exact full-set scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from critnet.choices import (
    BOUNDS,
    METHODS,
    SCORES,
    TAYLOR_ORDERS,
    SettingError,
    check_choice,
    check_positive_int,
    check_positive_number,
    check_probability,
)
from critnet.engine import certify
from critnet.engine.naive import run_naive
from critnet.engine.resume import (
    ResultStore,
    fingerprint,
    outcome_from_record,
    outcome_to_record,
    samples_from_record,
    samples_to_record,
)
from critnet.engine.sharding import assign, gather_outcomes
from critnet.engine.suffix import DEFAULT_MEMORY_BUDGET_MB, SuffixEvaluator
from critnet.engine.taylor import (
    estimate_outcome,
    per_sample_estimates,
    taylor_estimates,
)
from critnet.evaluation import sample_pass, tally_pass, tally_samples
from critnet.evaluation_set import EvaluationSet
from critnet.modes import evaluation_mode
from critnet.outputs import OutputSelector, check_selector, describe_selector
from critnet.perturb import Perturbation, Unit, resolve_module, resolve_parameter
from critnet.scoring import (
    Tally,
    UnitOutcome,
    criticality_key,
    in_first_half,
    per_sample_criticality,
    score_of,
    sum_halves,
)


def evaluate_baseline(model: nn.Module, data: EvaluationSet,
                      reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      output: OutputSelector = None) -> UnitOutcome:
    """Tallies of the unperturbed model over the evaluation set (``unit=None``).

    With ``reference`` (:func:`reference_pass` on the same model and set) no forward pass is made: its per-sample
    results are summed batch by batch, as a pass would sum them. ``output`` says where the logits are in what the
    model returns (:func:`critnet.outputs.logits_of`).
    """
    if reference is not None:
        pair = tally_samples(reference, data)
    else:
        with evaluation_mode(model, data.device, deterministic=True), torch.no_grad():
            pair = tally_pass(model, data, output=output)
    return UnitOutcome(unit=None, total=pair.total, halves=pair.halves)


def reference_pass(model: nn.Module, data: EvaluationSet,
                   output: OutputSelector = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unperturbed model's per-sample ``(losses, top1, top5)`` over the set, on the CPU: what
    :func:`evaluate_units` pairs every outcome with, and what :func:`evaluate_baseline` can sum. A caller that needs
    both (a ranking, with one call per level) passes the same reference to each and makes one pass instead of
    several."""
    with evaluation_mode(model, data.device, deterministic=True):
        return sample_pass(model, data, output)


class _Run:
    """The shared state of one ``evaluate_units`` call: sharding, resume records, progress."""

    def __init__(self, model, units, perturbation, data, rank, world_size, all_gather, store, progress,
                 reference=None, output=None):
        self.model = model
        self.output = output
        self.units = units
        self.perturbation = perturbation
        self.data = data
        self.rank = rank
        self.world_size = world_size
        self.all_gather = all_gather
        self.store = store
        self.progress = progress
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self._reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = reference
        self.done = 0
        self.total = 0
        if store is not None:
            loaded = store.load()
            if world_size > 1:
                # Every rank read before any rank writes (the gather is a barrier); keep what all of them saw.
                views = all_gather(sorted(loaded))
                common = set(map(tuple, views[0])).intersection(*(set(map(tuple, v)) for v in views[1:]))
                loaded = {key: loaded[key] for key in loaded if key in common}
            self.records = loaded

    def evaluate(
        self,
        indices: Sequence[int],
        phase: str,
        runner: Callable[[Sequence[tuple[int, Unit]], Callable[[int, UnitOutcome], None]], None],
        costs: Callable[[Sequence[int]], list[float]] | None = None,
        per_sample: bool = False,
    ) -> dict[int, Any]:
        """Outcomes of ``indices`` on every rank: resumed where recorded, the rest shared among ranks.

        With ``per_sample`` the runner records ``(losses, top1, top5)`` vectors instead of outcomes.
        """
        encode, decode = (samples_to_record, samples_from_record) if per_sample else (outcome_to_record, outcome_from_record)
        resumed = {
            i: decode(self.records[(phase, i)], self.units[i]) for i in indices if (phase, i) in self.records
        }
        todo = [i for i in indices if i not in resumed]
        unit_costs = costs(todo) if costs is not None else [1.0] * len(todo)
        mine = [todo[p] for p in assign(unit_costs, self.world_size)[self.rank]]
        self.total += len(mine)
        self._report()
        local: dict[int, Any] = {}

        def record(index: int, outcome: Any) -> None:
            local[index] = outcome
            if self.store is not None:
                self.store.append(encode(phase, index, outcome))
            self.done += 1
            self._report()

        runner([(i, self.units[i]) for i in mine], record)
        missing = [i for i in mine if i not in local]
        if missing:
            raise RuntimeError(f"engine: {len(missing)} units were not evaluated (first: {self.units[missing[0]].label})")
        gathered = gather_outcomes(local, self.units, self.world_size, self.all_gather, phase, encode, decode)
        gathered.update(resumed)
        return gathered

    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unperturbed per-sample results over the whole set (computed once), which the outcomes' paired sums
        are taken against."""
        if self._reference is None:
            with torch.no_grad():
                self._reference = sample_pass(self.model, self.data, self.output)
        return self._reference

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)


def _check_units(model: nn.Module, units: Sequence[Unit], perturbation: Perturbation) -> list[Unit]:
    units = list(units)
    if not units:
        raise SettingError("units: no units to evaluate")
    seen: set[Unit] = set()
    for unit in units:
        if not isinstance(unit, Unit):
            raise SettingError(f"units: {unit!r} is not a critnet.perturb.Unit")
        if unit in seen:
            raise SettingError(f"units: {unit.label} appears twice")
        seen.add(unit)
        perturbation.check_unit_kind(unit.kind)
        if unit.kind == "activation":
            resolve_module(model, unit)
        else:
            resolve_parameter(model, unit)
    return units


def evaluate_units(
    model: nn.Module,
    units: Sequence[Unit],
    perturbation: Perturbation,
    data: EvaluationSet,
    *,
    method: str = "exact",
    score: str = "loss",
    top_k: int = 20,
    rank: int = 0,
    world_size: int = 1,
    all_gather: Callable[[Any], list[Any]] | None = None,
    resume_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_budget_mb: float | None = None,
    taylor_order: int = 1,
    top_k_confidence: float = certify.TOP_K_CONFIDENCE,
    bound: str = "betting",
    loss_clip: float = certify.LOSS_CLIP,
    seed: int = 0,
    report: dict[str, Any] | None = None,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    output: OutputSelector = None,
) -> list[UnitOutcome]:
    """One outcome per unit, in the order of ``units``, on every rank.

    Args:
        model: the network (its train/eval flags are put back afterwards; it is evaluated in eval mode).
        units: the units to perturb, one at a time.
        perturbation: what is done to each unit.
        data: the evaluation set.
        method: ``naive``, ``exact``, ``taylor``, ``hybrid`` or ``halving`` (see the module docstring).
        score: the score hybrid and halving select the top units by (``loss``, ``delta_loss``, ``top1_drop``,
            ``top5_drop``); the other methods return all tallies and do not depend on it.
        top_k: how many units hybrid and halving must get exactly right.
        rank: this process's rank.
        world_size: number of processes; units (not data) are shared among them.
        all_gather: gathers one picklable object from every rank into a list (rank order); needed if
            ``world_size > 1``.
        resume_dir: where finished units are appended; a re-run with the same settings resumes from there.
        progress: called as ``progress(done, total)`` with this rank's counts as its units finish.
        memory_budget_mb: the most memory the exact engine's cached activations may take (default 1024); beyond
            it the evaluation set is processed in segments of whole batches (same scores).
        taylor_order: the estimates of ``taylor`` and ``hybrid``: 1 (first order) or 2 (plus the empirical-Fisher
            second-order term, which helps where first-order terms cancel, e.g. ``add`` on whole tensors).
        top_k_confidence: ``halving``: the probability that its top ``top_k`` is the exact full-set top ``top_k``
            (a finite-sample guarantee with ``bound="betting"``, nominal with ``bound="normal"``).
        bound: ``halving``'s confidence bounds: ``betting`` (finite-sample) or ``normal`` (nominal; with a Taylor
            control variate for loss scores). See :mod:`critnet.engine.certify`.
        loss_clip: ``betting`` with a loss score: the declared largest per-image loss of a perturbed network
            (so each image's Δloss lies in ``[−loss_i, loss_clip − loss_i]``); a run that sees a larger one records
            its guarantee as void.
        seed: ``halving``: the random order in which its stages draw images.
        report: a dict ``halving`` fills with how its test went (stages, eliminations, the bound's quantile).
        reference: :func:`reference_pass` of this model on ``data``, when the caller already made it (otherwise
            the methods that pair outcomes with the unperturbed model make it themselves).
        output: where the logits are in what the model returns (:func:`critnet.outputs.logits_of`); every method
            reads them this way. A key or index enters the resume fingerprint as it is, a callable by its name.

    Raises:
        ValueError: an unknown method or score, bad ranks, a unit the model does not have, or a perturbation that
            is not defined for a unit's kind. The model is bit-identical afterwards, also on any exception.
    """
    check_choice("method", method, METHODS)
    check_choice("score", score, SCORES)
    check_choice("taylor_order", taylor_order, TAYLOR_ORDERS)
    check_positive_int("top_k", top_k)
    check_probability("top_k_confidence", top_k_confidence)
    check_choice("bound", bound, BOUNDS)
    check_positive_number("loss_clip", loss_clip)
    check_selector(output)
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if world_size > 1 and all_gather is None:
        raise ValueError("all_gather: needed to share units among world_size > 1 processes")
    units = _check_units(model, units, perturbation)

    store = None
    if resume_dir is not None:
        settings: dict[str, Any] = {"method": method}
        if method in ("hybrid", "halving"):
            settings.update(score=score, top_k=int(top_k))
        if method == "hybrid":
            settings.update(taylor_order=taylor_order)
        if method == "halving":
            settings.update(first_stage=certify.FIRST_STAGE, top_k_confidence=float(top_k_confidence), seed=int(seed),
                            test=certify.TEST_VERSION, bound=bound)
            if bound == "betting" and score in ("loss", "delta_loss"):
                settings.update(loss_clip=float(loss_clip))
        if output is not None:  # absent by default, so that partial files written before it keep resuming
            settings.update(output=describe_selector(output))
        store = ResultStore(resume_dir, fingerprint(model, units, perturbation, data.checksum, settings), rank)
    try:
        with evaluation_mode(model, data.device, deterministic=method != "taylor"):
            run = _Run(model, units, perturbation, data, rank, world_size, all_gather, store, progress, reference,
                       output)
            if method == "halving":
                outcomes = _halving(run, score, int(top_k), memory_budget_mb, float(top_k_confidence), int(seed),
                                    bound, float(loss_clip), report if report is not None else {})
            else:
                outcomes = _dispatch(run, method, score, int(top_k), memory_budget_mb, taylor_order)
    finally:
        if store is not None:
            store.close()
    return [outcomes[i] for i in range(len(units))]


def _dispatch(
    run: _Run, method: str, score: str, top_k: int, memory_budget_mb: float | None, taylor_order: int
) -> dict[int, UnitOutcome]:
    everything = list(range(len(run.units)))
    if method == "naive":
        with torch.no_grad():
            return run.evaluate(
                everything, "exact",
                lambda work, record: run_naive(run.model, work, run.perturbation, run.data, record, run.reference(),
                                               run.output),
            )
    if method == "taylor":
        estimates = taylor_estimates(run.model, run.units, run.perturbation, run.data, taylor_order, run.output)
        run.total += len(estimates)
        run.done += len(estimates)
        run._report()
        return {i: estimate_outcome(run.units[i], e) for i, e in enumerate(estimates)}
    if method == "exact":
        return _exact(run, everything, "exact", memory_budget_mb)
    return _hybrid(run, score, top_k, memory_budget_mb, taylor_order)


def _exact(run: _Run, indices: Sequence[int], phase: str, memory_budget_mb: float | None) -> dict[int, UnitOutcome]:
    evaluator = SuffixEvaluator(run.model, run.perturbation, run.data, memory_budget_mb, run.reference(), run.output)
    with torch.no_grad():
        return run.evaluate(indices, phase, evaluator.run, lambda idx: evaluator.costs([run.units[i] for i in idx]))


def _order(outcomes: dict[int, UnitOutcome], baseline: UnitOutcome, score: str) -> list[int]:
    """Indices of ``outcomes``, most critical first (ties by unit order)."""
    return sorted(outcomes, key=lambda i: (criticality_key(score_of(outcomes[i].total, baseline.total, score)), i))


def _hybrid(
    run: _Run, score: str, top_k: int, memory_budget_mb: float | None, taylor_order: int
) -> dict[int, UnitOutcome]:
    """Taylor estimates for every unit, then exact scores in the order of the estimates, in rounds of ``top_k``
    units, until a whole round (after at least two) brings no unit into the exact top ``top_k``."""
    estimates = taylor_estimates(run.model, run.units, run.perturbation, run.data, taylor_order, run.output)
    baseline = evaluate_baseline(run.model, run.data, run.reference())
    order = sorted(range(len(run.units)), key=lambda i: (criticality_key(estimates[i]), i))
    exact: dict[int, UnitOutcome] = {}
    position = 0
    while position < len(order):
        size = 2 * top_k if position == 0 else top_k
        batch = order[position : position + size]
        position += len(batch)
        exact.update(_exact(run, batch, "exact", memory_budget_mb))
        if position > len(batch) and not set(batch) & set(_order(exact, baseline, score)[:top_k]):
            break
    outcomes = {i: estimate_outcome(run.units[i], e) for i, e in enumerate(estimates)}
    for i, outcome in exact.items():
        outcomes[i] = UnitOutcome(outcome.unit, outcome.total, outcome.halves, exact=True, estimate=estimates[i])
    return outcomes


def _halving(run: _Run, score: str, top_k: int, memory_budget_mb: float | None, confidence: float, seed: int,
             bound: str, loss_clip: float, report: dict[str, Any]) -> dict[int, UnitOutcome]:
    """The sequential test of :mod:`critnet.engine.certify`, evaluating the network on each stage's new images.
    A unit that reaches the end has been evaluated on every image, and its per-image results are summed batch by
    batch exactly as the exact method sums them, so its scores are the exact full-set scores. Fills ``report``
    with the test's record (:class:`~critnet.engine.certify.SequentialTestRecord`)."""
    data, n = run.data, run.data.samples
    reference = run.reference()
    parts: dict[int, list[tuple[list[int], tuple]]] = {i: [] for i in range(len(run.units))}

    def evaluate(stage: int, remaining: list[int], positions: list[int]) -> torch.Tensor:
        evaluator = SuffixEvaluator(run.model, run.perturbation, data.subset(positions), memory_budget_mb,
                                    output=run.output)
        with torch.no_grad():
            scored = run.evaluate(
                remaining,
                f"halving/{stage}",
                lambda work, record: evaluator.run(work, record, per_sample=True),
                lambda idx: evaluator.costs([run.units[i] for i in idx]),
                per_sample=True,
            )
        index = torch.tensor(positions)
        base = tuple(v[index] for v in reference)
        every = torch.arange(len(positions))
        rows = []
        for i in remaining:
            samples = tuple(v.cpu() for v in scored[i])
            parts[i].append((positions, samples))
            rows.append(per_sample_criticality(samples, base, every, score))
        return torch.stack(rows)

    covariate, covariate_mean = None, None
    if bound == "normal" and score in ("loss", "delta_loss"):
        covariate, covariate_mean = _taylor_covariate(run, seed, memory_budget_mb)
    floor, width = certify.per_image_range(score, reference, loss_clip) if bound == "betting" else (None, None)
    agree = (lambda keep: run.all_gather(keep)[0]) if run.world_size > 1 else None
    # every rank decides alike on the CPU; on GPUs a backward pass may round differently, so rank 0 decides
    remaining, _, record = certify.sequential_test(
        len(run.units), n, top_k, evaluate, bound=bound, confidence=confidence, floor=floor, width=width,
        loss_clip=loss_clip if bound == "betting" and score in ("loss", "delta_loss") else None,
        seed=seed, first_stage=certify.FIRST_STAGE, covariate=covariate, covariate_mean=covariate_mean, agree=agree)
    outcomes: dict[int, UnitOutcome] = {}
    for i in range(len(run.units)):
        outcomes[i] = _tally_over(parts.pop(i), n, data, reference, run.units[i], exact=i in remaining)
    # Units whose exact full-set score equals the k-th's cannot be told apart from it: they are reported, not cut.
    common = Tally(reference[0].sum().item(), int(reference[1].sum()), int(reference[2].sum()), n)
    keys = sorted(criticality_key(score_of(outcomes[i].total, common, score)) for i in remaining)
    record.ties_at_boundary = sum(key == keys[top_k - 1] for key in keys[top_k:]) if len(keys) > top_k else 0
    report.update(record.as_dict())
    return outcomes


def _taylor_covariate(run: _Run, seed: int, memory_budget_mb: float | None):
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
    tested[certify.sample_order(n, seed)[: sizes[-2]]] = True
    budget = (memory_budget_mb if memory_budget_mb is not None else DEFAULT_MEMORY_BUDGET_MB) * 2**20
    fits = len(run.units) * int(tested.sum()) * 8 <= budget
    column = torch.cumsum(tested.long(), 0) - 1  # an image's column among the kept ones (set order)
    try:
        found = per_sample_estimates(run.model, run.units, run.perturbation, data, sums=True,
                                     keep=tested if fits else None, output=run.output)
    except (SettingError, RuntimeError):
        # a module without a tensor output, an attention whose output is not its projection's, or a model
        # autograd cannot differentiate: the test runs without the covariate
        return None, None
    sums, kept = found if fits else (found, None)

    def covariate(stage: int, remaining: list[int], positions: list[int]) -> torch.Tensor:
        if kept is not None:
            return kept[remaining][:, column[torch.tensor(positions)]]
        return per_sample_estimates(run.model, [run.units[i] for i in remaining], run.perturbation,
                                    data.subset(positions), output=run.output)

    return covariate, sums / n


def _scatter(parts, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample results scattered over the set into full-length vectors (zeros where not evaluated)."""
    losses = torch.zeros(n, dtype=torch.float64)
    top1 = torch.zeros(n, dtype=torch.bool)
    top5 = torch.zeros(n, dtype=torch.bool)
    for positions, (l, t1, t5) in parts:
        index = torch.tensor(positions)
        losses[index], top1[index], top5[index] = l.cpu(), t1.cpu(), t5.cpu()
    return losses, top1, top5


def _tally_over(parts, n: int, data: EvaluationSet, reference: tuple, unit: Unit, exact: bool) -> UnitOutcome:
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
