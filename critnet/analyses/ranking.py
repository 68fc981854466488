"""``critnet.rank``: perturb each unit of a model in turn, evaluate, and rank the units by criticality."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from critnet.choices import (
    BOUNDS,
    LEVELLESS,
    METHODS,
    PERTURBATION_KINDS,
    SCORES,
    TAYLOR_ORDERS,
    UNIT_KINDS,
    Bound,
    SettingError,
    check_choice,
    check_finite,
    check_positive_int,
    check_positive_number,
    check_probability,
)
from critnet.distributed import Distributed
from critnet.engine import evaluate_baseline, evaluate_units, reference_pass
from critnet.engine.certify import LOSS_CLIP, TOP_K_CONFIDENCE
from critnet.engine.unit_run import Samples
from critnet.evaluation import check_fit
from critnet.evaluation_set import EvaluationSet, as_evaluation_set
from critnet.models.loading import weights_info
from critnet.modes import model_device
from critnet.outputs import OutputSelector, check_selector, describe_selector
from critnet.perturb import Perturbation, Unit, select_units
from critnet.console import progress_bar
from critnet.results import LevelRanking, Ranking
from critnet.results.ranking_rows import (
    estimate_agreement,
    order_outcomes,
    ranking_rows,
    split_half_agreement,
    tally_summary,
)
from critnet.scoring import UnitOutcome


def _rank_level(model: nn.Module, units: list[Unit], perturbation: Perturbation, evaluation_set: EvaluationSet,
                settings: RankSettings, baseline: UnitOutcome, reference: Samples | None, distributed: Distributed,
                resume_dir: str | Path | None, progress: Any, memory_budget_mb: float | None) -> LevelRanking:
    """The ranking of one perturbation level: every unit evaluated, ordered by the score."""
    started = time.perf_counter()
    method, score, top_k = settings.method, settings.score, settings.top_k
    steps = "unit·stages" if method == "halving" else "units"  # halving counts each unit once per stage
    with progress_bar(progress, f"ranking · {perturbation.label} · {method}", distributed, step_name=steps) as bar:
        outcomes = evaluate_units(
            model, units, perturbation, evaluation_set, method=method, score=score, top_k=top_k,
            rank=distributed.rank, world_size=distributed.world_size, all_gather=distributed.all_gather,
            resume_dir=resume_dir, progress=bar.update, memory_budget_mb=memory_budget_mb,
            taylor_order=settings.taylor_order, top_k_confidence=settings.top_k_confidence, bound=settings.bound,
            loss_clip=settings.loss_clip, seed=settings.seed, reference=reference, output=settings.output,
        )
    return LevelRanking(
        perturbation=perturbation,
        rows=ranking_rows(order_outcomes(outcomes, baseline, score), baseline, perturbation),
        split_half=split_half_agreement(outcomes, baseline, score, top_k),
        engine_agreement=(estimate_agreement(outcomes, baseline, score, top_k)
                          if method in ("taylor", "hybrid") else None),
        elapsed_s=time.perf_counter() - started,
        test=None if outcomes.test is None else outcomes.test.as_dict(),
    )


def model_name(model: nn.Module, name: str | None) -> str:
    """How reports call the model: ``name`` if given, else its class name."""
    return name if name is not None else type(model).__name__


@dataclass(frozen=True)
class RankSettings:
    """The settings of a ranking, checked when built: every bad value raises a one-line
    :class:`~critnet.choices.SettingError` naming the key, the value and what is allowed.

    See :func:`rank` for the meaning of each field.

    >>> RankSettings(unit="channel", perturbation="zero").perturbations()
    [Perturbation(kind='zero', level=0.1, relative=False, seed=0)]
    """

    unit: str = "tensor"
    perturbation: str = "add"
    levels: Sequence[float] = (0.1,)
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    module_types: Sequence[str] | None = None
    relative: bool = False
    seed: int = 0
    score: str = "loss"
    method: str = "exact"
    top_k: int = 20
    taylor_order: int = 1
    top_k_confidence: float = TOP_K_CONFIDENCE
    bound: str = "betting"
    loss_clip: float = LOSS_CLIP
    output: OutputSelector = None
    levels_checked: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("unit", self.unit, UNIT_KINDS)
        check_choice("perturbation", self.perturbation, PERTURBATION_KINDS)
        check_choice("score", self.score, SCORES)
        check_choice("method", self.method, METHODS)
        check_choice("taylor_order", self.taylor_order, TAYLOR_ORDERS)
        check_positive_int("top_k", self.top_k)
        check_positive_int("seed", self.seed, minimum=0)
        check_probability("top_k_confidence", self.top_k_confidence)
        check_choice("bound", self.bound, BOUNDS)
        check_positive_number("loss_clip", self.loss_clip)
        check_selector(self.output)
        levels = [self.levels] if isinstance(self.levels, (int, float)) else list(self.levels)
        checked = tuple(check_finite(f"levels[{i}]", level) for i, level in enumerate(levels))
        if not checked and self.perturbation not in LEVELLESS:
            raise SettingError(f"levels: empty; {self.perturbation} needs at least one level")
        object.__setattr__(self, "levels_checked", checked)
        self.perturbations()  # the perturbation's own range checks (bit index, fraction, …) and unit kind

    def perturbations(self) -> list[Perturbation]:
        """One perturbation per distinct level (``zero`` and ``sign_flip`` ignore the level: one in all)."""
        unique: dict[str, Perturbation] = {}
        for level in self.levels_checked or (0.0,):
            try:
                p = Perturbation(self.perturbation, level, self.relative, self.seed)
                p.check_unit_kind(self.unit)
            except ValueError as err:
                raise SettingError(str(err)) from None
            unique.setdefault(p.label, p)
        return list(unique.values())

    def as_dict(self, resume: bool, num_batches: int | None = None) -> dict[str, Any]:
        """The settings as ``ranking.json`` records them."""
        return {
            "unit": self.unit,
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
            "module_types": None if self.module_types is None else list(self.module_types),
            "perturbation": self.perturbation,
            "levels": [p.level for p in self.perturbations()],
            "relative": self.relative,
            "seed": self.seed,
            "num_batches": num_batches,
            "score": self.score,
            "method": self.method,
            "top_k": self.top_k,
            "taylor_order": self.taylor_order,
            "top_k_confidence": self.top_k_confidence,
            "bound": self.bound,
            "loss_clip": self.loss_clip,
            "output": describe_selector(self.output),
            "resume": resume,
        }

    def select(self, model: nn.Module, example_input=None) -> list[Unit]:
        """The units of ``model`` these settings select (one-line :class:`SettingError` when none or bad)."""
        try:
            return select_units(model, self.unit, self.include, self.exclude, self.module_types, example_input)
        except ValueError as err:
            raise SettingError(str(err)) from None


def rank(
    model: nn.Module,
    data: Any,
    *,
    unit: str = "tensor",
    perturbation: str = "add",
    levels: Sequence[float] = (0.1,),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Sequence[str] | None = None,
    relative: bool = False,
    seed: int = 0,
    score: str = "loss",
    method: str = "exact",
    top_k: int = 20,
    taylor_order: int = 1,
    top_k_confidence: float = TOP_K_CONFIDENCE,
    bound: Bound = "betting",
    loss_clip: float = LOSS_CLIP,
    units: Sequence[Unit] | None = None,
    device: Any = None,
    memory_budget_mb: float | None = None,
    resume_dir: str | Path | None = None,
    progress: Any = False,
    distributed: Distributed | None = None,
    name: str | None = None,
    num_batches: int | None = None,
    output: OutputSelector = None,
) -> Ranking:
    """Rank the units of ``model`` by how much perturbing each one alone hurts it on ``data``.

    Args:
        model: the classifier; it is evaluated in eval mode and is bit-identical afterwards (also on errors and
            interrupts).
        data: a DataLoader, any iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair. The
            batches are read once and held (up to ``memory_budget_mb``).
        unit: ``tensor`` (a whole parameter), ``channel`` (output channel ``weight[c]``: a filter or neuron),
            ``activation`` (output channel ``c`` of a module, through a forward hook) or ``head`` (one head of
            each attention module).
        perturbation: ``add``, ``scale``, ``noise``, ``zero``, ``sign_flip``, ``bitflip`` or ``prune``.
        levels: the perturbation's amounts, one ranking each (ignored by ``zero`` and ``sign_flip``).
        include: regular expressions searched in parameter (or module) names; default ``["weight"]`` for tensor
            and channel units, every module for activation units.
        exclude: regular expressions of names to drop.
        module_types: class names of the owning modules; default any (tensor), ``Conv2d``/``Linear`` otherwise.
        relative: ``noise`` only: σ = level × the unit's standard deviation.
        seed: ``noise``: draws depend on (seed, unit) alone; ``halving``: the random order of its images.
        score: what ranks the units, larger = more critical: ``loss``, ``delta_loss``, ``top1_drop``,
            ``top5_drop``.
        method: ``exact`` (suffix-only, the naive scores bit for bit), ``naive``, ``taylor`` (estimates),
            ``hybrid`` (estimates, then exact for the top) or ``halving`` (the exact full-set top ``top_k``, found by a
            sequential test on growing random parts of the data; see :mod:`critnet.engine.certify`).
        top_k: rows shown in tables, and the exact top of ``hybrid``/``halving``.
        taylor_order: ``1`` or ``2`` (adds the empirical-Fisher term), for ``taylor`` and ``hybrid``.
        top_k_confidence: ``halving``: the probability that its top ``top_k`` is the exact full-set top ``top_k``
            (family-wise over every unit and stage): a finite-sample guarantee with ``bound="betting"``, a nominal
            level with ``bound="normal"``.
        bound: ``halving``'s confidence bounds: ``betting`` (the default: betting confidence sequences for
            sampling without replacement, valid in finite samples for values in a declared range) or ``normal``
            (normal intervals with a Taylor control variate: faster, nominal).
        loss_clip: ``halving`` with ``bound="betting"`` and a loss score: the declared largest per-image loss
            (nats) of a perturbed network. The ranking's ``test`` records the largest it saw and calls the
            guarantee void if any exceeded it.
        units: score exactly these :class:`~critnet.perturb.Unit` objects instead of selecting them.
        device: where to evaluate (default: where the model is).
        memory_budget_mb: the most memory held batches and cached activations may take (None: no limit for the
            batches, the engine's default for its caches).
        resume_dir: append finished units here and skip them when the same ranking runs again.
        progress: draw a rich progress bar (or join a live ``rich.progress.Progress``).
        distributed: a :class:`~critnet.distributed.Distributed` handle: units are shared among the ranks, every
            rank returns the whole ranking.
        name: how reports call the model (default: its class name).
        num_batches: recorded in the settings: how many batches of a longer source ``data`` holds.
        output: where the logits are in what the model returns (:func:`critnet.outputs.logits_of`): ``None`` (the
            default) takes a tensor as it is and reads ``.logits`` (attribute or key) from anything else, e.g. a
            Hugging Face ``ModelOutput`` or a dict; a key (``"scores"``), an index (``0`` for a tuple) or a
            callable that takes the model's output and returns the logits tensor selects them explicitly. Every
            method reads the logits this way; with ``resume_dir`` a key or index enters the resume fingerprint as
            it is, a callable by its module and qualified name.

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
    settings = RankSettings(unit, perturbation, levels, include, exclude, module_types, relative, seed, score,
                            method, top_k, taylor_order, top_k_confidence, bound, loss_clip, output)
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
        baseline={**tally_summary(baseline.total), "halves": [tally_summary(half) for half in baseline.halves]},
        levels=levels_ranked,
        samples=evaluation_set.samples,
        batches=len(evaluation_set),
        devices=distributed.world_size,
        read_s=read_s,
        elapsed_s=time.perf_counter() - started,
        checkpoint_sha256=weights.sha256 if weights is not None else None,
    )
