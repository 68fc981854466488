"""The pruning sweep (DWP §3.2 prune → evaluate → restore) and criticality-guided channel pruning.

The callback only schedules, synchronises ranks and reports; the masks and the evaluation live in
:mod:`critnet.prune`, the criticality ranking in :mod:`critnet.engine`, the reports in :mod:`critnet.reporting.pruning`.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import ClosedUnitInterval, Path_fr
from torch import nn
from torch.utils.data import DataLoader, Subset

from critnet import distributed
from critnet.prune import (
    CHANNEL_ORDERS,
    Channel,
    PruneError,
    PruneMasks,
    channel_count,
    channel_l1,
    channel_masks,
    channel_order,
    check_fraction,
    dwp_masks,
    evaluate,
    layer_norms,
    pruned,
    read_channel_ranking,
)
from critnet.reporting import pruning as report
from critnet.reporting.common import tensorboard_experiment
from critnet.reporting.progress import AnalysisProgress
from critnet.tally import SCORES, Tally

ENGINE_METHODS = ("naive", "exact")


def _state_checksum(model: nn.Module) -> int:
    crc = 0
    for name, value in model.state_dict().items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _fractions(key: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    checked = [check_fraction(f"{key} (value {i})", v) for i, v in enumerate(values)]
    if not checked:
        raise PruneError(f"{key} must list at least one value in [0, 1]")
    return checked


class PruneSweep(L.Callback):
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

    def __init__(
        self,
        method: Literal["connections", "neurons", "weights"] = "connections",
        scope: Literal["global", "layerwise"] = "global",
        p_prune: Sequence[ClosedUnitInterval] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
        p_bern: Sequence[ClosedUnitInterval] = (1.0,),
        repeats: int = 1,
        seed: int = 0,
        include_linear: bool = False,
        guided_orders: Sequence[Literal["criticality", "l1", "random"]] = (),
        guided_ratios: Sequence[ClosedUnitInterval] = (0.0, 0.05, 0.1, 0.2, 0.3),
        criticality_csv: Path_fr | None = None,
        criticality_score: Literal["delta_loss", "loss", "top1_drop", "top5_drop"] = "delta_loss",
        criticality_method: Literal["exact", "naive"] = "exact",
        criticality_samples: int | None = None,
        criticality_split: Literal["val", "train"] = "val",
        memory_budget_mb: float | None = 4096.0,
        resume: bool = False,
        resume_dir: str | None = None,
        print_tables: bool = True,
    ) -> None:
        if method not in ("connections", "neurons", "weights"):
            raise PruneError(f"method must be connections, neurons or weights, got {method!r}")
        if scope not in ("global", "layerwise"):
            raise PruneError(f"scope must be global or layerwise, got {scope!r}")
        self.method = method
        self.scope = scope
        self.p_prune = _fractions("p_prune", p_prune)
        self.p_bern = _fractions("p_bern", p_bern)
        if int(repeats) < 1:
            raise PruneError(f"repeats must be at least 1, got {repeats}")
        self.repeats = int(repeats)
        self.seed = int(seed)
        self.include_linear = include_linear
        for order in guided_orders:
            if order not in CHANNEL_ORDERS:
                raise PruneError(f"guided_orders: unknown order {order!r}; choose from {', '.join(CHANNEL_ORDERS)}")
        self.guided_orders = list(dict.fromkeys(guided_orders))
        self.guided_ratios = _fractions("guided_ratios", guided_ratios)
        if criticality_csv is not None and not Path(str(criticality_csv)).is_file():
            raise PruneError(f"criticality_csv {str(criticality_csv)!r} does not exist")
        self.criticality_csv = None if criticality_csv is None else str(criticality_csv)
        if criticality_score not in SCORES:
            raise PruneError(f"criticality_score must be one of {', '.join(SCORES)}, got {criticality_score!r}")
        self.criticality_score = criticality_score
        if criticality_method not in ENGINE_METHODS:
            raise PruneError(
                f"criticality_method must be one of {', '.join(ENGINE_METHODS)}, got {criticality_method!r}")
        self.criticality_method = criticality_method
        if criticality_samples is not None and criticality_samples < 1:
            raise PruneError(f"criticality_samples must be positive, got {criticality_samples}")
        self.criticality_samples = criticality_samples
        if criticality_split not in ("val", "train"):
            raise PruneError(f"criticality_split must be val or train, got {criticality_split!r}")
        self.criticality_split = criticality_split
        self.resume = resume
        self.resume_dir = resume_dir
        self.memory_budget_mb = memory_budget_mb
        self.print_tables = print_tables
        #: The rows of the last sweep / guided comparison (every rank holds them), for programmatic use.
        self.sweep_rows: list[dict[str, Any]] = []
        self.guided_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ scheduling

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Checked here rather than in __init__: the CLI turns errors raised while it builds callbacks into a generic
        # type-union message, while errors raised at setup reach the user as one line, before the validation loop.
        computes_ranking = "criticality" in self.guided_orders and self.criticality_csv is None
        if computes_ranking and self.criticality_split == "train" and self.criticality_samples is None:
            raise PruneError("criticality_split train needs criticality_samples (how many training images to rank on)")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # broadcasts under DDP: every rank asks
        self._run(trainer, pl_module, log_dir)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: Path) -> None:
        from critnet.engine import EvaluationSet

        model: nn.Module = getattr(pl_module, "model", pl_module)
        network = str(getattr(pl_module, "arch", type(model).__name__))
        rank, world = distributed.rank(), distributed.world_size()
        lead = rank == 0
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "analysis_dataloader"):
            raise PruneError("PruneSweep needs a critnet datamodule (with analysis_dataloader) to evaluate on")
        started = time.perf_counter()
        checksum = _state_checksum(model)
        # Images are shared among ranks (each reads and decodes only its batches); the tallies are gathered.
        loader = datamodule.analysis_dataloader(rank, world)
        data: Any = [] if len(loader) == 0 else EvaluationSet.from_batches(  # more ranks than batches: none here
            loader, device=pl_module.device, memory_budget_mb=self.memory_budget_mb)
        cache: dict[int, Tally] = {}
        # the precision of validate (e.g. bf16-mixed autocast), so the unpruned baseline is the validated model
        precision_context = getattr(trainer.precision_plugin, "val_step_context", None)
        store = None
        if self.resume:
            store, cache = self._open_store(trainer, checksum, data, lead)

        def run_masks(masks: PruneMasks) -> Tally:
            fingerprint = masks.fingerprint()
            # Every rank must prune the same weights; the seeded draws make it so, this proves it.
            if len(set(distributed.all_gather_objects(fingerprint))) != 1:
                raise RuntimeError("PruneSweep: the pruning masks differ between ranks (weights differ?)")
            if fingerprint not in cache:
                with pruned(model, masks):
                    cache[fingerprint] = evaluate(model, data, rank=rank, world_size=world,
                                                  all_gather=distributed.all_gather_objects,
                                                  forward_context=precision_context, sharded=True)
                if store is not None:
                    tally = cache[fingerprint]
                    store.append({"phase": "prune", "index": fingerprint, "loss_sum": tally.loss_sum,
                                  "top1_correct": tally.top1_correct, "top5_correct": tally.top5_correct,
                                  "samples": tally.samples})
            return cache[fingerprint]

        norms = layer_norms(model, self.method, self.include_linear)
        sweep_plan = self._sweep_plan()
        guided_plan = self._guided_plan() if self.guided_orders else []
        lightning_bar = getattr(trainer.progress_bar_callback, "progress", None)
        with AnalysisProgress("prune", lead and self.print_tables, total=len(sweep_plan) + len(guided_plan),
                              step_name="settings", running=lightning_bar) as progress:
            baseline = run_masks(dwp_masks(model, self.method, self.scope, 0.0, 0.0, self.seed, self.include_linear,
                                           norms))
            self.sweep_rows = []
            for p_prune, p_bern, repeat, seed in sweep_plan:
                masks = dwp_masks(model, self.method, self.scope, p_prune, p_bern, seed, self.include_linear, norms)
                tally = baseline if (p_prune, p_bern) == (0.0, 0.0) else run_masks(masks)
                self.sweep_rows.append(self._sweep_row(network, p_prune, p_bern, repeat, seed, masks, tally))
                progress.advance(f"{self.method} p_prune={p_prune:g} p_bern={p_bern:g} #{repeat}")
            sweep_seconds = time.perf_counter() - started

            self.guided_rows = []
            criticality_info: dict[str, Any] = {}
            if guided_plan:
                guided_started = time.perf_counter()
                scores = None
                if "criticality" in self.guided_orders:
                    scores, criticality_info = self._criticality(trainer, pl_module, model, log_dir, lead)
                orders: dict[tuple[str, int], list[Channel]] = {}
                total = len(channel_l1(model, self.include_linear))
                for order, ratio, repeat, seed in guided_plan:
                    if (order, seed) not in orders:
                        orders[(order, seed)] = channel_order(model, order, include_linear=self.include_linear,
                                                              criticality=scores, seed=seed)
                    count = channel_count(ratio, total)
                    masks = channel_masks(model, orders[(order, seed)][:count], self.include_linear)
                    tally = run_masks(masks)
                    self.guided_rows.append({
                        "network": network, "order": order, "channel_ratio": ratio, "repeat": repeat,
                        "seed": seed if order == "random" else None, "channels_pruned": count, "channels": total,
                        "ratio": masks.ratio, "param_fraction": masks.param_fraction, **_metrics(tally),
                    })
                    progress.advance(f"{order} channels={ratio:g} #{repeat}")
                criticality_info["guided_seconds"] = time.perf_counter() - guided_started

        if store is not None:
            store.close()
        if _state_checksum(model) != checksum:  # the restore is tested; this guards every real run too
            raise RuntimeError("PruneSweep: the model's weights changed during the sweep")
        if lead:
            self._report(trainer, log_dir, network, baseline, baseline.samples, sweep_seconds, criticality_info,
                         pl_module)

    def _open_store(self, trainer: L.Trainer, checksum: int, data: Any, lead: bool) -> tuple[Any, dict[int, Tally]]:
        """The partial-results file of this sweep (rank 0 writes it) and the tallies already in it (every rank).

        Records are keyed by the mask fingerprint; the file by the weights, every rank's share of the data and
        the precision, so a changed model, data subset, device count or precision starts afresh.
        """
        from critnet.engine.resume import ResultStore, ResumeError

        shares = distributed.all_gather_objects(getattr(data, "checksum", ""))
        precision = str(getattr(trainer.precision_plugin, "precision", ""))
        key = hashlib.sha256(json.dumps(["prune-sweep/1", checksum, shares, precision]).encode()).hexdigest()[:24]
        directory = self.resume_dir or str(Path(trainer.default_root_dir) / "prune_partial")
        store = None
        loaded: dict[int, Tally] = {}
        problem = None
        if lead:
            try:
                store = ResultStore(directory, key, 0)
                loaded = {index: Tally(r["loss_sum"], r["top1_correct"], r["top5_correct"], r["samples"])
                          for (_, index), r in store.load().items()}
            except ResumeError as err:  # an uncreatable directory or a damaged line, named in the message
                problem = str(err)
            except (KeyError, TypeError) as err:
                problem = f"resume_dir {directory!r}: a record without {err} (not written by this sweep?)"
        # rank 0's view decides for everyone: every rank must skip the same settings (evaluate is a collective), and
        # every rank must raise together, or the others would wait for rank 0 forever
        problem, loaded = distributed.all_gather_objects((problem, loaded))[0]
        if problem is not None:
            raise PruneError(problem)
        return store, loaded

    def _sweep_plan(self) -> list[tuple[float, float, int, int]]:
        plan = [(0.0, 0.0, 0, self.seed)]  # the unpruned baseline first, as in the original table
        for p_prune in self.p_prune:
            for p_bern in self.p_bern:
                if (p_prune, p_bern) == (0.0, 0.0):
                    continue
                random = 0.0 < p_bern < 1.0 and p_prune > 0.0
                for repeat in range(self.repeats if random else 1):
                    plan.append((p_prune, p_bern, repeat, self.seed + repeat))
        return plan

    def _guided_plan(self) -> list[tuple[str, float, int, int]]:
        plan = []
        for ratio in self.guided_ratios:
            for order in self.guided_orders:
                for repeat in range(self.repeats if order == "random" else 1):
                    plan.append((order, ratio, repeat, self.seed + repeat))
        return plan

    def _sweep_row(self, network: str, p_prune: float, p_bern: float, repeat: int, seed: int, masks: PruneMasks,
                   tally: Tally) -> dict[str, Any]:
        return {
            "network": network, "method": self.method, "scope": self.scope, "p_prune": p_prune, "p_bern": p_bern,
            "repeat": repeat, "seed": seed, "nominal_ratio": p_prune * p_bern, "ratio": masks.ratio,
            "param_fraction": masks.param_fraction, "pruned_weights": masks.pruned,
            "selected_weights": masks.selected, "units_pruned": masks.units_pruned, "units": masks.units,
            "threshold": masks.threshold, **_metrics(tally),
        }

    # ------------------------------------------------------------------ criticality ranking

    def _criticality(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module, log_dir: Path,
                     lead: bool) -> tuple[dict[Channel, float], dict[str, Any]]:
        if self.criticality_csv is not None:
            return read_channel_ranking(self.criticality_csv), {"criticality_source": str(self.criticality_csv)}
        from critnet.engine import EvaluationSet, evaluate_baseline, evaluate_units
        from critnet.perturb import Perturbation, Unit
        from critnet.tally import score_of

        started = time.perf_counter()
        datamodule = trainer.datamodule
        if self.criticality_samples is None:
            # a ranking shares units among ranks, so every rank needs every image
            ranking_data = EvaluationSet.from_batches(datamodule.analysis_dataloader(), device=pl_module.device,
                                                      memory_budget_mb=self.memory_budget_mb)
        else:
            if self.criticality_split == "train":
                dataset = datamodule.build_held_out_dataset()
            else:
                dataset = datamodule.eval_dataset
            size = len(dataset)
            if self.criticality_samples > size:
                raise PruneError(f"criticality_samples={self.criticality_samples} exceeds the {size} "
                                 f"{'training' if self.criticality_split == 'train' else 'validation'} images")
            generator = torch.Generator().manual_seed(self.seed)
            picked = torch.randperm(size, generator=generator)[: self.criticality_samples]
            subset = Subset(dataset, sorted(picked.tolist()))
            loader = DataLoader(subset, batch_size=datamodule.batch_size, shuffle=False,
                                num_workers=datamodule.num_workers)
            ranking_data = EvaluationSet.from_batches(loader, device=pl_module.device,
                                                      memory_budget_mb=self.memory_budget_mb)
        channels = list(channel_l1(model, self.include_linear))
        units = [Unit("channel", f"{layer}.weight", index) for layer, index in channels]
        baseline = evaluate_baseline(model, ranking_data)
        resume_dir = None
        if self.resume:  # the engine's own resume file, keyed by weights, units, data and method
            resume_dir = Path(self.resume_dir or Path(trainer.default_root_dir) / "prune_partial") / "criticality"
        outcomes = evaluate_units(model, units, Perturbation("zero"), ranking_data, method=self.criticality_method,
                                  rank=distributed.rank(), world_size=distributed.world_size(),
                                  all_gather=distributed.all_gather_objects, resume_dir=resume_dir)
        scores = {channel: score_of(o.total, baseline.total, self.criticality_score)
                  for channel, o in zip(channels, outcomes)}
        path = log_dir / "prune_criticality.csv"
        if lead:
            rows = [{"unit": u.label, "layer": c[0], "index": c[1], "score": scores[c], **_metrics(o.total)}
                    for u, c, o in zip(units, channels, outcomes)]
            report.write_rows_csv(path, rows, ("unit", "layer", "index", "score", "loss", "top1", "top5", "samples"))
        return scores, {
            "criticality_source": str(path), "criticality_score": self.criticality_score,
            "criticality_perturbation": "zero", "criticality_method": self.criticality_method,
            "criticality_samples": ranking_data.samples, "criticality_split": self.criticality_split,
            "criticality_seconds": time.perf_counter() - started,
        }

    # ------------------------------------------------------------------ reports (rank 0)

    def _report(self, trainer: L.Trainer, log_dir: Path, network: str, baseline: Tally, samples: int,
                sweep_seconds: float, criticality_info: dict[str, Any], pl_module: L.LightningModule) -> None:
        writer = tensorboard_experiment(trainer)
        summary = report.summarize(self.sweep_rows, ("method", "scope", "p_prune", "p_bern"))
        title = f"{network} · prune {self.method} ({self.scope}) · {samples} images"
        report.write_rows_csv(log_dir / "prune_sweep.csv", self.sweep_rows, report.SWEEP_COLUMNS)
        markdown = report.markdown_table(report.SWEEP_TABLE_COLUMNS, report.sweep_table_rows(summary))
        (log_dir / "prune_sweep.md").write_text(f"{title}\n\n{markdown}")
        validated = getattr(pl_module, "last_metrics", {}).get("val")
        report.write_json_report(log_dir / "prune_sweep.json", {
            "network": network, "method": self.method, "scope": self.scope, "p_prune": self.p_prune,
            "p_bern": self.p_bern, "repeats": self.repeats, "seed": self.seed, "include_linear": self.include_linear,
            "samples": samples, "devices": distributed.world_size(), "baseline": _metrics(baseline),
            "validate_metrics": validated, "settings": summary, "seconds": sweep_seconds,
            # checked by a CRC over the whole state dict before writing anything; a mismatch raises instead
            "weights_restored_bit_identical": True,
        })
        figure = report.curves_figure(summary, "p_bern", "ratio", "measured pruning ratio (% of selected weights)",
                                      title)
        report.save_figure(figure, log_dir / "prune_sweep.png")
        if self.print_tables:
            report.print_sweep_table(title, summary)
        if writer is not None:
            report.log_tensorboard(writer, f"prune_{self.method}", summary, "ratio", "p_bern", figure, markdown,
                                   ("method", "scope", "p_prune", "p_bern", "nominal_ratio"))
        if not self.guided_rows:
            return
        guided = report.summarize(self.guided_rows, ("order", "channel_ratio"))
        guided = sorted(guided, key=lambda e: (e["channel_ratio"], self.guided_orders.index(e["order"])))
        title = f"{network} · channels pruned by criticality / L1 / random order · {samples} images"
        report.write_rows_csv(log_dir / "prune_guided.csv", self.guided_rows, report.GUIDED_COLUMNS)
        markdown = report.markdown_table(report.GUIDED_TABLE_COLUMNS, report.guided_table_rows(guided))
        (log_dir / "prune_guided.md").write_text(f"{title}\n\n{markdown}")
        report.write_json_report(log_dir / "prune_guided.json", {
            "network": network, "orders": self.guided_orders, "channel_ratios": self.guided_ratios,
            "repeats": self.repeats, "seed": self.seed, "include_linear": self.include_linear, "samples": samples,
            **criticality_info, "settings": guided,
        })
        figure = report.curves_figure(guided, "order", "channel_ratio", "output channels pruned (%)", title)
        report.save_figure(figure, log_dir / "prune_guided.png")
        if self.print_tables:
            report.print_guided_table(title, guided)
        if writer is not None:
            report.log_tensorboard(writer, "prune_guided", guided, "channel_ratio", "order", figure, markdown,
                                   ("order", "channel_ratio"))


def _metrics(tally: Tally) -> dict[str, Any]:
    return {"loss": tally.loss, "top1": tally.top1, "top5": tally.top5, "samples": tally.samples}
