"""What the analysis callbacks share: the datamodule's data, the API's options from the trainer (device, distributed
handle, progress bar, resume directory), one-line errors that name the callback, a clean stop on Ctrl-C or SIGTERM
that says how to continue, and rank 0 reporting the results."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from critnet.distributed import Distributed
from critnet.errors import CritnetError, Interrupted
from critnet.results.protocol import AnalysisResult


def network_of(pl_module: L.LightningModule) -> torch.nn.Module:
    """The classifier inside critnet's LightningModule (``pl_module.model``), or the module itself."""
    network = getattr(pl_module, "model", None)
    return network if isinstance(network, torch.nn.Module) else pl_module


@dataclass(eq=False)
class AnalysisCallback(L.Callback):
    """Base of the callbacks that run one analysis of the public API at the end of ``validate``.

    A callback is a dataclass built on the analysis's settings dataclass, so its arguments (the command line's
    ``init_args``) are those settings plus its own. It gives :meth:`check_settings` (called at setup, before the
    validation loop: errors raised while the CLI builds callbacks reach the user wrapped in a type-union message,
    so the settings are not checked when the callback is built) and :meth:`analyse`, which calls the API on every
    rank and returns the results; :meth:`run` does the rest.

    Args:
        resume: Keep finished work in ``resume_dir`` so that the same command continues after an interruption.
        resume_dir: Where the partial results live; default ``<trainer.default_root_dir>/<resume_subdir>``.
    """

    #: The default directory of the partial results under ``trainer.default_root_dir``.
    resume_subdir: ClassVar[str] = "partial"
    #: The stages at whose end the analysis runs.
    run_on: ClassVar[Sequence[str]] = ("validate",)

    resume: bool = False
    resume_dir: str | None = None

    def __post_init__(self) -> None:
        """Nothing is checked here (see the class docstring); :meth:`check_settings` checks at setup."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def check_settings(self) -> Any:
        """Raise a one-line :class:`~critnet.choices.SettingError` naming the first bad setting."""

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[AnalysisResult]:
        """Run the analysis on every rank and return its results (the same on every rank)."""
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with self.named():
            self.check_settings()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "validate" in self.run_on and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module, "validate")

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[AnalysisResult]:
        """The analysis on every rank (each reaches every collective); rank 0 writes every file in log_dir, prints
        the table and logs to TensorBoard."""
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        with self.named():
            self.check_settings()
        # Lightning evaluates under inference_mode; the analyses write into ordinary tensors (and taylor needs
        # gradients).
        with torch.inference_mode(False), self.interruptible(trainer), self.named():
            results = self.analyse(trainer, pl_module, stage)
        if trainer.is_global_zero:
            writer = tensorboard_experiment(trainer)
            for result in results:
                result.report(log_dir, writer=writer, step=trainer.global_step, print_table=self.print_table)
        return results

    #: Print the results' tables on the console (rank 0).
    print_table: ClassVar[bool] = True

    def api_options(self, trainer: L.Trainer, pl_module: L.LightningModule, progress: bool) -> dict[str, Any]:
        """The API's keyword arguments every analysis takes from the trainer: the device, the distributed handle,
        the progress bar (``progress``: False, True for its own bar, or Lightning's live display to join: rich
        allows one at a time) and the resume directory."""
        running = getattr(trainer.progress_bar_callback, "progress", None)
        return dict(device=pl_module.device, distributed=Distributed.current(),
                    progress=(running or True) if progress else False, resume_dir=self.resume_path(trainer))

    def resume_path(self, trainer: L.Trainer) -> Path | None:
        if not self.resume:
            return None
        return Path(self.resume_dir) if self.resume_dir else Path(trainer.default_root_dir) / self.resume_subdir

    @staticmethod
    def datamodule(trainer: L.Trainer) -> Any:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "analysis_dataloader"):
            raise CritnetError("the analysis callbacks need a critnet datamodule (critnet.data.*DataModule, with "
                               "analysis_dataloader()) to read the validation set in dataset order")
        return datamodule

    @staticmethod
    def skipped_images(trainer: L.Trainer) -> list[str]:
        """The evaluation images left out as unreadable, over all ranks (a collective: every rank calls it)."""
        datamodule = trainer.datamodule
        return datamodule.skipped_images(gather=True) if hasattr(datamodule, "skipped_images") else []

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        """User errors raised inside name the callback they come from (the CLI prints them as one line)."""
        try:
            yield
        except CritnetError as err:
            message = str(err)
            if message.startswith(f"{self.name}:"):
                raise
            raise type(err)(f"{self.name}: {message}") from None

    @contextlib.contextmanager
    def interruptible(self, trainer: L.Trainer) -> Iterator[None]:
        """Ctrl-C or SIGTERM stops the analysis within a step: the API's ``finally`` blocks restore the model and
        close the partial-results file, and :class:`~critnet.errors.Interrupted` carries one line on how to
        continue. Lightning otherwise only notes a SIGTERM and lets the analysis run on."""

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
        try:
            yield
        except KeyboardInterrupt:
            if self.resume:
                hint = (f"{self.name} was interrupted; its finished work is kept in {self.resume_path(trainer)}: "
                        "run the same command again to continue where it stopped")
            else:
                hint = (f"{self.name} was interrupted; run the same command with resume: true "
                        "(--trainer.callbacks.init_args.resume true) to keep finished work and continue after an "
                        "interruption")
            raise Interrupted(hint) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def tensorboard_experiment(trainer: Any):
    """The ``SummaryWriter`` of the trainer's TensorBoardLogger, or ``None`` if it has none."""
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar") and hasattr(experiment, "add_figure"):
            return experiment
    return None
