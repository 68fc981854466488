"""``FaultCampaign``: :func:`critnet.fault_campaign` as a Lightning callback, at the end of ``validate``: data from
the datamodule, the campaign on every rank, reports from rank 0."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

from dataclasses import dataclass
from typing import ClassVar

import lightning as L

from critnet.analyses.campaign import CampaignSettings, fault_campaign
from critnet.callbacks.base import AnalysisCallback, network_of
from critnet.choices import field_values
from critnet.faults.draw import selected_layers
from critnet.results.campaign_result import Campaign


@dataclass(eq=False)
class FaultCampaign(AnalysisCallback, CampaignSettings):
    """At the end of ``validate``, inject bit faults one at a time into the model and write ``faults.csv``,
    ``campaign.json``, ``fault_rates.csv``, ``fault_vulnerability.csv`` and the heatmap / per-layer PNGs in the
    run's log_dir, plus TensorBoard figures and a console table.

    Its arguments are the campaign's settings (:class:`~critnet.analyses.campaign.CampaignSettings`), the callbacks'
    ``resume`` and ``resume_dir`` (default ``<trainer.default_root_dir>/faults_partial``), and its own:

    Args:
        memory_budget_mb: Memory (MB) for the held evaluation batches and the cached activations; null = no limit.
        progress: Show a progress bar (rank 0).
        print_table: Print the overall and per-layer rates (rank 0).

    >>> FaultCampaign(layers=["fc"], bits=[31]).check_settings().include
    ('fc',)
    """

    resume_subdir: ClassVar[str] = "faults_partial"

    memory_budget_mb: float | None = None
    progress: bool = True
    print_table: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        #: The last campaign (every rank holds it).
        self.campaign: Campaign | None = None

    def check_settings(self) -> CampaignSettings:
        """The checked settings (a one-line :class:`~critnet.choices.SettingError` naming the key otherwise)."""
        return CampaignSettings(**field_values(self, CampaignSettings))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with self.named():
            settings = self.check_settings()
            if settings.target == "weights":  # activation sites need a batch to measure their outputs
                selected_layers(network_of(pl_module), "weights", settings, None)

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[Campaign]:
        """The campaign on every rank (faults shared among them, every image each); the partial results in
        ``resume_dir`` when ``resume``."""
        self.campaign = fault_campaign(network_of(pl_module), self.datamodule(trainer).analysis_dataloader(),
                                       **field_values(self, CampaignSettings), memory_budget_mb=self.memory_budget_mb,
                                       **self.api_options(trainer, pl_module, self.progress))
        return [self.campaign]
