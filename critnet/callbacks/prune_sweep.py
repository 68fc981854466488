"""``PruneSweep``: :func:`critnet.prune_sweep` and :func:`critnet.compare_orders` as a Lightning callback."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from critnet.analyses.pruning import (
    OrderSettings,
    SweepSettings,
    compare_orders,
    prune_sweep,
)
from critnet.callbacks.base import AnalysisCallback, network_of
from critnet.choices import (
    CHANNEL_ORDERS,
    CRITICALITY_SPLITS,
    ChannelOrder,
    CriticalityMethod,
    CriticalitySplit,
    Score,
    SettingError,
    check_choice,
    check_fractions,
    check_positive_int,
    field_values,
)
from critnet.results.sweep_result import Sweep

#: The callback's keys of the comparison's settings that it names differently.
_GUIDED_KEYS = {"orders": "guided_orders", "ratios": "guided_ratios"}


@dataclass(eq=False)
class PruneSweep(AnalysisCallback, SweepSettings):
    """Prune the validated model over a p_prune × p_bern grid, evaluate each setting on the whole validation set,
    restore the exact weights; optionally compare channel pruning orders (criticality vs L1 vs random).

    Runs once at the end of ``analyze.py validate`` (not during ``fit``). Writes to ``trainer.log_dir``:
    ``prune_sweep.csv`` (one row per setting and Bernoulli draw; the unpruned baseline first), ``prune_sweep.json``
    (settings, per-setting mean ± std over the draws, the baseline, timings), ``prune_sweep.md`` and
    ``prune_sweep.png``; with ``guided_orders`` also ``prune_guided.{csv,json,md,png}`` and, when the ranking is
    computed here, ``prune_criticality.csv``. TensorBoard gets the curves as scalars (the step is the measured ratio
    in basis points), the figures, the tables and one hparams entry per setting.

    Its arguments are the sweep's settings (:class:`~critnet.analyses.pruning.SweepSettings`: ``method``,
    ``scope``, ``p_prune``, ``p_bern``, ``repeats``, ``seed``, ``include_linear``, ``include``, ``exclude``,
    ``module_types``), the callbacks' ``resume`` and ``resume_dir`` (default
    ``<trainer.default_root_dir>/prune_partial``), the comparison's settings
    (:class:`~critnet.analyses.pruning.OrderSettings`, on the same layers, ``repeats`` and ``seed``):
    ``guided_orders`` (its ``orders``; empty = no comparison), ``guided_ratios`` (its ``ratios``),
    ``criticality_score`` and ``criticality_method``, and its own:

    Args:
        criticality_csv: A channel ranking (``ranking.csv`` of the ranking callback with channel units: columns
            ``layer``, ``index``, ``score``, larger = more critical). ``None`` = compute one here with the engine by
            zeroing every output channel.
        criticality_samples: Rank on a seeded random subset of this many images of ``criticality_split``
            (``None`` = all of them; required for ``train``); the pruned networks are always evaluated on the whole
            validation set.
        criticality_split: Which images the computed ranking uses: ``val`` (the evaluated images themselves) or
            ``train`` (the training split with the evaluation transforms: held out from the evaluation, so the
            comparison is not judged on the images the order was chosen on).
        memory_budget_mb: Keep the decoded validation batches in memory (on the model's device) up to this size;
            beyond it they are read again for every setting. ``None`` = no limit.
        print_tables: Print the rich tables and progress bar (rank 0).

    >>> sweep, guided = PruneSweep(p_prune=[0.2], guided_orders=["l1"]).check_settings()
    >>> sweep.p_prune, guided.orders, guided.ratios
    ([0.2], ['l1'], [0.0, 0.05, 0.1, 0.2, 0.3])
    """

    resume_subdir: ClassVar[str] = "prune_partial"

    guided_orders: Sequence[ChannelOrder] = ()
    guided_ratios: Sequence[float] = OrderSettings.ratios
    criticality_csv: str | None = None
    criticality_score: Score = OrderSettings.criticality_score
    criticality_method: CriticalityMethod = OrderSettings.criticality_method
    criticality_samples: int | None = None
    criticality_split: CriticalitySplit = "val"
    memory_budget_mb: float | None = 4096.0
    print_tables: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        #: The last sweep and guided comparison (:class:`~critnet.results.Sweep`; every rank holds them).
        self.sweep: Sweep | None = None
        self.guided: Sweep | None = None

    @property
    def print_table(self) -> bool:  # the base's switch, under this callback's own key
        return self.print_tables

    def order_values(self) -> dict[str, Any]:
        """The comparison's settings as :func:`~critnet.compare_orders` takes them, read from this callback."""
        return {field.name: getattr(self, _GUIDED_KEYS.get(field.name, field.name))
                for field in dataclasses.fields(OrderSettings) if field.init}

    def check_settings(self) -> tuple[SweepSettings, OrderSettings | None]:
        """The checked settings of the sweep and of the comparison (None without ``guided_orders``); a one-line
        :class:`~critnet.choices.SettingError` naming the key of any bad setting otherwise."""
        sweep = SweepSettings(**field_values(self, SweepSettings))
        check_fractions("guided_ratios", self.guided_ratios)  # even when unused
        for i, order in enumerate(self.guided_orders):
            check_choice(f"guided_orders[{i}]", order, CHANNEL_ORDERS)
        guided = OrderSettings(**self.order_values()) if self.guided_orders else None
        check_choice("criticality_split", self.criticality_split, CRITICALITY_SPLITS)
        check_positive_int("criticality_samples", self.criticality_samples, allow_none=True)
        if self.criticality_csv is not None and not Path(self.criticality_csv).is_file():
            raise SettingError(f"criticality_csv: {self.criticality_csv!r} does not exist")
        if self._computes_ranking() and self.criticality_split == "train" and self.criticality_samples is None:
            raise SettingError("criticality_split: train needs criticality_samples (how many training images "
                               "to rank on)")
        return sweep, guided

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[Sweep]:
        """The sweep (and the guided comparison) on every rank, images shared among the ranks: each reads and
        decodes only its own batches, and the sums are gathered."""
        options = self.api_options(trainer, pl_module, self.print_tables)
        datamodule = self.datamodule(trainer)
        loader = datamodule.analysis_dataloader(options["distributed"].rank, options["distributed"].world_size)
        shared = dict(
            memory_budget_mb=self.memory_budget_mb, sharded=True, **options,
            # the precision of validate (e.g. bf16-mixed autocast), so the unpruned baseline is the validated model
            forward_context=getattr(trainer.precision_plugin, "val_step_context", None),
            precision=str(getattr(trainer.precision_plugin, "precision", "")),
            name=str(getattr(pl_module, "arch", type(network_of(pl_module)).__name__)),
        )
        data = [] if len(loader) == 0 else loader  # more ranks than batches: this rank has none
        self.sweep = prune_sweep(network_of(pl_module), data, **field_values(self, SweepSettings),
                                 reference_metrics=getattr(pl_module, "last_metrics", {}).get("val"), **shared)
        self.guided = None
        if self.guided_orders:
            self.guided = compare_orders(network_of(pl_module), data, **self.order_values(),
                                         criticality=self.criticality_csv,
                                         criticality_data=self._criticality_data(datamodule), **shared)
            if self.guided.criticality is not None:
                self.guided.info["criticality_split"] = self.criticality_split
        sweeps = [sweep for sweep in (self.sweep, self.guided) if sweep is not None]
        skipped = self.skipped_images(trainer)
        for sweep in sweeps:
            sweep.info.update(skipped_images=len(skipped), skipped_paths=skipped)
        return sweeps

    def _computes_ranking(self) -> bool:
        return "criticality" in self.guided_orders and self.criticality_csv is None

    def _criticality_data(self, datamodule: Any) -> Any:
        """The images of a ranking computed here: every rank needs all of them (a ranking shares units among
        ranks, not images)."""
        if not self._computes_ranking():
            return None
        if self.criticality_samples is None:
            return datamodule.analysis_dataloader()
        train = self.criticality_split == "train"
        dataset = datamodule.build_held_out_dataset() if train else datamodule.eval_dataset
        size = len(dataset)
        if self.criticality_samples > size:
            raise SettingError(f"criticality_samples: {self.criticality_samples} exceeds the {size} "
                               f"{'training' if train else 'validation'} images")
        picked = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))[: self.criticality_samples]
        return DataLoader(Subset(dataset, sorted(picked.tolist())), batch_size=datamodule.batch_size, shuffle=False,
                          num_workers=datamodule.num_workers)
