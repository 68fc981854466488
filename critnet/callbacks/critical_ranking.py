"""``CriticalRanking``: :func:`critnet.rank` as a Lightning callback, at the end of ``validate`` (or ``fit``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L

from critnet.analyses.ranking import RankSettings, rank
from critnet.callbacks.base import AnalysisCallback, network_of
from critnet.choices import STAGES, Stage, check_choice, check_positive_int, field_values
from critnet.console import console
from critnet.results.ranking_result import Ranking


@dataclass(eq=False)
class CriticalRanking(AnalysisCallback, RankSettings):
    """Rank the units of the model by how much perturbing each one hurts it, at the end of ``validate`` (and of
    ``fit`` when asked), and write ``ranking.csv``, ``ranking.json`` and TensorBoard items in the run's log_dir.

    Its arguments are the ranking's settings (:class:`~critnet.analyses.ranking.RankSettings`: ``unit``,
    ``include``, ``exclude``, ``module_types``, ``perturbation``, ``levels``, ``relative``, ``seed``, ``score``,
    ``method``, ``top_k``, ``taylor_order``, ``top_k_confidence``, ``bound``, ``loss_clip``, ``output``), the
    callbacks' ``resume`` and ``resume_dir``, and its own:

    Args:
        num_batches: Evaluate on the first ``num_batches`` batches of the validation set in dataset order
            (the data's ``batch_size``); ``null`` = the whole validation set.
        run_on: When to run: ``[validate]`` (end of ``validate``) and/or ``fit`` (end of ``fit``).
        memory_budget_mb: The most memory (MB) the evaluation batches may hold on the device (beyond it they
            stream) and the engine may spend on cached activations (beyond it it works in chunks); null = no limit.
        filename: Stem of the files written in log_dir (``<filename>.csv``, ``<filename>.json``).
        progress: Show a rich progress bar of the analysis (rank 0).
        print_table: Print the top ``top_k`` as a rich table (rank 0).

    >>> CriticalRanking(unit="channel", perturbation="zero").check_settings().perturbations()
    [Perturbation(kind='zero', level=0.1, relative=False, seed=0)]
    """

    resume_subdir: ClassVar[str] = "ranking_partial"

    num_batches: int | None = None
    run_on: Sequence[Stage] = ("validate",)
    memory_budget_mb: float | None = None
    filename: str = "ranking"
    progress: bool = True
    print_table: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        #: The last :class:`~critnet.results.Ranking` (every rank holds it).
        self.ranking: Ranking | None = None

    def check_settings(self) -> RankSettings:
        """The checked settings (a one-line :class:`~critnet.choices.SettingError` naming the key otherwise)."""
        check_positive_int("num_batches", self.num_batches, allow_none=True)
        for i, stage in enumerate(self.run_on):
            check_choice(f"run_on[{i}]", stage, STAGES)
        return RankSettings(**field_values(self, RankSettings))

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
        ranking = rank(network_of(pl_module), batches, **field_values(self, RankSettings),
                       memory_budget_mb=self.memory_budget_mb, name=getattr(pl_module, "arch", None),
                       num_batches=self.num_batches, **self.api_options(trainer, pl_module, self.progress))
        ranking.stage, ranking.filename = stage, self.filename
        ranking.skipped_paths = self.skipped_images(trainer)
        self.ranking = ranking
        return [ranking]


__all__ = ["CriticalRanking"]
