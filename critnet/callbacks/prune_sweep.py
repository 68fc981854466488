"""``PruneSweep``: :func:`critnet.prune_sweep` and :func:`critnet.compare_orders` as a Lightning callback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from critnet.analyses.pruning import (
    check_order_settings,
    check_sweep_settings,
    compare_orders,
    prune_sweep,
)
from critnet.callbacks.base import AnalysisCallback, network_of
from critnet.choices import (
    CRITICALITY_SPLITS,
    ChannelOrder,
    CriticalityMethod,
    CriticalitySplit,
    PruneMethod,
    PruneScope,
    Score,
    SettingError,
    check_choice,
    check_fractions,
    check_positive_int,
)
from critnet.results.sweep_result import Sweep


class PruneSweep(AnalysisCallback):
    """Prune the validated model over a p_prune × p_bern grid, evaluate each setting on the whole validation set,
    restore the exact weights; optionally compare channel pruning orders (criticality vs L1 vs random).

    Runs once at the end of ``analyze.py validate`` (not during ``fit``). Writes to ``trainer.log_dir``:
    ``prune_sweep.csv`` (one row per setting and Bernoulli draw; the unpruned baseline first), ``prune_sweep.json``
    (settings, per-setting mean ± std over the draws, the baseline, timings), ``prune_sweep.md`` and
    ``prune_sweep.png``; with ``guided_orders`` also ``prune_guided.{csv,json,md,png}`` and, when the ranking is
    computed here, ``prune_criticality.csv``. TensorBoard gets the curves as scalars (the step is the measured ratio
    in basis points), the figures, the tables and one hparams entry per setting.

    Args:
        method: ``connections`` (L1 norm of every (out, in) kernel), ``neurons`` (L1 norm of every output filter) or
            ``weights`` (every weight's magnitude).
        scope: ``global`` (one threshold over all selected layers, as the original) or ``layerwise``.
        p_prune: Fractions of the ascending unit norms below which units are pruning candidates, each in [0, 1].
        p_bern: Probabilities that a candidate is pruned (independent Bernoulli draws), each in [0, 1].
        repeats: Bernoulli draws per setting with 0 < p_bern < 1 (seeds ``seed``, ``seed + 1``, …); settings
            without randomness are evaluated once.
        seed: Base seed of the mask draws and of the random channel order; the same on every rank.
        include_linear: Prune Linear layers as well as Conv2d (the original prunes Conv2d only).
        guided_orders: Channel pruning orders to compare at ``guided_ratios``: ``criticality`` (least critical
            first), ``l1`` (smallest filter L1 norm first), ``random``. Empty = no comparison.
        guided_ratios: Fractions of the output channels of the selected layers to prune, each in [0, 1].
        criticality_csv: A channel ranking (``ranking.csv`` of the ranking callback with channel units: columns
            ``layer``, ``index``, ``score``, larger = more critical). ``None`` = compute one here with the engine by
            zeroing every output channel.
        criticality_score: Score of the computed ranking: ``delta_loss``, ``loss``, ``top1_drop`` or ``top5_drop``.
        criticality_method: Engine method of the computed ranking: ``exact`` (suffix-only) or ``naive``.
        criticality_samples: Rank on a seeded random subset of this many images of ``criticality_split``
            (``None`` = all of them; required for ``train``); the pruned networks are always evaluated on the whole
            validation set.
        criticality_split: Which images the computed ranking uses: ``val`` (the evaluated images themselves) or
            ``train`` (the training split with the evaluation transforms: held out from the evaluation, so the
            comparison is not judged on the images the order was chosen on).
        memory_budget_mb: Keep the decoded validation batches in memory (on the model's device) up to this size;
            beyond it they are read again for every setting. ``None`` = no limit.
        resume: Append every evaluated setting to a partial-results file and skip the settings found there when the
            same sweep (same weights, data, device count and precision) is run again after an interruption.
        resume_dir: Where the partial results live; default ``<trainer.default_root_dir>/prune_partial``.
        print_tables: Print the rich tables and progress bar (rank 0).
    """

    resume_subdir = "prune_partial"

    def __init__(
        self,
        method: PruneMethod = "connections",
        scope: PruneScope = "global",
        p_prune: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
        p_bern: Sequence[float] = (1.0,),
        repeats: int = 1,
        seed: int = 0,
        include_linear: bool = False,
        guided_orders: Sequence[ChannelOrder] = (),
        guided_ratios: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
        criticality_csv: str | None = None,
        criticality_score: Score = "delta_loss",
        criticality_method: CriticalityMethod = "exact",
        criticality_samples: int | None = None,
        criticality_split: CriticalitySplit = "val",
        memory_budget_mb: float | None = 4096.0,
        resume: bool = False,
        resume_dir: str | None = None,
        print_tables: bool = True,
    ) -> None:
        super().__init__(resume, resume_dir)
        self.method = method
        self.scope = scope
        self.p_prune = p_prune
        self.p_bern = p_bern
        self.repeats = repeats
        self.seed = seed
        self.include_linear = include_linear
        self.guided_orders = list(dict.fromkeys(guided_orders))
        self.guided_ratios = guided_ratios
        self.criticality_csv = None if criticality_csv is None else str(criticality_csv)
        self.criticality_score = criticality_score
        self.criticality_method = criticality_method
        self.criticality_samples = criticality_samples
        self.criticality_split = criticality_split
        self.memory_budget_mb = memory_budget_mb
        self.print_table = print_tables
        #: The last sweep and guided comparison (:class:`~critnet.results.Sweep`; every rank holds them).
        self.sweep = None
        self.guided = None

    def check_settings(self) -> None:
        """One-line :class:`~critnet.choices.SettingError` naming the key of any bad setting."""
        self.p_prune, self.p_bern = check_sweep_settings(self.method, self.scope, self.p_prune, self.p_bern,
                                                         self.repeats, self.seed)
        self.guided_ratios = check_fractions("guided_ratios", self.guided_ratios)  # even when unused
        if self.guided_orders:
            _, self.guided_ratios = check_order_settings(
                self.guided_orders, self.guided_ratios, self.criticality_score, self.criticality_method,
                self.repeats, self.seed, prefix="guided_")
        check_choice("criticality_split", self.criticality_split, CRITICALITY_SPLITS)
        check_positive_int("criticality_samples", self.criticality_samples, allow_none=True)
        if self.criticality_csv is not None and not Path(self.criticality_csv).is_file():
            raise SettingError(f"criticality_csv: {self.criticality_csv!r} does not exist")
        computes_ranking = "criticality" in self.guided_orders and self.criticality_csv is None
        if computes_ranking and self.criticality_split == "train" and self.criticality_samples is None:
            raise SettingError("criticality_split: train needs criticality_samples (how many training images "
                               "to rank on)")

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[Sweep]:
        """The sweep (and the guided comparison) on every rank, images shared among the ranks: each reads and
        decodes only its own batches, and the sums are gathered."""
        options = self.api_options(trainer, pl_module, self.print_table)
        datamodule = self.datamodule(trainer)
        loader = datamodule.analysis_dataloader(options["distributed"].rank, options["distributed"].world_size)
        shared = dict(
            include_linear=self.include_linear, seed=self.seed, repeats=self.repeats,
            memory_budget_mb=self.memory_budget_mb, sharded=True, **options,
            # the precision of validate (e.g. bf16-mixed autocast), so the unpruned baseline is the validated model
            forward_context=getattr(trainer.precision_plugin, "val_step_context", None),
            precision=str(getattr(trainer.precision_plugin, "precision", "")),
            name=str(getattr(pl_module, "arch", type(network_of(pl_module)).__name__)),
        )
        data = [] if len(loader) == 0 else loader  # more ranks than batches: this rank has none
        self.sweep = prune_sweep(network_of(pl_module), data, method=self.method, scope=self.scope,
                                 p_prune=self.p_prune, p_bern=self.p_bern,
                                 reference_metrics=getattr(pl_module, "last_metrics", {}).get("val"), **shared)
        self.guided = None
        if self.guided_orders:
            self.guided = compare_orders(
                network_of(pl_module), data, orders=self.guided_orders, ratios=self.guided_ratios,
                criticality=self.criticality_csv, criticality_data=self._criticality_data(datamodule),
                criticality_score=self.criticality_score, criticality_method=self.criticality_method, **shared)
            if self.guided.criticality is not None:
                self.guided.info["criticality_split"] = self.criticality_split
        sweeps = [sweep for sweep in (self.sweep, self.guided) if sweep is not None]
        skipped = self.skipped_images(trainer)
        for sweep in sweeps:
            sweep.info.update(skipped_images=len(skipped), skipped_paths=skipped)
        return sweeps

    def _criticality_data(self, datamodule: Any) -> Any:
        """The images of a ranking computed here: every rank needs all of them (a ranking shares units among
        ranks, not images)."""
        if "criticality" not in self.guided_orders or self.criticality_csv is not None:
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
