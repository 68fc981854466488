"""The critical-unit ranking as a Lightning callback: schedule, synchronise across ranks, report.

The math lives in :mod:`critnet.perturb`, :mod:`critnet.engine` and :mod:`critnet.ranking`; this callback only
reads the evaluation set, calls them on every rank and has rank 0 write the reports.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from critnet import distributed
from critnet.engine import METHODS, EvaluationSet, evaluate_baseline, evaluate_units
from critnet.engine.resume import ResumeError
from critnet.engine.taylor import TAYLOR_ORDERS
from critnet.errors import CritnetError
from critnet.perturb import PERTURBATION_KINDS, UNIT_KINDS, Perturbation, Unit, select_units
from critnet.ranking import (
    estimate_agreement,
    order_outcomes,
    ranking_rows,
    split_half_agreement,
    tally_summary,
)
from critnet.reporting.common import console, tensorboard_experiment
from critnet.reporting.progress import AnalysisProgress
from critnet.reporting.ranking import log_tensorboard, print_top_k, write_ranking_csv, write_ranking_json
from critnet.tally import SCORES

from critnet.choices import UnitKind
PerturbationKind = Literal["add", "scale", "noise", "zero", "sign_flip", "bitflip", "prune"]
Score = Literal["loss", "delta_loss", "top1_drop", "top5_drop"]
Method = Literal["exact", "naive", "taylor", "hybrid", "halving"]
Stage = Literal["fit", "validate"]


class RankingError(CritnetError):
    """A bad setting of the ranking callback (the CLI prints it as one line naming the key)."""


class CriticalRanking(L.Callback):
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
        levels: The perturbation's amounts; one ranking per level (e.g. ``prune`` at ``[0.1, 0.3, 0.5, 0.7, 0.9]``
            is Distiller's sensitivity sweep). Ignored by ``zero`` and ``sign_flip``.
        relative: ``noise`` only: the standard deviation is ``level`` times the unit's own standard deviation.
        seed: ``noise`` only: draws depend only on (seed, unit), so they are the same on any number of devices.
        num_batches: Evaluate on the first ``num_batches`` batches of the validation set in dataset order
            (the data's ``batch_size``); ``null`` = the whole validation set.
        score: What ranks the units (larger = more critical): the perturbed ``loss`` (the original), ``delta_loss``
            against the unperturbed baseline, ``top1_drop`` or ``top5_drop`` (percentage points).
        method: The engine: ``exact`` (suffix-only exact evaluation, the default), ``naive`` (full forward per unit;
            the reference), ``taylor`` (Taylor estimates only), ``hybrid`` (estimates, then the top units
            exactly) or ``halving`` (successive halving with confidence bounds: exact full-set scores for the
            top ``top_k``, chosen by a statistical test on growing parts of the data).
        top_k: Units shown in the console table and TensorBoard, and the exact top of hybrid/halving.
        taylor_order: The estimates of ``taylor``/``hybrid``: ``1`` (first order) or ``2`` (plus the
            empirical-Fisher second-order term; on ResNet20 it lifts the Spearman agreement with exact Δloss for
            ``add 0.1`` on whole tensors from 0.00 to 0.57 but lowers it for zeroed channels from 0.80 to 0.48).
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
        taylor_order: Literal[1, 2] = 1,
        run_on: list[Stage] = ["validate"],  # noqa: B006 - read only
        resume: bool = False,
        resume_dir: str | None = None,
        memory_budget_mb: float | None = None,
        filename: str = "ranking",
        progress: bool = True,
        print_table: bool = True,
    ) -> None:
        super().__init__()
        self.unit = unit
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.module_types = list(module_types) if module_types is not None else None
        self.perturbation = perturbation
        self.levels = list(levels)
        self.relative = relative
        self.seed = seed
        self.score = score
        self.method = method
        self.top_k = top_k
        self.taylor_order = taylor_order
        self.num_batches = num_batches
        self.run_on = list(run_on)
        self.resume = resume
        self.resume_dir = resume_dir
        self.memory_budget_mb = memory_budget_mb
        self.filename = filename
        self.progress = progress
        self.print_table = print_table
        self.perturbations: list[Perturbation] = []
        self.units: list[Unit] | None = None
        #: The last analysis as written to ranking.json (every rank holds it), plus the rows under "rows".
        self.result: dict[str, Any] | None = None

    def check_settings(self) -> list[Perturbation]:
        """Validate the settings and build the perturbations (one per distinct level).

        Called at ``setup`` rather than in ``__init__``: the CLI wraps errors raised while it instantiates
        callbacks into a generic type-union message, while errors raised at setup reach the user as one line.

        Raises:
            RankingError: naming the setting at fault.
        """
        choices = {"unit": (self.unit, UNIT_KINDS), "perturbation": (self.perturbation, PERTURBATION_KINDS),
                   "score": (self.score, SCORES), "method": (self.method, METHODS),
                   "taylor_order": (self.taylor_order, TAYLOR_ORDERS)}  # fmt: skip
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise RankingError(f"CriticalRanking: {key} {value!r} is not one of {', '.join(map(str, allowed))}")
        if self.num_batches is not None and self.num_batches < 1:
            raise RankingError(f"CriticalRanking: num_batches must be at least 1 or null, got {self.num_batches}")
        if self.top_k < 1:
            raise RankingError(f"CriticalRanking: top_k must be at least 1, got {self.top_k}")
        if not self.levels and self.perturbation not in ("zero", "sign_flip"):
            raise RankingError(f"CriticalRanking: levels is empty; {self.perturbation} needs at least one level")
        for stage in self.run_on:
            if stage not in ("fit", "validate"):
                raise RankingError(f"CriticalRanking: run_on entry {stage!r} is not 'fit' or 'validate'")
        try:
            perturbations = [
                Perturbation(self.perturbation, float(level), self.relative, self.seed)
                for level in (self.levels or [0.0])
            ]
            for p in perturbations:
                p.check_unit_kind(self.unit)
        except ValueError as err:
            raise RankingError(f"CriticalRanking: {err}") from None
        # zero and sign_flip ignore the level: one ranking, not one per level
        unique: dict[str, Perturbation] = {}
        for p in perturbations:
            unique.setdefault(p.label, p)
        self.perturbations = list(unique.values())
        return self.perturbations

    # ----------------------------------------------------------------- scheduling

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Check and select now so that bad settings fail before the validation loop runs, not after it.
        self.check_settings()
        try:
            self.units = self._select(self._network(pl_module))
        except ValueError as err:
            if self.unit != "activation" or "example_input" not in str(err):
                raise
            self.units = None  # modules without a declared channel count: read it from the first batch in run()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "validate" in self.run_on and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module, "validate")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "fit" in self.run_on:
            self.run(trainer, pl_module, "fit")

    # ----------------------------------------------------------------- the analysis

    @staticmethod
    def _network(pl_module: L.LightningModule) -> torch.nn.Module:
        network = getattr(pl_module, "model", None)
        return network if isinstance(network, torch.nn.Module) else pl_module

    def _select(self, network: torch.nn.Module, example_input: torch.Tensor | None = None) -> list[Unit]:
        try:
            return select_units(network, self.unit, self.include, self.exclude, self.module_types, example_input)
        except ValueError as err:
            raise RankingError(f"CriticalRanking: {err}") from None

    def _evaluation_set(self, trainer: L.Trainer, device: torch.device) -> tuple[EvaluationSet, int]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "analysis_dataloader"):
            raise RankingError(
                "CriticalRanking needs a data module with analysis_dataloader() (critnet.data.*DataModule) "
                "to read the validation set in dataset order"
            )
        loader = datamodule.analysis_dataloader()
        if self.num_batches is None:
            batches: Any = loader
            count = len(loader)
        else:
            batches = list(itertools.islice(loader, self.num_batches))
            count = len(batches)
            if count < self.num_batches and distributed.is_rank_zero():
                console.print(
                    f"[yellow]CriticalRanking: num_batches={self.num_batches} but the validation set has only "
                    f"{count} batches; using all of them[/yellow]"
                )
        return EvaluationSet.from_batches(batches, device=device, memory_budget_mb=self.memory_budget_mb), count

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, Any]:
        """Run the analysis on every rank (each reaches every collective); rank 0 writes and prints."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self.check_settings()
        rank, world_size = distributed.rank(), distributed.world_size()
        network = self._network(pl_module)
        started = time.perf_counter()
        # Lightning evaluates under inference_mode; the engine needs ordinary tensors (and gradients for taylor).
        with torch.inference_mode(False):
            data, batches = self._evaluation_set(trainer, pl_module.device)
            units = self.units
            if units is None:
                units = self._select(network, next(iter(data))[0][:1])
            read_s = time.perf_counter() - started
            baseline = evaluate_baseline(network, data)
            resume_dir = None
            if self.resume:
                resume_dir = self.resume_dir or str(Path(trainer.default_root_dir) / "ranking_partial")
            rankings = []
            for perturbation in self.perturbations:
                level_started = time.perf_counter()
                description = f"ranking · {perturbation.label} · {self.method}"
                running = getattr(trainer.progress_bar_callback, "progress", None)
                # halving counts one step per unit and stage
                steps = "unit·stages" if self.method == "halving" else "units"
                with AnalysisProgress(description, self.progress and rank == 0, step_name=steps,
                                      running=running) as bar, _resume_errors():
                    outcomes = evaluate_units(
                        network,
                        units,
                        perturbation,
                        data,
                        method=self.method,
                        score=self.score,
                        top_k=self.top_k,
                        rank=rank,
                        world_size=world_size,
                        all_gather=distributed.all_gather_objects if world_size > 1 else None,
                        resume_dir=resume_dir,
                        progress=bar.update,
                        memory_budget_mb=self.memory_budget_mb,
                        taylor_order=self.taylor_order,
                    )
                ranked = order_outcomes(outcomes, baseline, self.score)
                rankings.append(
                    {
                        "perturbation": perturbation,
                        "rows": ranking_rows(ranked, baseline, perturbation),
                        "split_half": split_half_agreement(outcomes, baseline, self.score, self.top_k),
                        "engine_agreement": (
                            estimate_agreement(outcomes, baseline, self.score, self.top_k)
                            if self.method in ("taylor", "hybrid", "halving")
                            else None
                        ),
                        "elapsed_s": time.perf_counter() - level_started,
                    }
                )
        elapsed = time.perf_counter() - started
        result = self._summary(pl_module, stage, units, data, batches, baseline, rankings, elapsed, read_s, world_size)
        if rank == 0:
            self._report(trainer, log_dir, result, rankings, units)
        result["rows"] = [row for ranking in rankings for row in ranking["rows"]]
        self.result = result
        return result

    def _settings(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "include": self.include,
            "exclude": self.exclude,
            "module_types": self.module_types,
            "perturbation": self.perturbation,
            "levels": [p.level for p in self.perturbations],
            "relative": self.relative,
            "seed": self.seed,
            "num_batches": self.num_batches,
            "score": self.score,
            "method": self.method,
            "top_k": self.top_k,
            "taylor_order": self.taylor_order,
            "resume": self.resume,
        }

    def _summary(self, pl_module, stage, units, data, batches, baseline, rankings, elapsed, read_s, world_size):
        weights = getattr(pl_module, "weights_info", None)
        levels = []
        for ranking in rankings:
            p = ranking["perturbation"]
            rows = ranking["rows"]
            levels.append(
                {
                    "perturbation": p.label,
                    "kind": p.kind,
                    "level": p.level,
                    "split_half": ranking["split_half"],
                    "engine_agreement": ranking["engine_agreement"],
                    "broken_units": sum(1 for row in rows if not math.isfinite(row["loss"])),
                    "exact_units": sum(1 for row in rows if row["exact"]),
                    "elapsed_s": round(ranking["elapsed_s"], 3),
                    "top": [{k: row[k] for k in ("rank", "unit", "score", "loss", "delta_loss", "top1", "top5")}
                            for row in rows[: self.top_k]],
                }
            )
        return {
            "stage": stage,
            "model": getattr(pl_module, "arch", type(pl_module).__name__),
            "checkpoint_sha256": weights.sha256 if weights else None,
            "settings": self._settings(),
            "units": len(units),
            "batches": batches,
            "samples": data.samples,
            "devices": world_size,
            "baseline": {
                **tally_summary(baseline.total),
                "halves": [tally_summary(half) for half in baseline.halves],
            },
            "split_half_spearman": levels[0]["split_half"]["spearman"],
            "levels": levels,
            "read_s": round(read_s, 3),
            "elapsed_s": round(elapsed, 3),
        }

    # ----------------------------------------------------------------- reports (rank 0)

    def _report(self, trainer, log_dir, result, rankings, units) -> None:
        directory = Path(log_dir) if log_dir else Path(trainer.default_root_dir)
        all_rows = [row for ranking in rankings for row in ranking["rows"]]
        csv_path = write_ranking_csv(directory / f"{self.filename}.csv", all_rows)
        json_path = write_ranking_json(directory / f"{self.filename}.json", result)
        layer_order = list(dict.fromkeys(unit.layer for unit in units))
        writer = tensorboard_experiment(trainer)
        for ranking, level in zip(rankings, result["levels"]):
            context = (
                f"{result['model']} · {len(units)} {self.unit} units · {level['perturbation']} · "
                f"{result['samples']} images · score={self.score} · "
                f"split-half Spearman {level['split_half']['spearman']:.3f}"
            )
            title = f"top {min(self.top_k, len(ranking['rows']))} · {context}"
            if self.print_table:
                print_top_k(ranking["rows"], self.top_k, title)
            agreement = level["engine_agreement"]
            if self.method == "hybrid" and agreement is not None:
                console.print(hybrid_note(agreement))
            if writer is not None:
                prefix = self.filename if len(rankings) == 1 else f"{self.filename}/{level['perturbation']}"
                log_tensorboard(
                    writer,
                    ranking["rows"],
                    baseline=result["baseline"],
                    agreement=level["split_half"],
                    score=self.score,
                    top_k=self.top_k,
                    prefix=prefix,
                    step=trainer.global_step,
                    title=context,
                    layer_order=layer_order,
                )
        console.print(
            f"ranking: {len(units)} units × {len(rankings)} level(s) on {result['samples']} images in "
            f"{result['elapsed_s']:.1f} s on {result['devices']} device(s) → {csv_path}, {json_path}"
        )


