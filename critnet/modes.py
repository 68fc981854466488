"""How a model is put into evaluation and back: eval mode, exact GPU arithmetic, the device it lives on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, device: torch.device | str | None = None,
                    deterministic: bool = True) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics stay untouched) and, for exact GPU scores, no TF32 and deterministic
    cuDNN; every module's train flag and the backend flags are put back afterwards, also on exceptions.

    >>> model = nn.Sequential(nn.BatchNorm1d(3)).train()
    >>> with evaluation_mode(model):
    ...     model.training
    False
    >>> model.training
    True
    """
    device = torch.device(device) if device is not None else device_of(model)
    training = {name: m.training for name, m in model.named_modules()}
    flags = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    try:
        model.eval()
        if deterministic and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = flags
        for name, module in model.named_modules():
            module.training = training[name]


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) are; the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else where the model's parameters are."""
    return torch.device(device) if device is not None else device_of(model)
