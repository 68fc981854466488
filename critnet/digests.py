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
    """The raw bytes of ``tensor`` (on the CPU, contiguous): equal iff the values are bit-identical (a quantized
    tensor: its integers, scales and zero points)."""
    if tensor.is_quantized:
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            parameters = [tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points(),
                          torch.tensor([tensor.q_per_channel_axis()])]
        else:
            parameters = [torch.tensor([tensor.q_scale()], dtype=torch.float64), torch.tensor([tensor.q_zero_point()])]
        return b"".join(tensor_bytes(t) for t in [tensor.int_repr(), *parameters])
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
    for name, value in named:
        _update(digest, name, value)
    return digest.hexdigest()


def _update(digest, name: str, value) -> None:
    # a quantized model's state dict also holds packed parameters (tuples of tensors), dtypes, scales and the like
    if isinstance(value, torch.Tensor):
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor_bytes(value))
    elif isinstance(value, (tuple, list)):
        for position, item in enumerate(value):
            _update(digest, f"{name}[{position}]", item)
    else:
        digest.update(f"{name}|{value!r}|".encode())


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (its state dict, in order)."""
    return tensors_digest(model.state_dict().items())
