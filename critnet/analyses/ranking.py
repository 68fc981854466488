"""``critnet.rank``: perturb each unit of a model in turn, evaluate, and rank the units by criticality."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from critnet.choices import (
    LEVELLESS,
    PERTURBATION_KINDS,
    UNIT_KINDS,
    Bound,
    Method,
    PerturbationKind,
    Score,
    SettingError,
    TaylorOrder,
    UnitKind,
    check_choice,
    check_finite,
    field_values,
)
from critnet.distributed import Distributed
from critnet.engine import evaluate_baseline, evaluate_units, reference_pass
from critnet.engine.unit_run import MethodSettings, Samples
from critnet.evaluation import check_fit
from critnet.evaluation_set import EvaluationSet, as_evaluation_set
from critnet.models.loading import weights_info
from critnet.modes import model_device
from critnet.outputs import OutputSelector, describe_selector
from critnet.perturb import Perturbation, Unit
from critnet.selection import Selection
from critnet.console import progress_bar
from critnet.results import LevelRanking, Ranking
from critnet.results.ranking_rows import (
    estimate_agreement,
    order_outcomes,
    ranking_rows,
    split_half_agreement,
)
from critnet.scoring import UnitOutcome


@dataclass(eq=False)
class RankSettings(MethodSettings, Selection):
    """The settings of :func:`rank` and of the :class:`~critnet.callbacks.CriticalRanking` callback, as
    ``ranking.json`` records them (declared once, checked when built: see :mod:`critnet.choices`).

    They are the engine's settings (:class:`~critnet.engine.unit_run.MethodSettings`: ``method``, ``score``,
    ``top_k``, ``taylor_order``, ``top_k_confidence``, ``bound``, ``loss_clip``, ``seed``, ``output``), the units'
    selection (:class:`~critnet.selection.Selection`: ``include``, ``exclude``, ``module_types``, whose defaults
    depend on ``unit``: ``include=["weight"]`` for tensor and channel units, the original experiment's every
    parameter whose name contains ``weight``, and every module for activation and head units; ``module_types`` any
    module for tensor units, ``[Conv2d, Linear]`` for channel and activation units, every attention module for head
    units), and these:

    Args:
        unit: What a unit is: ``tensor`` (a whole parameter), ``channel`` (one output channel ``weight[c]`` of a
            parameter: a filter or a neuron), ``activation`` (one output channel of a module, via a forward hook) or
            ``head`` (one head of an attention module: its block of input columns of the output projection).
        perturbation: ``add`` a constant, ``scale`` (multiply), Gaussian ``noise``, ``zero`` (ablation),
            ``sign_flip``, ``bitflip`` (flip bit ``level`` of every float32 value), ``prune`` (zero the unit's
            smallest-magnitude fraction ``level``).
        levels: The perturbation's amounts, finite numbers; one ranking per level (e.g. ``prune`` at
            ``[0.1, 0.3, 0.5, 0.7, 0.9]`` is Distiller's sensitivity sweep). Ignored by ``zero`` and ``sign_flip``.
        relative: ``noise`` only: the standard deviation is ``level`` times the unit's own standard deviation.

    >>> RankSettings(unit="channel", perturbation="zero").perturbations()
    [Perturbation(kind='zero', level=0.1, relative=False, seed=0)]
    """

    unit: UnitKind = "tensor"
    perturbation: PerturbationKind = "add"
    levels: Sequence[float] = (0.1,)
    relative: bool = False

    def __post_init__(self) -> None:
        Selection.__post_init__(self)
        MethodSettings.__post_init__(self)
        check_choice("unit", self.unit, UNIT_KINDS)
        check_choice("perturbation", self.perturbation, PERTURBATION_KINDS)
        levels = [self.levels] if isinstance(self.levels, (int, float)) else list(self.levels)
        self.levels = tuple(check_finite(f"levels[{i}]", level) for i, level in enumerate(levels))
        if not self.levels and self.perturbation not in LEVELLESS:
            raise SettingError(f"levels: empty; {self.perturbation} needs at least one level")
        self.perturbations()  # the perturbation's own range checks (bit index, fraction, …) and unit kind

    def perturbations(self) -> list[Perturbation]:
        """One perturbation per distinct level (``zero`` and ``sign_flip`` ignore the level: one in all)."""
        unique: dict[str, Perturbation] = {}
        for level in self.levels or (0.0,):
            try:
                p = Perturbation(self.perturbation, level, self.relative, self.seed)
                p.check_unit_kind(self.unit)
            except ValueError as err:
                raise SettingError(str(err)) from None
            unique.setdefault(p.label, p)
        return list(unique.values())

    def as_dict(self, resume: bool, num_batches: int | None = None) -> dict[str, Any]:
        """The settings as ``ranking.json`` records them: every field, the distinct levels ranked, and the run's
        ``num_batches`` and ``resume``."""
        return {**field_values(self, RankSettings), **Selection.as_dict(self),
                "levels": [p.level for p in self.perturbations()], "output": describe_selector(self.output),
                "num_batches": num_batches, "resume": resume}

    def select(self, model: nn.Module, example_input=None) -> list[Unit]:
        """The units of ``model`` these settings select (one-line :class:`SettingError` when none or bad)."""
        try:
            return self.units(model, self.unit, example_input)
        except ValueError as err:
            raise SettingError(str(err)) from None


def _rank_level(model: nn.Module, units: list[Unit], perturbation: Perturbation, evaluation_set: EvaluationSet,
                settings: RankSettings, baseline: UnitOutcome, reference: Samples | None, distributed: Distributed,
                resume_dir: str | Path | None, progress: Any, memory_budget_mb: float | None) -> LevelRanking:
    """The ranking of one perturbation level: every unit evaluated, ordered by the score."""
    started = time.perf_counter()
    method, score, top_k = settings.method, settings.score, settings.top_k
    steps = "unit·stages" if method == "halving" else "units"  # halving counts each unit once per stage
    with progress_bar(progress, f"ranking · {perturbation.label} · {method}", distributed, step_name=steps) as bar:
        outcomes = evaluate_units(
            model, units, perturbation, evaluation_set, **field_values(settings, MethodSettings),
            rank=distributed.rank, world_size=distributed.world_size, all_gather=distributed.all_gather,
            resume_dir=resume_dir, progress=bar.update, memory_budget_mb=memory_budget_mb, reference=reference)
    return LevelRanking(
        perturbation=perturbation,
        rows=ranking_rows(order_outcomes(outcomes, baseline, score), baseline, perturbation),
        split_half=split_half_agreement(outcomes, baseline, score, top_k),
        engine_agreement=(estimate_agreement(outcomes, baseline, score, top_k)
                          if method in ("taylor", "hybrid") else None),
        elapsed_s=time.perf_counter() - started,
        top_k_test=None if outcomes.top_k_test is None else outcomes.top_k_test.as_dict(),
    )


def model_name(model: nn.Module, name: str | None) -> str:
    """How reports call the model: ``name`` if given, else its class name."""
    return name if name is not None else type(model).__name__


def rank(
    model: nn.Module,
    data: Any,
    *,
    unit: UnitKind = RankSettings.unit,
    perturbation: PerturbationKind = RankSettings.perturbation,
    levels: Sequence[float] = RankSettings.levels,
    include: Sequence[str] | None = RankSettings.include,
    exclude: Sequence[str] = RankSettings.exclude,
    module_types: Sequence[str] | None = RankSettings.module_types,
    relative: bool = RankSettings.relative,
    seed: int = RankSettings.seed,
    score: Score = RankSettings.score,
    method: Method = RankSettings.method,
    top_k: int = RankSettings.top_k,
    taylor_order: TaylorOrder = RankSettings.taylor_order,
    top_k_confidence: float = RankSettings.top_k_confidence,
    bound: Bound = RankSettings.bound,
    loss_clip: float = RankSettings.loss_clip,
    units: Sequence[Unit] | None = None,
    device: Any = None,
    memory_budget_mb: float | None = None,
    resume_dir: str | Path | None = None,
    progress: Any = False,
    distributed: Distributed | None = None,
    name: str | None = None,
    num_batches: int | None = None,
    output: OutputSelector = RankSettings.output,
) -> Ranking:
    """Rank the units of ``model`` by how much perturbing each one alone hurts it on ``data``.

    The keyword arguments ``unit`` … ``loss_clip`` and ``output`` are the ranking's settings, documented once in
    :class:`RankSettings`, which checks them before the model is touched.

    Args:
        model: the classifier; it is evaluated in eval mode and is bit-identical afterwards (also on errors and
            interrupts).
        data: a DataLoader, any iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair. The
            batches are read once and held (up to ``memory_budget_mb``).
        units: score exactly these :class:`~critnet.perturb.Unit` objects instead of selecting them.
        device: where to evaluate (default: where the model is).
        memory_budget_mb: the most memory the ranking may take beyond the model, the data and one plain forward of
            one batch: cached activations, stacked variants, per-sample results, the Taylor pass (None: the
            engine's default of 1024 MB; held batches then have no limit).
        resume_dir: append finished units here and skip them when the same ranking runs again.
        progress: draw a rich progress bar (or join a live ``rich.progress.Progress``).
        distributed: a :class:`~critnet.distributed.Distributed` handle: units are shared among the ranks, every
            rank returns the whole ranking.
        name: how reports call the model (default: its class name).
        num_batches: recorded in the settings: how many batches of a longer source ``data`` holds.

    Returns:
        A :class:`~critnet.results.Ranking`.

    Raises:
        CritnetError: one line naming what is at fault, before the model is touched: a setting
            (:class:`~critnet.choices.SettingError`), data that is not ``(inputs, targets)`` batches of class
            indices within the model's classes, inputs the model rejects, or logits that cannot be read (see
            :func:`critnet.evaluation.check_fit`).

    >>> import critnet, torch
    >>> model = critnet.load_model("resnet20")
    >>> batch = (torch.randn(8, 3, 32, 32), torch.arange(8))
    >>> ranking = critnet.rank(model, batch, unit="channel", perturbation="zero", include=["linear.weight"])
    >>> len(ranking.rows), ranking.rows[0]["kind"]
    (10, 'channel')
    """
    settings = RankSettings(include=include, exclude=exclude, module_types=module_types, unit=unit,
                            perturbation=perturbation, levels=levels,
                            relative=relative, seed=seed, score=score, method=method, top_k=top_k,
                            taylor_order=taylor_order, top_k_confidence=top_k_confidence, bound=bound,
                            loss_clip=loss_clip, output=output)
    distributed = distributed or Distributed.single()
    started = time.perf_counter()
    evaluation_set = as_evaluation_set(data, device=model_device(model, device), memory_budget_mb=memory_budget_mb)
    check_fit(model, evaluation_set, output=output)
    if units is None:
        example = next(iter(evaluation_set))[0][:1] if unit == "activation" else None
        units = settings.select(model, example)
    units = list(units)
    read_s = time.perf_counter() - started
    # one unperturbed pass: the baseline sums it, every level's outcomes are paired with it
    reference = reference_pass(model, evaluation_set, output) if method != "taylor" else None
    baseline = evaluate_baseline(model, evaluation_set, reference, output)
    levels_ranked = [_rank_level(model, units, p, evaluation_set, settings, baseline, reference, distributed,
                                 resume_dir, progress, memory_budget_mb) for p in settings.perturbations()]
    weights = weights_info(model)
    return Ranking(
        model_name=model_name(model, name),
        unit=unit,
        score=score,
        method=method,
        top_k=top_k,
        settings=settings.as_dict(resume=resume_dir is not None, num_batches=num_batches),
        units=units,
        baseline={**baseline.total.metrics(), "halves": [half.metrics() for half in baseline.halves]},
        levels=levels_ranked,
        samples=evaluation_set.samples,
        batches=len(evaluation_set),
        devices=distributed.world_size,
        read_s=read_s,
        elapsed_s=time.perf_counter() - started,
        checkpoint_sha256=weights.sha256 if weights is not None else None,
    )