# Hybrid's exact top k is in doubt when its members come from the second half of the units it checked in estimate
# order: the estimates then order poorly, and the unchecked units beyond may hold more top units (on ResNet20
# channels, zeroed, 256 images: the deepest was 67th of 100 checked, and 11 true top-20 units were never checked).
HYBRID_DEPTH_WARNING = 0.5


def hybrid_note(agreement: dict[str, Any]) -> str:
    """One console line on how far hybrid's exact top k can be trusted, with a warning when its top units were
    found deep in the estimate order."""
    checked, deepest = agreement["units"], agreement["deepest_top_k"]
    line = (f"hybrid: {checked} units checked exactly in estimate order; the deepest of the exact top k was "
            f"{deepest}th by estimate; estimated vs exact Δloss on the checked units: Spearman "
            f"{agreement['spearman']:.3f}, Kendall {agreement['kendall']:.3f}")
    if deepest > HYBRID_DEPTH_WARNING * checked:
        line += ("\n[yellow]warning: top units came from the second half of the checked list, so unchecked units "
                 "may belong in the top k; method: halving or exact give a dependable top k[/]")
    return line


@contextlib.contextmanager
def _resume_errors():
    """A partial-results file that cannot be used is the user's to fix: one line naming it, not a traceback."""
    try:
        yield
    except ResumeError as err:
        raise RankingError(f"CriticalRanking: {err}") from None
