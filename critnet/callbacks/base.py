"""What the analysis callbacks share: the datamodule's data, the resume directory, one-line errors that name the
callback, and a clean stop on Ctrl-C or SIGTERM that says how to continue."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from critnet.errors import CritnetError, Interrupted


def network_of(pl_module: L.LightningModule) -> torch.nn.Module:
    """The classifier inside critnet's LightningModule (``pl_module.model``), or the module itself."""
    network = getattr(pl_module, "model", None)
    return network if isinstance(network, torch.nn.Module) else pl_module


class AnalysisCallback(L.Callback):
    """Base of the callbacks that run one analysis of the public API at the end of a stage.

    Args:
        resume: keep finished work in ``resume_dir`` so that the same command continues after an interruption.
        resume_dir: where; default ``<trainer.default_root_dir>/<resume_subdir>``.
    """

    #: The default directory of the partial results under ``trainer.default_root_dir``.
    resume_subdir = "partial"

    def __init__(self, resume: bool = False, resume_dir: str | None = None) -> None:
        super().__init__()
        self.resume = resume
        self.resume_dir = resume_dir

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

    @staticmethod
    def lightning_bar(trainer: L.Trainer) -> Any:
        """Lightning's live rich progress display, which the analysis's bar joins (rich allows one at a time)."""
        return getattr(trainer.progress_bar_callback, "progress", None)

    def progress_for(self, trainer: L.Trainer, wanted: bool) -> Any:
        """The ``progress`` argument of the API: False, True (own bar) or Lightning's live display to join."""
        return (self.lightning_bar(trainer) or True) if wanted else False

    @staticmethod
    @contextlib.contextmanager
    def named(name: str) -> Iterator[None]:
        """User errors raised inside name the callback they come from (the CLI prints them as one line)."""
        try:
            yield
        except CritnetError as err:
            message = str(err)
            if message.startswith(f"{name}:"):
                raise
            raise type(err)(f"{name}: {message}") from None

    @contextlib.contextmanager
    def interruptible(self, trainer: L.Trainer, name: str) -> Iterator[None]:
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
                hint = (f"{name} was interrupted; its finished work is kept in {self.resume_path(trainer)}: run the "
                        "same command again to continue where it stopped")
            else:
                hint = (f"{name} was interrupted; run the same command with resume: true "
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
