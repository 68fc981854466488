"""``CriticalRanking``: :func:`critnet.rank` as a Lightning callback, at the end of ``validate`` (or ``fit``)."""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L

from critnet.analyses.ranking import RankSettings, rank
from critnet.callbacks.base import AnalysisCallback, network_of
from critnet.choices import (
    STAGES,
    Bound,
    Method,
    PerturbationKind,
    Score,
    Stage,
    TaylorOrder,
    UnitKind,
    check_choice,
    check_positive_int,
)
from critnet.engine.certify import LOSS_CLIP, TOP_K_CONFIDENCE
from critnet.console import console
from critnet.results.ranking_result import Ranking


class CriticalRanking(AnalysisCallback):
    """Rank the units of the model by how much perturbing each one hurts it, at the end of ``validate`` (and of
    ``fit`` when asked), and write ``ranking.csv``, ``ranking.json`` and TensorBoard items in the run's log_dir.

    Args:
        unit: What a unit is: ``tensor`` (a whole parameter), ``channel`` (one output channel ``weight[c]`` of a
            parameter: a filter or a neuron), ``activation`` (one output channel of a module, via a forward hook) or
            ``head`` (one head of an attention module: its block of input columns of the output projection).
        include: Regular expressions searched in parameter names (tensor, channel) or module names (activation);
            a name is kept if one matches. Default: ``["weight"]`` for tensor/channel units (the original
            experiment: every parameter whose name contains ``weight``), all modules for activation units.
        exclude: Regular expressions; matching names are dropped.
        module_types: Class names of the owning modules, e.g. ``[Conv2d, Linear]``. Default: any module for tensor
            units, ``[Conv2d, Linear]`` for channel and activation units.
        perturbation: ``add`` a constant, ``scale`` (multiply), Gaussian ``noise``, ``zero`` (ablation),
            ``sign_flip``, ``bitflip`` (flip bit ``level`` of every float32 value), ``prune`` (zero the unit's
            smallest-magnitude fraction ``level``).
        levels: The perturbation's amounts, finite numbers; one ranking per level (e.g. ``prune`` at
            ``[0.1, 0.3, 0.5, 0.7, 0.9]`` is Distiller's sensitivity sweep). Ignored by ``zero`` and ``sign_flip``.
        relative: ``noise`` only: the standard deviation is ``level`` times the unit's own standard deviation.
        seed: ``noise``: draws depend only on (seed, unit), so they are the same on any number of devices;
            ``halving``: the random order in which its stages draw images.
        num_batches: Evaluate on the first ``num_batches`` batches of the validation set in dataset order
            (the data's ``batch_size``); ``null`` = the whole validation set.
        score: What ranks the units (larger = more critical): the perturbed ``loss`` (the original), ``delta_loss``
            against the unperturbed baseline, ``top1_drop`` or ``top5_drop`` (percentage points).
        method: The engine: ``exact`` (suffix-only exact evaluation, the default), ``naive`` (full forward per unit;
            the reference), ``taylor`` (Taylor estimates only), ``hybrid`` (estimates, then the top units
            exactly) or ``halving`` (the exact full-set top ``top_k`` with exact full-set scores, found by a
            sequential test on growing random parts of the data that eliminates the other units early).
        top_k: Units shown in the console table and TensorBoard, and the exact top of hybrid/halving (at least 1).
        taylor_order: The estimates of ``taylor``/``hybrid``: ``1`` (first order) or ``2`` (plus the
            empirical-Fisher second-order term, which helps where first-order terms cancel, e.g. ``add`` on whole
            tensors of a trained network, and adds noise for zeroed channels).
        top_k_confidence: ``halving``: the probability that its top ``top_k`` is the exact full-set top
            ``top_k`` (Bonferroni-corrected over every unit); strictly between 0 and 1. A finite-sample guarantee
            with ``bound: betting``, a nominal level with ``bound: normal``.
        bound: ``halving``'s confidence bounds: ``betting`` (finite-sample: betting confidence sequences for
            sampling without replacement) or ``normal`` (normal intervals with a Taylor control variate; faster,
            nominal).
        loss_clip: ``halving`` with ``bound: betting`` and a loss score: the declared largest per-image loss
            (nats) of a perturbed network; the run records the largest it saw and calls its guarantee void if one
            exceeded it.
        run_on: When to run: ``[validate]`` (end of ``validate``) and/or ``fit`` (end of ``fit``).
        resume: Append finished units to a partial-results file and resume from it when the same analysis is run
            again after an interruption.
        resume_dir: Where the partial results live; default ``<trainer.default_root_dir>/ranking_partial``.
        memory_budget_mb: The most memory (MB) the evaluation batches may hold on the device (beyond it they
            stream) and the engine may spend on cached activations (beyond it it works in chunks); null = no limit.
        filename: Stem of the files written in log_dir (``<filename>.csv``, ``<filename>.json``).
        progress: Show a rich progress bar of the analysis (rank 0).
        print_table: Print the top ``top_k`` as a rich table (rank 0).
    """

    resume_subdir = "ranking_partial"

    def __init__(
        self,
        unit: UnitKind = "tensor",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        module_types: list[str] | None = None,
        perturbation: PerturbationKind = "add",
        levels: list[float] = [0.1],  # noqa: B006 - read only; shown as the default in --help
        relative: bool = False,
        seed: int = 0,
        num_batches: int | None = None,
        score: Score = "loss",
        method: Method = "exact",
        top_k: int = 20,
        taylor_order: TaylorOrder = 1,
        top_k_confidence: float = TOP_K_CONFIDENCE,
        bound: Bound = "betting",
        loss_clip: float = LOSS_CLIP,
        run_on: list[Stage] = ["validate"],  # noqa: B006 - read only
        resume: bool = False,
        resume_dir: str | None = None,
        memory_budget_mb: float | None = None,
        filename: str = "ranking",
        progress: bool = True,
        print_table: bool = True,
    ) -> None:
        super().__init__(resume, resume_dir)
        self.rank_settings = dict(unit=unit, include=include, exclude=list(exclude or []), module_types=module_types,
                            perturbation=perturbation, levels=list(levels), relative=relative, seed=seed, score=score,
                            method=method, top_k=top_k, taylor_order=taylor_order,
                            top_k_confidence=top_k_confidence, bound=bound, loss_clip=loss_clip)
        self.num_batches = num_batches
        self.run_on = list(run_on)
        self.memory_budget_mb = memory_budget_mb
        self.filename = filename
        self.progress = progress
        self.print_table = print_table
        #: The last :class:`~critnet.results.Ranking` (every rank holds it).
        self.ranking: Ranking | None = None

    def check_settings(self) -> RankSettings:
        """The checked settings (a one-line :class:`~critnet.choices.SettingError` naming the key otherwise)."""
        check_positive_int("num_batches", self.num_batches, allow_none=True)
        for i, stage in enumerate(self.run_on):
            check_choice(f"run_on[{i}]", stage, STAGES)
        return RankSettings(**self.rank_settings)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with self.named():
            settings = self.check_settings()
            if settings.unit != "activation":  # activation units may need a batch to count their channels
                settings.select(network_of(pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "fit" in self.run_on:
            self.run(trainer, pl_module, "fit")

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[Ranking]:
        """Rank on every rank (units are shared among them)."""
        loader = self.datamodule(trainer).analysis_dataloader()
        batches: Any = loader
        if self.num_batches is not None:
            batches = list(itertools.islice(loader, self.num_batches))
            if len(batches) < self.num_batches and trainer.is_global_zero:
                console.print(f"[yellow]CriticalRanking: num_batches={self.num_batches} but the validation set has "
                              f"only {len(batches)} batches; using all of them[/yellow]")
        ranking = rank(network_of(pl_module), batches, **self.rank_settings, memory_budget_mb=self.memory_budget_mb,
                       name=getattr(pl_module, "arch", None), num_batches=self.num_batches,
                       **self.api_options(trainer, pl_module, self.progress))
        ranking.stage, ranking.filename = stage, self.filename
        ranking.skipped_paths = self.skipped_images(trainer)
        self.ranking = ranking
        return [ranking]


__all__ = ["CriticalRanking"]
