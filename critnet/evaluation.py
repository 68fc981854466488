"""The one evaluation loop: forward passes over an evaluation set in eval mode, per-sample loss and top-k hits.

Every analysis evaluates through here — the engine's baseline and naive passes, pruning's evaluations, the fault
campaigns' golden run, and :func:`evaluate` of the public API — so eval mode, exactness flags and the per-sample
tallies are set up one way. Lightning-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from critnet.distributed import Distributed
from critnet.errors import DataError, ModelInputError, OutputError
from critnet.evaluation_set import EvaluationSet, as_evaluation_set
from critnet.modes import device_of, evaluation_mode
from critnet.outputs import OutputSelector, logits_of
from critnet.scoring import Tally, TallyPair, per_sample, sum_halves

ForwardContext = Callable[[], AbstractContextManager]


# What a forward pass raises on inputs of the wrong shape, dtype or device: torch's shape and dtype checks
# (RuntimeError), torch._assert and timm's image-size asserts (AssertionError), Hugging Face's channel checks
# (ValueError). Other exceptions (a NameError in the model's code) are the model's own bugs and pass through.
_INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


def check_fit(model: nn.Module, data: EvaluationSet, *, output: OutputSelector = None,
              forward_context: ForwardContext | None = None) -> int:
    """The number of classes of ``model``, after checking that it takes ``data``: every analysis calls this before it
    touches the model (before any perturbation, mask, fault or hook).

    The model runs, in eval mode and without gradients, on two inputs of the first batch of every distinct input
    shape and dtype; its logits are read by ``output`` (:func:`critnet.outputs.logits_of`) and must be
    ``(inputs, classes)`` floats; every target must lie in ``[0, classes)``. Each failure is one line; the model's
    train flags are put back and nothing else of it changes.

    Raises:
        ModelInputError: the model rejects the inputs (names the model, the shape it expects where its first
            layer or an image size says so, and the shape it got).
        OutputError: the logits cannot be read from the model's output, or are not ``(inputs, classes)`` floats.
        DataError: a target outside the model's classes (names the batch, the position and the value).

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    >>> check_fit(model, as_evaluation_set((torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 9]))))
    10
    >>> check_fit(model, as_evaluation_set((torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 12, 9]))))
    Traceback (most recent call last):
    ...
    critnet.errors.DataError: data: batch 0, targets[2] = 12 is outside the model's 10 classes [0, 10)
    """
    kinds = set(data.input_kinds if data.input_kinds is not None else [0])
    classes: int | None = None
    with evaluation_mode(model, data.device), torch.no_grad():
        for position, (x, _) in enumerate(data):
            if position > max(kinds):
                break  # a streamed set need not be read further
            if position not in kinds:
                continue
            probe = x[:2]
            try:
                with forward_context() if forward_context is not None else nullcontext():
                    returned = model(probe)
            except _INPUT_ERRORS as err:
                raise ModelInputError(_rejected(model, x, position, err)) from None
            logits = logits_of(returned, output)
            if logits.dim() != 2 or logits.shape[0] != len(probe) or not logits.is_floating_point():
                raise OutputError(
                    f"output: {type(model).__name__} returns logits of shape {tuple(logits.shape)} "
                    f"({str(logits.dtype).removeprefix('torch.')}) for {len(probe)} inputs; critnet needs floats of "
                    f"shape (inputs, classes), here ({len(probe)}, classes)")
            if classes is not None and logits.shape[1] != classes:
                raise DataError(f"data: batch {position}: {type(model).__name__} returns {logits.shape[1]} classes "
                                f"for its inputs of shape {tuple(x.shape[1:])}, {classes} for those of batch 0")
            classes = int(logits.shape[1])
    bad = next((p for p, r in enumerate(data.target_range or []) if r is not None and (r[0] < 0 or r[1] >= classes)),
               None)
    if bad is not None:
        y = next(y for p, (_, y) in enumerate(data) if p == bad)  # the error path may read the set once more
        outside = ((y < 0) | (y >= classes)).nonzero()
        low, high = data.target_range[bad]
        if len(outside):
            index = int(outside[0])
            raise DataError(f"data: batch {bad}, targets[{index}] = {int(y[index])} is outside the model's {classes} "
                            f"classes [0, {classes})")
        # a streamed source that gave other batches on this second reading: the range recorded on the first
        raise DataError(f"data: batch {bad} holds targets from {low} to {high}, outside the model's {classes} classes "
                        f"[0, {classes})")
    return classes


def _rejected(model: nn.Module, x: Tensor, position: int, err: BaseException) -> str:
    """One line: ``model`` rejects the inputs ``x`` of batch ``position`` (with ``err``), and what it expects."""
    said = (str(err).strip().splitlines() or [""])[0]
    expected = expected_input(model)
    expects = f"; it expects {expected}" if expected else ""
    return (f"data: {type(model).__name__} rejects the inputs of batch {position}, of shape {tuple(x.shape)} "
            f"({str(x.dtype).removeprefix('torch.')}, {x.device}){expects}; on the first {min(len(x), 2)} of them "
            f"the model says {type(err).__name__}: {said}")


def expected_input(model: nn.Module) -> str | None:
    """The input shape ``model`` expects, as far as its first conv or linear layer (in module order) and an image
    size attribute (torchvision's ViT ``image_size``, timm's ``patch_embed.img_size``, a Hugging Face
    ``config.image_size``) tell; None if neither does.

    >>> expected_input(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    "(N, 3, H, W) (its first Conv2d '0' takes 3 channels)"
    """
    first = next(((name, m) for name, m in model.named_modules()
                  if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    size = _image_size(model)
    sides = {nn.Conv1d: ["L"], nn.Conv2d: ["H", "W"], nn.Conv3d: ["D", "H", "W"]}
    if first is None:
        return f"images of {size[0]}×{size[1]}" if size else None
    name, layer = first
    if isinstance(layer, nn.Linear):
        return f"(N, …, {layer.in_features}) (its first Linear {name!r} takes {layer.in_features} features)"
    dims = sides[type(layer)] if type(layer) in sides else ["…"]
    if size is not None and len(dims) == 2:
        dims = [str(side) for side in size]
    return (f"(N, {layer.in_channels}, {', '.join(dims)}) (its first {type(layer).__name__} {name!r} takes "
            f"{layer.in_channels} channels)")


def _image_size(model: nn.Module) -> tuple[int, int] | None:
    for owner, attribute in ((model, "image_size"), (getattr(model, "patch_embed", None), "img_size"),
                             (getattr(model, "config", None), "image_size")):
        value = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value, value
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return int(value[0]), int(value[1])
    return None


def batch_results(model: nn.Module, data: EvaluationSet, *, forward_context: ForwardContext | None = None,
                  output: OutputSelector = None) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor]]:
    """One forward pass per batch: ``(offset, logits, losses, top1, top5)`` with per-sample float64 losses and
    bool hits (:func:`critnet.scoring.per_sample`); ``offset`` is the batch's first sample in the set.

    The caller sets the mode (:func:`evaluation_mode`) and gradients; ``forward_context`` wraps each forward pass
    (e.g. an autocast for bf16-mixed); the logits are read from the model's output by ``output``
    (:func:`critnet.outputs.logits_of`) and the loss is always computed from float32 logits.
    """
    for (x, y), offset in zip(data, data.offsets()):
        with forward_context() if forward_context is not None else nullcontext():
            logits = logits_of(model(x), output)
        logits = logits.float()
        losses, top1, top5 = per_sample(logits[None], y.to(logits.device))
        yield offset, logits, losses[0], top1[0], top5[0]


def tally_pass(model: nn.Module, data: EvaluationSet, *, forward_context: ForwardContext | None = None,
               reference: tuple[Tensor, Tensor, Tensor] | None = None, output: OutputSelector = None) -> TallyPair:
    """Tallies over the two (even/odd) halves of the set, summed batch by batch (what the engine's exact method
    sums, so its scores can be compared bit for bit); with ``reference`` (the unperturbed per-sample results of
    :func:`sample_pass`) also the paired sums behind the standard errors."""
    pair = TallyPair()
    for offset, _, losses, top1, top5 in batch_results(model, data, forward_context=forward_context, output=output):
        rows = None if reference is None else tuple(r[offset : offset + len(losses)] for r in reference)
        pair.add(sum_halves(losses[None], top1[None], top5[None], offset, rows)[0])
    return pair


def tally_samples(samples: tuple[Tensor, Tensor, Tensor], data: EvaluationSet,
                  reference: tuple[Tensor, Tensor, Tensor] | None = None) -> TallyPair:
    """The tallies :func:`tally_pass` would sum, from per-sample results over the whole set (:func:`sample_pass`):
    the same values summed in the same batches, so the same numbers without another pass."""
    pair = TallyPair()
    for offset, size in zip(data.offsets(), data.batch_sizes):
        losses, top1, top5 = (v[offset : offset + size][None] for v in samples)
        rows = None if reference is None else tuple(r[offset : offset + size] for r in reference)
        pair.add(sum_halves(losses, top1, top5, offset, rows)[0])
    return pair


def sample_pass(model: nn.Module, data: EvaluationSet, output: OutputSelector = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample losses (float64), top-1 and top-5 hits over the whole set, on the CPU."""
    with torch.no_grad():
        parts = [(losses.cpu(), top1.cpu(), top5.cpu())
                 for _, _, losses, top1, top5 in batch_results(model, data, output=output)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]


def batch_tallies(model: nn.Module, data: EvaluationSet | list, *, distributed: Distributed | None = None,
                  sharded: bool = False, forward_context: ForwardContext | None = None,
                  output: OutputSelector = None) -> Tally:
    """The tally of a whole set, summed per batch and then in batch order, on every rank.

    With several ranks (``distributed``), rank r evaluates the batches r, r + world_size, … and the per-batch sums
    are gathered and added in batch order, so every rank returns exactly the one-process numbers. With ``sharded``
    the ``data`` already is this rank's share (exactly those batches, in that order; an empty list when the rank
    has none), so no rank reads the others' images.
    """
    distributed = distributed or Distributed.single()
    rank, world_size = distributed.rank, distributed.world_size
    per_batch: dict[int, Tally] = {}
    if len(data):
        with torch.no_grad():
            for position, (_, _, losses, top1, top5) in enumerate(
                batch_results(model, data, forward_context=forward_context, output=output)
            ):
                index = rank + position * world_size if sharded else position
                if index % world_size != rank:
                    continue
                per_batch[index] = Tally(float(losses.sum()), int(top1.sum()), int(top5.sum()), int(losses.numel()))
    if world_size > 1:
        merged: dict[int, Tally] = {}
        for part in distributed.gather(per_batch):
            merged.update(part)
        per_batch = merged
    total = Tally()
    for index in sorted(per_batch):
        total = total + per_batch[index]
    return total


def evaluate(model: nn.Module, data: Any, *, device: torch.device | str | None = None,
             distributed: Distributed | None = None, forward_context: ForwardContext | None = None,
             memory_budget_mb: float | None = None, output: OutputSelector = None) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy (float64 sum) and the sample count of ``model``
    on ``data``, in eval mode; the model's train flags are put back afterwards.

    Args:
        model: the classifier.
        data: a DataLoader, any iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair.
        device: where to evaluate (default: where the model's parameters are).
        distributed: a :class:`~critnet.distributed.Distributed` handle; with several ranks each evaluates every
            world_size-th batch and the sums are gathered (every rank returns the same numbers).
        forward_context: wraps each forward pass, e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)``.
        memory_budget_mb: batches beyond this size are streamed from ``data`` instead of held.
        output: where the logits are in what the model returns (see :func:`critnet.outputs.logits_of`): ``None``
            takes a tensor as it is and reads ``.logits`` (attribute or key) from anything else, e.g. a Hugging Face
            ``ModelOutput`` or a dict; a key (``"scores"``), an index (``0`` for a tuple) or a callable that takes
            the model's output and returns the logits tensor selects them explicitly.

    Raises:
        CritnetError: one line naming the batch, value or output at fault, before any batch is evaluated: data
            that is not ``(inputs, targets)`` batches of integer class indices, or empty
            (:class:`~critnet.errors.DataError`), inputs the model rejects (:class:`~critnet.errors.ModelInputError`),
            targets outside the model's classes, or logits that cannot be read (:class:`~critnet.errors.OutputError`);
            see :func:`check_fit`.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    >>> result = evaluate(model, (torch.randn(8, 3, 2, 2), torch.arange(8)))
    >>> sorted(result), result["samples"]
    (['loss', 'samples', 'top1', 'top1_correct', 'top5', 'top5_correct'], 8)
    """
    device = torch.device(device) if device is not None else device_of(model)
    evaluation_set = as_evaluation_set(data, device=device, memory_budget_mb=memory_budget_mb)
    check_fit(model, evaluation_set, output=output, forward_context=forward_context)
    with evaluation_mode(model, device):
        tally = batch_tallies(model, evaluation_set, distributed=distributed, forward_context=forward_context,
                              output=output)
    return tally.summary()
