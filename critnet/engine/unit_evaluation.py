"""The engine's entry points: the baseline and the per-unit evaluations of a ranking, by any method of
:mod:`critnet.engine.methods` (naive, exact, taylor, hybrid, halving; each module's docstring says what it does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from critnet.choices import Bound, Method, Score, SettingError, TaylorOrder
from critnet.digests import state_digest
from critnet.distributed import Distributed
from critnet.engine.certify import SequentialTestRecord
from critnet.engine.jobs import Jobs, fingerprint
from critnet.engine.methods import REGISTRY
from critnet.engine.unit_run import MethodSettings, Samples, UnitRun
from critnet.evaluation import sample_pass, tally_pass, tally_samples
from critnet.evaluation_set import EvaluationSet
from critnet.modes import evaluation_mode
from critnet.outputs import OutputSelector, describe_selector
from critnet.perturb import Perturbation, Unit, check_weight_unit, resolve_module
from critnet.scoring import UnitOutcome


class Outcomes(list):
    """One :class:`~critnet.scoring.UnitOutcome` per unit, in the order of the units, and what halving's
    sequential test recorded (``top_k_test``; None for the other methods)."""

    def __init__(self, outcomes: Sequence[UnitOutcome], top_k_test: SequentialTestRecord | None = None) -> None:
        super().__init__(outcomes)
        self.top_k_test = top_k_test


def evaluate_baseline(model: nn.Module, data: EvaluationSet,
                      reference: Samples | None = None,
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
                   output: OutputSelector = None) -> Samples:
    """The unperturbed model's per-sample ``(losses, top1, top5)`` over the set, on the CPU: what
    :func:`evaluate_units` pairs every outcome with, and what :func:`evaluate_baseline` can sum. A caller that needs
    both (a ranking, with one call per level) passes the same reference to each and makes one pass instead of
    several."""
    with evaluation_mode(model, data.device, deterministic=True):
        return sample_pass(model, data, output)


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
            check_weight_unit(model, unit)
    return units


def evaluate_units(
    model: nn.Module,
    units: Sequence[Unit],
    perturbation: Perturbation,
    data: EvaluationSet,
    *,
    method: Method = MethodSettings.method,
    score: Score = MethodSettings.score,
    top_k: int = MethodSettings.top_k,
    rank: int = 0,
    world_size: int = 1,
    all_gather: Callable[[Any], list[Any]] | None = None,
    resume_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_budget_mb: float | None = None,
    taylor_order: TaylorOrder = MethodSettings.taylor_order,
    top_k_confidence: float = MethodSettings.top_k_confidence,
    bound: Bound = MethodSettings.bound,
    loss_clip: float = MethodSettings.loss_clip,
    seed: int = MethodSettings.seed,
    reference: Samples | None = None,
    output: OutputSelector = MethodSettings.output,
) -> Outcomes:
    """One outcome per unit, in the order of ``units``, on every rank (halving's test record in ``.top_k_test``).

    ``method``, ``score``, ``top_k``, ``taylor_order``, ``top_k_confidence``, ``bound``, ``loss_clip``, ``seed`` and
    ``output`` are the engine's settings, documented once in :class:`~critnet.engine.unit_run.MethodSettings`.

    Args:
        model: the network (its train/eval flags are put back afterwards; it is evaluated in eval mode).
        units: the units to perturb, one at a time.
        perturbation: what is done to each unit.
        data: the evaluation set.
        rank: this process's rank.
        world_size: number of processes; units (not data) are shared among them.
        all_gather: gathers one picklable object from every rank into a list (rank order); needed if
            ``world_size > 1``.
        resume_dir: where finished units are appended; a re-run with the same settings resumes from there.
        progress: called as ``progress(done, total)`` with this rank's counts as its units finish.
        memory_budget_mb: the most memory the methods may take beyond one plain forward of one batch (default
            1024): the exact engine's cached activations, stacked variants and per-sample results, and the Taylor
            pass's per-unit terms, largest gradient and backward passes; beyond it the set is processed in segments
            of whole batches and fewer variants are stacked (same scores), and Taylor passes run on parts of
            batches.
        reference: :func:`reference_pass` of this model on ``data``, when the caller already made it (otherwise
            the methods that pair outcomes with the unperturbed model make it themselves).

    Raises:
        ValueError: an unknown method or score, bad ranks, a unit the model does not have, or a perturbation that
            is not defined for a unit's kind. The model is bit-identical afterwards, also on any exception.
    """
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if world_size > 1 and all_gather is None:
        raise ValueError("all_gather: needed to share units among world_size > 1 processes")
    run = UnitRun(method=method, score=score, top_k=top_k, taylor_order=taylor_order,
                  top_k_confidence=top_k_confidence, bound=bound, loss_clip=loss_clip, seed=seed, output=output,
                  model=model, units=_check_units(model, units, perturbation), perturbation=perturbation, data=data,
                  memory_budget_mb=memory_budget_mb, samples=reference)
    chosen = REGISTRY[method]
    key = None
    if resume_dir is not None:
        key = fingerprint("ranking", model=state_digest(model), units=[[u.kind, u.name, u.index] for u in run.units],
                          perturbation=repr(perturbation), data=data.checksum,
                          settings={"method": method, **chosen.settings(run), "output": describe_selector(output)})
    with Jobs(Distributed(rank, world_size, all_gather), resume_dir, key, progress=progress) as run.jobs, \
            evaluation_mode(model, data.device, deterministic=chosen.deterministic):
        outcomes = chosen.evaluate(run)
    return Outcomes([outcomes[i] for i in range(len(run.units))], run.top_k_test)
