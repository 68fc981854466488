"""One way to fingerprint tensors: a sha256 over names, dtypes, shapes and raw bytes.

Used to prove a model is bit-identical after an analysis, to key partial-results files by the weights and the data,
and to check that every rank built the same pruning masks. Never uses Python's ``hash()`` (salted per process).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of ``tensor`` (on the CPU, contiguous): equal iff the values are bit-identical."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy().tobytes()


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 (hex) over ``(name, tensor)`` pairs in the given order.

    >>> tensors_digest([("w", torch.zeros(2))]) == tensors_digest([("w", torch.zeros(2))])
    True
    >>> tensors_digest([("w", torch.zeros(2))]) == tensors_digest([("w", -torch.zeros(2))])
    False
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (its state dict, in order)."""
    return tensors_digest(model.state_dict().items())
