"""The evaluation set of a ranking: batches read and decoded once, held on a device within a memory budget."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from critnet.digests import tensor_bytes
from critnet.errors import DataError


class EvaluationSet:
    """The evaluation batches of an analysis, in a fixed order.

    Build it with :meth:`from_batches`. The batches are decoded once and kept on ``device`` while they fit in
    ``memory_budget_mb``; beyond that budget the set streams: it keeps only the shape of the batches and reads them
    again from the (re-iterable) source, always in the same order, for every pass.

    Attributes:
        samples: number of samples.
        batch_sizes: the size of every batch, in order.
        device: where the batches are delivered.
        checksum: sha256 over the bytes of all inputs and targets (identifies the data in resume fingerprints).
        in_memory: whether the batches are held (True) or streamed from the source (False).
        target_range: per batch, the smallest and the largest target ``(min, max)`` (None for an empty batch):
            what the targets are checked against the model's classes with. None for a :meth:`subset`.
        input_kinds: the position of the first batch of every distinct per-sample input shape and dtype (the
            batches the model is first tried on). None for a :meth:`subset`.
    """

    def __init__(
        self,
        batches: list[tuple[Tensor, Tensor]] | None,
        source: Iterable[tuple[Tensor, Tensor]] | None,
        batch_sizes: list[int],
        device: torch.device,
        checksum: str | None = None,
        *,
        target_range: list[tuple[int, int] | None] | None = None,
        input_kinds: list[int] | None = None,
    ) -> None:
        self._batches = batches
        self._source = source
        self.batch_sizes = batch_sizes
        self.samples = sum(batch_sizes)
        self.device = device
        self._checksum = checksum
        self.in_memory = batches is not None
        self.target_range = target_range
        self.input_kinds = input_kinds

    @property
    def checksum(self) -> str:
        """sha256 over the bytes of all inputs and targets, computed on first use: only resumable analyses need
        it, and hashing copies every batch to the CPU (slow for a large set held on a GPU)."""
        if self._checksum is None:
            digest = hashlib.sha256()
            for x, y in self:
                digest.update(tensor_bytes(x))
                digest.update(tensor_bytes(y))
            self._checksum = digest.hexdigest()
        return self._checksum

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[tuple[Tensor, Tensor]],
        device: torch.device | str | None = None,
        memory_budget_mb: float | None = None,
    ) -> EvaluationSet:
        """Read ``batches`` once (each an ``(inputs, integer targets)`` pair, e.g. a DataLoader).

        Args:
            batches: the evaluation batches in order; must be re-iterable (a list or a DataLoader) if they exceed
                the memory budget.
            device: where to keep them (default: where they come from, i.e. the CPU for a DataLoader).
            memory_budget_mb: the most memory the held batches may take; None = no limit.

        Raises:
            DataError: (a :class:`~critnet.CritnetError`, one line naming the batch) no samples, a batch that is
                not an ``(inputs, targets)`` pair of tensors, targets that are not integer class indices of the
                batch's length, or a one-shot iterator whose batches exceed the memory budget.
        """
        target_device = torch.device(device) if device is not None else None
        budget = None if memory_budget_mb is None else float(memory_budget_mb) * 2**20
        held: list[tuple[Tensor, Tensor]] | None = []
        sizes: list[int] = []
        ranges: list[tuple[int, int] | None] = []
        kinds: dict[tuple, int] = {}
        used = 0
        try:
            iterator = iter(batches)
        except TypeError:
            raise DataError(f"data: {_what(batches)} is not a DataLoader, an iterable of (inputs, targets) batches "
                            "or one (inputs, targets) pair") from None
        for position, batch in enumerate(iterator):
            x, y = _as_pair(batch, position)
            sizes.append(int(x.shape[0]))
            ranges.append(_target_range(y))
            if len(x):
                kinds.setdefault((tuple(x.shape[1:]), x.dtype), position)
            used += x.element_size() * x.numel() + y.element_size() * y.numel()
            if held is not None and budget is not None and used > budget:
                held = None  # over budget: from here on only the shapes are kept, the data streams
            if held is not None:
                dev = target_device if target_device is not None else x.device
                held.append((x.to(dev), y.to(dev)))
        if not sizes or sum(sizes) == 0:
            raise DataError("data: holds no samples (an empty dataset, DataLoader or list of batches)")
        if held is None and iter(batches) is batches:
            raise DataError(
                f"memory_budget_mb: the batches of data need {used / 2**20:.1f} MB, more than memory_budget_mb="
                f"{memory_budget_mb}, and cannot be streamed because they come from a one-shot iterator; "
                "pass a DataLoader or list, or raise the budget"
            )
        dev = target_device if target_device is not None else (held[0][0].device if held else torch.device("cpu"))
        return cls(held, None if held is not None else batches, sizes, dev, target_range=ranges,
                   input_kinds=sorted(kinds.values()))

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._batches is not None:
            yield from self._batches
            return
        for position, batch in enumerate(self._source):
            x, y = _as_pair(batch, position)
            if position >= len(self.batch_sizes) or x.shape[0] != self.batch_sizes[position]:
                raise RuntimeError("evaluation set: the streamed source changed between passes")
            yield x.to(self.device), y.to(self.device)

    def subset(self, positions: Sequence[int]) -> EvaluationSet:
        """The samples at ``positions`` (ascending), regrouped into batches of at most this set's largest batch.

        A held set gives a held subset; a streaming set gives a streaming subset that re-reads this set and keeps
        only the wanted rows, so a stage of a long analysis never holds more than its segments.

        >>> data = as_evaluation_set((torch.arange(6.0)[:, None], torch.arange(6)))
        >>> [y.tolist() for _, y in data.subset([1, 4, 5])]
        [[1, 4, 5]]
        """
        positions = sorted(int(p) for p in positions)
        if not positions or positions[0] < 0 or positions[-1] >= self.samples:
            raise ValueError(f"evaluation set: positions must lie in [0, {self.samples}) and not be empty")
        size = max(self.batch_sizes)
        sizes = [min(size, len(positions) - start) for start in range(0, len(positions), size)]
        source = _Selection(self, positions, size)
        if not self.in_memory:
            return EvaluationSet(None, source, sizes, self.device)
        return EvaluationSet(list(source), None, sizes, self.device)

    def offsets(self) -> list[int]:
        """The index of the first sample of every batch."""
        out, total = [], 0
        for size in self.batch_sizes:
            out.append(total)
            total += size
        return out


class _Selection:
    """Re-iterable: the rows of ``data`` at ``positions`` (ascending), in batches of ``size``."""

    def __init__(self, data: EvaluationSet, positions: list[int], size: int) -> None:
        self.data, self.positions, self.size = data, torch.tensor(positions), size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        held = 0
        for (x, y), offset in zip(self.data, self.data.offsets()):
            wanted = self.positions[(self.positions >= offset) & (self.positions < offset + len(y))] - offset
            if not len(wanted):
                continue
            xs.append(x[wanted.to(x.device)])
            ys.append(y[wanted.to(y.device)])
            held += len(wanted)
            while held >= self.size:
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                yield x_all[: self.size], y_all[: self.size]
                xs, ys = [x_all[self.size :]], [y_all[self.size :]]
                held -= self.size
        if held:
            yield torch.cat(xs), torch.cat(ys)


def _what(value: Any) -> str:
    """What ``value`` is, in a few words, for error messages."""
    if isinstance(value, Tensor):
        return _a(f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}")
    if isinstance(value, Mapping):
        return _a(f"{type(value).__name__} with keys {', '.join(map(repr, list(value)[:6]))}")
    return _a(type(value).__name__)


def _a(words: str) -> str:
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


def _as_pair(batch: Any, position: int) -> tuple[Tensor, Tensor]:
    """The ``(inputs, targets)`` of one batch, targets as int64 class indices; a one-line :class:`DataError`
    naming the batch when it is not that."""
    where = f"data: batch {position}"
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError(f"{where} is {_what(batch)}, not an (inputs, targets) pair")
    x, y = batch[0], batch[1]
    if isinstance(x, Tensor) and ((isinstance(y, (int, float)) and not isinstance(y, bool))
                                  or (isinstance(y, Tensor) and y.dim() == 0)):
        # what iterating a Dataset (ImageFolder, TensorDataset) instead of a DataLoader gives
        raise DataError(f"{where} is (tensor, {'scalar tensor' if isinstance(y, Tensor) else type(y).__name__}): "
                        "one sample of a dataset, not a batch; wrap the dataset in a torch.utils.data.DataLoader")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise DataError(f"{where}: the inputs are {_what(x)}, not a batch tensor (samples along the first dimension)")
    if not isinstance(y, Tensor):
        raise DataError(f"{where}: the targets are {_what(y)}, not a tensor of class indices")
    n = int(x.shape[0])
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        column = y.dim() == 2 and y.shape[1] == 1 and not y.is_floating_point()
        kind = ", one-hot or class probabilities" if y.dim() == 2 and not column else ""
        if column:  # class indices as a column: argmax(1) of it would be all zeros
            fix = "convert them with targets.squeeze(1)"
        elif y.dim() == 2:
            fix = "convert them with targets.argmax(1)"
        elif y.dim() == 1:
            fix = "convert them with targets.long()"
        else:
            fix = "pass one class index per input"
        raise DataError(f"{where}: the targets are {_what(y)}{kind}; critnet needs integer class indices of "
                        f"shape ({n},): {fix}")
    if y.shape[0] != n:
        raise DataError(f"{where}: {n} inputs but {y.shape[0]} targets; every input needs one class index")
    return x, y if y.dtype == torch.long else y.long()


def _target_range(y: Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of the targets of one batch (one transfer from the device), None if empty."""
    if not len(y):
        return None
    low, high = torch.stack([y.min(), y.max()]).tolist()
    return low, high


def as_evaluation_set(data, *, device: torch.device | str | None = None,
                      memory_budget_mb: float | None = None) -> EvaluationSet:
    """The evaluation set behind any form of ``data`` the public API accepts.

    ``data`` may be an :class:`EvaluationSet` (returned as it is), a DataLoader or any re-iterable of
    ``(inputs, targets)`` batches, a one-shot iterator of such batches, or one ``(inputs, targets)`` pair of
    tensors (a single batch). Targets are integer class indices, one per input. Anything else is a one-line
    :class:`~critnet.errors.DataError` naming the batch at fault.

    >>> data = as_evaluation_set((torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)))
    >>> data.samples
    4
    """
    if isinstance(data, EvaluationSet):
        return data
    if isinstance(data, Tensor):
        raise DataError(f"data: {_what(data)} alone; critnet needs (inputs, targets) batches, e.g. one pair "
                        "(inputs, targets) with integer class targets")
    # two tensors are one batch (a batch is a pair, never a tensor), whatever their shapes: _as_pair says what is
    # wrong with them
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = [(data[0], data[1])]
    return EvaluationSet.from_batches(data, device=device, memory_budget_mb=memory_budget_mb)
