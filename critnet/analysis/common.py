"""What every analysis of the public API shares: where to run, how to show progress, how long it took."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from critnet.distributed import Distributed
from critnet.evaluation import device_of
from critnet.reporting.progress import AnalysisProgress


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else where the model's parameters are."""
    return torch.device(device) if device is not None else device_of(model)


def model_name(model: nn.Module, name: str | None) -> str:
    """How reports call the model: ``name`` if given, else its class name."""
    return name if name is not None else type(model).__name__


def progress_bar(progress: Any, label: str, distributed: Distributed, *, total: int | None = None,
                 step_name: str = "") -> AnalysisProgress:
    """The analysis's progress bar: drawn on the lead rank when ``progress`` is true; when ``progress`` is a live
    ``rich.progress.Progress`` (e.g. Lightning's) the bar joins that display."""
    running = progress if hasattr(progress, "add_task") else None
    return AnalysisProgress(label, bool(progress) and distributed.is_lead, total=total, step_name=step_name,
                            running=running)
