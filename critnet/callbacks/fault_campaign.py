"""The fault-injection campaign as a Lightning callback: data from the datamodule, the campaign on every rank,
reports from rank 0. The campaign itself is :func:`critnet.fault_campaign`."""

from __future__ import annotations

from typing import Literal

import lightning as L

from critnet.analyses.campaign import (
    StratifyBy,
    check_campaign_settings,
    fault_campaign,
)
from critnet.callbacks.base import AnalysisCallback, network_of
from critnet.choices import FaultModel, FaultTarget
from critnet.faults.draw import selected_layers
from critnet.results.campaign_result import Campaign


class FaultCampaign(AnalysisCallback):
    """At the end of ``validate``, inject bit faults one at a time into the model and write ``faults.csv``,
    ``campaign.json``, ``fault_rates.csv``, ``fault_vulnerability.csv`` and the heatmap / per-layer PNGs in the
    run's log_dir, plus TensorBoard figures and a console table.

    Args:
        target: ``weights`` (parameters) or ``activations`` (module outputs, through a forward hook).
        layers: Regular expressions searched in parameter names (weights; default ``\\.weight$``) or module names
            (activations; default every module of ``module_types``).
        module_types: Class names of the owning modules; null = any (with ``layers: [".*"]`` this reaches
            BatchNorm parameters and biases).
        bits: Bit positions 0..31 of the float32 values (0 = lowest mantissa bit, 23-30 exponent, 31 sign);
            null = all 32.
        fault_model: ``bitflip``, ``stuck_at_0``, ``stuck_at_1`` (one bit per fault) or ``ber`` (every selected bit
            flips independently with probability ``ber``: several flips per inference).
        ber: The bit-error rate of ``fault_model: ber``.
        faults: null = Leveugle's sample size per stratum for ``error_margin`` at ``confidence``; an integer = that
            many faults in all (shared among strata in proportion to their size); ``exhaustive`` = every fault.
        error_margin: Half-width the sizing aims at, for a rate of 0.5 (the worst case).
        confidence: Confidence of that margin.
        stratify: ``[layer]`` or ``[layer, bit]``: what is sampled and sized separately.
        seed: Seed of the draw (combined with each stratum's name).
        critical_threshold: A fault is critical when its SDC-1 rate over the images exceeds this fraction.
        fault_list: Replay this ``faults.csv`` instead of drawing.
        resume: Append finished faults to a partial-results file and skip them when the same campaign runs again
            (after Ctrl-C or SIGTERM, say).
        resume_dir: Where the partial results live; default ``<trainer.default_root_dir>/faults_partial``.
        memory_budget_mb: Memory (MB) for the held evaluation batches and the cached activations; null = no limit.
        progress: Show a progress bar (rank 0).
        print_table: Print the overall and per-layer rates (rank 0).
    """

    resume_subdir = "faults_partial"

    def __init__(
        self,
        target: FaultTarget = "weights",
        layers: list[str] | None = None,
        module_types: list[str] | None = ["Conv2d", "Linear"],  # noqa: B006 - read only; shown in --help
        bits: list[int] | None = None,
        fault_model: FaultModel = "bitflip",
        ber: float | None = None,
        faults: int | Literal["exhaustive"] | None = None,
        error_margin: float = 0.01,
        confidence: float = 0.99,
        stratify: list[StratifyBy] = ["layer"],  # noqa: B006 - read only
        seed: int = 0,
        critical_threshold: float = 0.0,
        fault_list: str | None = None,
        resume: bool = False,
        resume_dir: str | None = None,
        memory_budget_mb: float | None = None,
        progress: bool = True,
        print_table: bool = True,
    ) -> None:
        super().__init__(resume, resume_dir)
        self.settings = dict(target=target, layers=layers, module_types=module_types, bits=bits,
                             fault_model=fault_model, ber=ber, faults=faults, error_margin=error_margin,
                             confidence=confidence, stratify=stratify, seed=seed,
                             critical_threshold=critical_threshold, fault_list=fault_list,
                             memory_budget_mb=memory_budget_mb)
        self.progress, self.print_table = progress, print_table
        #: The last campaign (every rank holds it).
        self.campaign: Campaign | None = None

    def check_settings(self) -> None:
        s = self.settings
        check_campaign_settings(target=s["target"], fault_model=s["fault_model"], bits=s["bits"], faults=s["faults"],
                                error_margin=s["error_margin"], confidence=s["confidence"], stratify=s["stratify"],
                                ber=s["ber"], critical_threshold=s["critical_threshold"], seed=s["seed"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with self.named():
            self.check_settings()
            if self.settings["target"] == "weights":
                selected_layers(network_of(pl_module), "weights", self.settings["layers"],
                                self.settings["module_types"], None)

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[Campaign]:
        """The campaign on every rank (faults shared among them, every image each); the partial results in
        ``resume_dir`` when ``resume``."""
        self.campaign = fault_campaign(network_of(pl_module), self.datamodule(trainer).analysis_dataloader(),
                                       **self.settings, **self.api_options(trainer, pl_module, self.progress))
        return [self.campaign]
