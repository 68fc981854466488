"""Prune → evaluate → exact restore (DWP §3.2, arXiv 2208.08677), and channel pruning in a given order.

Lightning-free. The masks follow the original network-prune algorithm:

* ``connections``: the L1 norm of every (out, in) kernel of a Conv2d (for a Linear, every (out, in) weight);
* ``neurons``: the L1 norm of every output filter (a Linear's output row);
* ``weights``: the magnitude of every single weight;
* scope ``global``: the norms of all selected layers sorted together, the threshold is the norm at index
  ``int(p_prune · N)`` of the ascending sort, the candidates are the norms strictly below it (ties at the threshold
  survive, as in the original); ``p_prune = 1`` makes every unit a candidate (the original indexed past the end).
  Scope ``layerwise`` applies the same rule to each layer on its own;
* every candidate is pruned independently with probability ``p_bern``.

The masks zero the pruned weights in place (:func:`pruned`), and the removed values are written back in ``finally``,
so every parameter and buffer is bit-identical afterwards."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

import csv
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from critnet.choices import (
    CHANNEL_ORDERS,
    PRUNE_METHODS,
    PRUNE_SCOPES,
    check_choice,
    check_fraction,
)
from critnet.errors import CritnetError
from critnet.perturb import Unit
from critnet.scoring import criticality_key
from critnet.selection import Selection


class PruneError(CritnetError):
    """A pruning setting, ranking file or model that cannot be pruned, named in the message."""


@dataclass(eq=False)
class LayerSelection(Selection):
    """The layers that pruning zeroes, in model order: those whose names ``include`` and ``exclude`` keep
    (:class:`~critnet.selection.Selection`) and whose class is one of ``module_types`` (exact class names); with
    ``module_types`` None, every Conv2d, and every Linear too when ``include_linear`` (subclasses included).

    Args:
        include_linear: With ``module_types`` None, prune Linear layers as well as Conv2d (the original prunes
            Conv2d only).

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    >>> [name for name, _ in prunable_layers(model, LayerSelection(include_linear=True, exclude=["^0$"]))]
    ['2']
    """

    include_linear: bool = False


def prunable_layers(model: nn.Module, selection: LayerSelection | None = None) -> list[tuple[str, nn.Module]]:
    """The layers ``selection`` picks (default: every Conv2d), with their names; each must hold a plain weight of
    shape (out, in, ...)."""
    selection = LayerSelection() if selection is None else selection
    classes: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear) if selection.include_linear else (nn.Conv2d,)
    # without module_types the default classes match with their subclasses, as they always did
    layers = [(name, module) for name, module in selection.modules(model)
              if selection.module_types is not None or isinstance(module, classes)]
    if not layers:
        kinds = " or ".join(selection.module_types or [cls.__name__ for cls in classes])
        named = selection.include is not None or selection.exclude
        kept = f" whose name include={selection.include} and exclude={selection.exclude} keep" if named else ""
        raise PruneError(f"the model has no {kinds} layer{kept} to prune")
    for name, module in layers:
        weight = module._parameters.get("weight")
        reparametrised = weight is None and isinstance(getattr(module, "weight", None), torch.Tensor)
        if torch_prune.is_pruned(module) or reparametrised:
            raise PruneError(f"layer {name!r} already carries a pruning reparametrisation; remove it first")
        if weight is None or weight.dim() < 2:
            raise PruneError(f"layer {name!r} ({type(module).__name__}) has no weight of shape (out, in, ...) to "
                             "prune")
    return layers


def unit_norms(weight: torch.Tensor, method: str) -> torch.Tensor:
    """The float64 L1 norm of every pruning unit of ``weight`` (shape: (out, in), (out,) or the weight's shape)."""
    check_choice("method", method, PRUNE_METHODS)
    # float64 makes the sums (≤ a few thousand terms) independent of the reduction order, so every implementation
    # and every device sorts the same numbers.
    magnitudes = weight.detach().abs().to(torch.float64)
    if method == "weights":
        return magnitudes
    if method == "connections":
        return magnitudes.sum(dim=tuple(range(2, weight.dim()))) if weight.dim() > 2 else magnitudes
    return magnitudes.flatten(1).sum(dim=1)


# The most values one step of the layer-by-layer loops below takes at once. Keeping every temporary this small lets
# them reuse one another's memory: a larger one, freed, stays with glibc's heap under whatever was allocated after
# it, and the evaluation that follows finds that much less.
_CHUNK = 1 << 15


def _rows(tensor: torch.Tensor, *others: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """``tensor`` and ``others`` (shaped like it) in slices of whole rows of about ``_CHUNK`` values."""
    step = max(1, _CHUNK // max(1, tensor[0].numel())) if tensor.dim() else 1
    for start in range(0, len(tensor) if tensor.dim() else 1, step):
        yield tuple(t[start : start + step] if t.dim() else t for t in (tensor, *others))


def _expand(unit_mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A (bool) mask over units broadcast to the full weight shape: a view, so a mask costs one byte per unit
    however many weights a unit spans (a connection of a 3×3 convolution spans nine)."""
    return unit_mask.reshape(unit_mask.shape + (1,) * (weight.dim() - unit_mask.dim())).expand(weight.shape)


@dataclass
class PruneMasks:
    """Keep-masks (True = keep) per layer, shaped like each layer's weight, and what they prune. A mask is a broadcast
    view of one flag per unit: copy it (``.clone()``) before writing into it.

    ``ratio`` is the fraction of the selected weights that the masks zero; ``param_fraction`` the same count over all
    parameters of the model; ``units``/``units_pruned`` count the pruning units (kernels, filters or weights).
    """

    masks: dict[str, torch.Tensor]
    selected: int
    pruned: int
    total_parameters: int
    units: int
    units_pruned: int
    seed: int | None = None
    threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.pruned / self.selected if self.selected else 0.0

    @property
    def param_fraction(self) -> float:
        return self.pruned / self.total_parameters if self.total_parameters else 0.0

    def fingerprint(self) -> int:
        """A digest of all masks in layer order (64 bits, as an int: it keys records of the resume file): equal on
        every rank iff the masks are equal.

        The digest of :func:`~critnet.digests.tensors_digest`, fed a few rows at a time: a mask is a view of one
        flag per unit, and its whole bytes would take one byte per weight.

        >>> from critnet.digests import tensors_digest
        >>> masks = dwp_masks(nn.Sequential(nn.Conv2d(3, 4, 3)), p_prune=0.5)
        >>> masks.fingerprint() == int(tensors_digest(masks.masks.items())[:16], 16)
        True
        """
        digest = hashlib.sha256()
        for name, mask in self.masks.items():
            digest.update(f"{name}|{mask.dtype}|{tuple(mask.shape)}|".encode())
            for (rows,) in _rows(mask.detach().cpu()):
                digest.update(rows.contiguous().view(torch.uint8).numpy())  # bool as 0/1 bytes, as tensor_bytes
        return int(digest.hexdigest()[:16], 16)


def _total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finish(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], unit_masks: Sequence[torch.Tensor],
            **extra: Any) -> PruneMasks:
    masks: dict[str, torch.Tensor] = {}
    selected = pruned = units = units_pruned = 0
    for (name, module), keep_units in zip(layers, unit_masks):
        weight = module.weight
        masks[name] = _expand(keep_units, weight)
        removed = keep_units.numel() - int(torch.count_nonzero(keep_units))  # a bool sum would cast to int64 first
        selected += weight.numel()
        pruned += removed * (weight.numel() // max(1, keep_units.numel()))  # every unit spans as many weights
        units += keep_units.numel()
        units_pruned += removed
    return PruneMasks(masks, selected, pruned, _total_parameters(model), units, units_pruned, **extra)


# The threshold's search counts the norms in bins of 16 bits of their float64 patterns, narrowing to the bin that
# holds the sought index, until that bin holds no more than _HELD norms: those are gathered and partitioned.
_DIGIT = 16
_HELD = 1 << 20
_NO_SIGN = (1 << 63) - 1


def _keys(norms: torch.Tensor) -> torch.Tensor:
    """The float64 bit patterns of ``norms`` as int64: L1 norms are never negative, and the patterns of
    non-negative floats order as the floats do (NaN, its sign bit cleared, above inf, as a sort puts it last)."""
    return norms.detach().to(torch.float64).cpu().contiguous().view(torch.int64).flatten() & _NO_SIGN


def _parts(norms: Sequence[torch.Tensor], layers: Sequence[int]) -> Iterator[torch.Tensor]:
    """The norms of ``layers`` (indices into ``norms``), flattened, a chunk at a time: a :class:`LayerNorms`
    computes each chunk as it is read, so not even one layer's norms are held (a Linear layer's connections are
    its weights, one float64 norm each)."""
    for index in layers:
        if isinstance(norms, LayerNorms):
            yield from norms.parts(index)
        else:
            yield from norms[index].detach().flatten().split(_CHUNK)


def _threshold(norms: Sequence[torch.Tensor], p_prune: float, layers: Sequence[int] | None = None) -> float | None:
    """The norm at index int(p_prune·N) of the ascending sort of the norms of ``layers`` (default: all) together;
    None when that is N (every unit is a candidate).

    A radix selection that reads the norms a chunk at a time, several times (:func:`_parts`): a sort, or a partition
    of one concatenated copy, would hold every norm of the model at once, and a copy besides.
    """
    layers = range(len(norms)) if layers is None else layers
    prefix, shift = 0, 64  # the bits of the sought pattern above ``shift`` found so far
    index: int | None = None
    while True:
        shift -= _DIGIT
        counts = torch.zeros(1 << _DIGIT, dtype=torch.int64)
        for part in _parts(norms, layers):
            keys = _keys(part)
            if shift + _DIGIT < 64:
                keys = keys[(keys >> (shift + _DIGIT)) == prefix]
            counts += torch.bincount((keys >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT)
        if index is None:
            count = int(counts.sum())
            index = int(p_prune * count)
            if index >= count:
                return None
        below = counts.cumsum(0)
        digit = int(torch.searchsorted(below, index, right=True))
        index -= int(below[digit - 1]) if digit else 0
        prefix = (prefix << _DIGIT) | digit
        if shift == 0 or int(counts[digit]) <= _HELD:
            break
    if shift > 0:
        members = torch.empty(int(counts[digit]), dtype=torch.int64)  # taken first, like dwp_masks' flags
        start = 0
        for part in _parts(norms, layers):
            keys = _keys(part)
            found = keys[(keys >> shift) == prefix]
            members[start : start + len(found)] = found
            start += len(found)
        flat = members.numpy()
        flat.partition(index)
        prefix = int(flat[index])
    return torch.tensor(prefix, dtype=torch.int64).view(torch.float64).item()


def _candidates(norms: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Norms strictly below ``threshold`` (ties at it survive, as in the original); all of them when it is None."""
    return torch.ones_like(norms, dtype=torch.bool) if threshold is None else norms < threshold


def layer_norms(model: nn.Module, method: str = "connections", selection: LayerSelection | None = None
                ) -> list[torch.Tensor]:
    """The unit norms of every selected layer (CPU, float64), in model order, all held: what :class:`LayerNorms`
    gives one layer at a time."""
    return [unit_norms(module.weight, method).cpu() for _, module in prunable_layers(model, selection)]


class LayerNorms(Sequence[torch.Tensor]):
    """The unit norms of every selected layer (CPU, float64), in model order, computed from the layer's weight each
    time one is read, and the global thresholds over them: what :func:`dwp_masks` needs for every setting of a sweep
    over an unchanged model, holding one layer's norms at a time instead of eight bytes per unit of the model for the
    whole sweep (reading a layer again costs less than evaluating it on one image).

    The thresholds are kept per ``p_prune``; the weights must not change while the object is used.

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3))
    >>> [n.shape for n in LayerNorms(model, "connections")]
    [torch.Size([4, 3])]
    """

    def __init__(self, model: nn.Module, method: str = "connections", selection: LayerSelection | None = None
                 ) -> None:
        check_choice("method", method, PRUNE_METHODS)
        self.method = method
        self.weights = [module.weight for _, module in prunable_layers(model, selection)]
        self._thresholds: dict[float, float | None] = {}

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return torch.cat(list(self.parts(index))).view(self.shapes[index])

    def parts(self, index: int) -> Iterator[torch.Tensor]:
        """The norms of layer ``index``, flattened, computed a few rows of its weight at a time (a unit lies within
        one row, so each norm is the one of the whole layer's computation)."""
        for (rows,) in _rows(self.weights[index].detach()):
            yield unit_norms(rows, self.method).cpu().flatten()

    @property
    def shapes(self) -> list[torch.Size]:
        """The shape of every layer's norms (from the weights' shapes; no norm is computed)."""
        spans = {"weights": None, "connections": 2, "neurons": 1}[self.method]
        return [w.shape[:spans] for w in self.weights]

    @property
    def units(self) -> int:
        """How many units the selected layers hold."""
        return sum(math.prod(shape) for shape in self.shapes)

    def threshold(self, p_prune: float) -> float | None:
        """The global threshold at ``p_prune`` (:func:`_threshold`), searched once per value."""
        if p_prune not in self._thresholds:
            self._thresholds[p_prune] = _threshold(self, p_prune)
        return self._thresholds[p_prune]


def dwp_masks(model: nn.Module, method: str = "connections", scope: str = "global", p_prune: float = 0.0,
              p_bern: float = 1.0, seed: int = 0, include_linear: bool = False,
              norms: Sequence[torch.Tensor] | None = None, selection: LayerSelection | None = None) -> PruneMasks:
    """The DWP §3.2 keep-masks for ``model``.

    Args:
        model: the network; it is only read.
        method: ``connections``, ``neurons`` or ``weights``.
        scope: ``global`` (one threshold over all selected layers) or ``layerwise`` (one per layer).
        p_prune: the fraction of the sorted unit norms below which units are candidates, in [0, 1].
        p_bern: the probability that a candidate is pruned, in [0, 1].
        seed: seeds the CPU generator of the Bernoulli draws, so every rank draws the same masks. One uniform number is
            drawn per unit in model order whatever p_prune and p_bern are, so the masks of one seed are nested.
        include_linear: select Linear layers as well as Conv2d (``selection`` None).
        norms: the unit norms of the same model, method and selection: a :class:`LayerNorms` (which keeps the
            global threshold of every p_prune for the next setting of a sweep) or the list :func:`layer_norms`
            gives; None = a :class:`LayerNorms` made here.
        selection: the pruned layers (:class:`LayerSelection`); None = ``LayerSelection(include_linear=...)``.
    """
    check_choice("method", method, PRUNE_METHODS)
    check_choice("scope", scope, PRUNE_SCOPES)
    p_prune = check_fraction("p_prune", p_prune)
    p_bern = check_fraction("p_bern", p_bern)
    selection = LayerSelection(include_linear=include_linear) if selection is None else selection
    layers = prunable_layers(model, selection)
    if norms is None:
        norms = LayerNorms(model, method, selection)
    if len(norms) != len(layers):
        raise PruneError(f"norms cover {len(norms)} layers, the selection has {len(layers)}")
    threshold = None
    if scope == "global":
        threshold = norms.threshold(p_prune) if isinstance(norms, LayerNorms) else _threshold(norms, p_prune)
    generator = torch.Generator().manual_seed(int(seed))
    # Every layer's flags in one block taken before any layer's temporaries: a flag that outlives them, allocated
    # after them, would keep their memory from being reused or returned (glibc's heap), and the evaluation that follows
    # would find that much less.
    shapes = norms.shapes if isinstance(norms, LayerNorms) else [n.shape for n in norms]
    flags = torch.empty(sum(math.prod(shape) for shape in shapes), dtype=torch.bool)
    keep = []
    offset = 0
    for index, shape in enumerate(shapes):
        limit = threshold if scope == "global" else _threshold(norms, p_prune, [index])
        layer = flags[offset : offset + math.prod(shape)]
        offset += layer.numel()
        start = 0
        # In model order, a chunk at a time: the CPU generator's uniform draws come out as one long draw would
        # (checked in tests/test_prune.py), without a float64 number per unit of the whole model in memory at once.
        for part in _parts(norms, [index]):
            draws = torch.rand(part.shape, generator=generator, dtype=torch.float64)
            torch.logical_and(_candidates(part, limit), draws < p_bern, out=layer[start : start + len(part)])
            start += len(part)
        keep.append(layer.logical_not_().view(shape))
    return _finish(model, layers, keep, seed=int(seed), threshold=threshold,
                   info={"method": method, "scope": scope, "p_prune": p_prune, "p_bern": p_bern})


def channel_unit(layer: str, index: int) -> Unit:
    """The channel unit of output channel ``index`` of layer ``layer`` (its filter ``<layer>.weight[index]``)."""
    return Unit("channel", f"{layer}.weight", int(index))


def channel_l1(model: nn.Module, selection: LayerSelection | None = None) -> dict[Unit, float]:
    """The float64 L1 norm of every output channel (a channel :class:`~critnet.perturb.Unit`) of the selected
    layers, in model order."""
    result: dict[Unit, float] = {}
    for name, module in prunable_layers(model, selection):
        for index, norm in enumerate(unit_norms(module.weight, "neurons").tolist()):
            result[channel_unit(name, index)] = norm
    return result


def read_channel_ranking(path: str | Path) -> dict[Unit, float]:
    """Channel scores (larger = more critical) from a ranking CSV with columns ``layer``, ``index``, ``score``."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"criticality_csv {str(path)!r} does not exist")
    scores: dict[Unit, float] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"layer", "index", "score"} - set(reader.fieldnames or ())
        if missing:
            raise PruneError(f"criticality_csv {str(path)!r} lacks the column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            if row["index"] in ("", None):
                continue  # tensor units carry no channel index; only channel rows order channels
            try:
                channel = channel_unit(row["layer"], int(row["index"]))
                scores[channel] = float(row["score"])
            except ValueError:
                raise PruneError(f"criticality_csv {str(path)!r} line {line}: bad index or score {row!r}") from None
    if not scores:
        raise PruneError(f"criticality_csv {str(path)!r} holds no channel rows")
    return scores


def channel_order(model: nn.Module, order: str, *, selection: LayerSelection | None = None,
                  criticality: Mapping[Unit, float] | None = None, seed: int = 0) -> list[Unit]:
    """The output channels of the selected layers in the order in which to prune them.

    ``criticality``: least critical first (smallest score; NaN/inf count as most critical); ``l1``: smallest L1 norm
    first; ``random``: a permutation drawn from ``seed``. Ties keep model order.
    """
    check_choice("order", order, CHANNEL_ORDERS)
    norms = channel_l1(model, selection)
    channels = list(norms)
    if order == "l1":
        return sorted(channels, key=lambda c: norms[c])
    if order == "random":
        permutation = torch.randperm(len(channels), generator=torch.Generator().manual_seed(int(seed)))
        return [channels[i] for i in permutation.tolist()]
    if criticality is None:
        raise PruneError("order 'criticality' needs channel scores (criticality_csv or a computed ranking)")
    missing = [c for c in channels if c not in criticality]
    if missing:
        shown = ", ".join(unit.label for unit in missing[:5])
        raise PruneError(f"the criticality ranking lacks {len(missing)} channel(s) of the pruned layers, e.g. {shown}")
    return sorted(channels, key=lambda c: criticality_key(criticality[c]), reverse=True)


def channel_count(ratio: float, total: int) -> int:
    """How many of ``total`` channels a channel ratio prunes (rounded to the nearest channel)."""
    return int(math.floor(check_fraction("ratio", ratio) * total + 0.5))


def channel_masks(model: nn.Module, channels: Sequence[Unit], selection: LayerSelection | None = None
                  ) -> PruneMasks:
    """Keep-masks that zero the whole filter of every listed output channel of the selected layers."""
    layers = prunable_layers(model, selection)
    keep = {name: torch.ones(module.weight.shape[0], dtype=torch.bool) for name, module in layers}
    for channel in channels:
        name, index = channel.layer, channel.index
        if channel.kind != "channel" or name not in keep or not 0 <= index < keep[name].numel():
            raise PruneError(f"channel {channel.label} is not an output channel of a selected layer")
        keep[name][index] = False
    return _finish(model, layers, [keep[name] for name, _ in layers], info={"channels": len(channels)})


def _named_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PruneError(f"the model has no module {name!r} to prune") from None


@contextmanager
def pruned(model: nn.Module, masks: PruneMasks) -> Iterator[PruneMasks]:
    """Zero the weights ``masks`` remove, in place, for the body of the ``with``; put back the exact bits on exit
    (also on exceptions and interrupts).

    Only the removed values are kept aside: torch.nn.utils.prune would hold a float copy of every mask and a masked
    copy of every weight, twice the selected weights whatever the ratio. Multiplying by the 0/1 mask, as that module
    does, writes the same values (signed zeros included), so the pruned network computes the same outputs.
    """
    layers: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    for name, mask in masks.masks.items():
        module = _named_module(model, name)
        weight = module._parameters.get("weight")
        if weight is None or torch_prune.is_pruned(module):
            raise PruneError(f"layer {name!r} has no plain weight parameter to prune")
        if tuple(mask.shape) != tuple(weight.shape):
            raise PruneError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
        layers.append((weight, mask, mask.numel() - int(torch.count_nonzero(mask))))
    # The removed values of every layer in one block per device and dtype, taken before the per-layer temporaries
    # (as dwp_masks takes its flags)
    totals: dict[tuple[torch.device, torch.dtype], int] = {}
    for weight, _, count in layers:
        totals[(weight.device, weight.dtype)] = totals.get((weight.device, weight.dtype), 0) + count
    blocks = {key: torch.empty(total, dtype=key[1], device=key[0]) for key, total in totals.items()}
    offsets = dict.fromkeys(blocks, 0)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for weight, mask, count in layers:
                key = (weight.device, weight.dtype)
                removed = blocks[key][offsets[key] : offsets[key] + count]
                offsets[key] += count
                start = 0
                for rows, kept in _rows(weight, mask):
                    drop = ~kept.to(weight.device)
                    taken = int(torch.count_nonzero(drop))
                    torch.masked_select(rows, drop, out=removed[start : start + taken])
                    start += taken
                saved.append((weight, mask, removed))  # all of the layer's values are aside before any is zeroed
                for rows, kept in _rows(weight, mask):
                    rows.mul_(kept.to(weight.device, weight.dtype))
        yield masks
    finally:
        with torch.no_grad():
            for weight, mask, removed in reversed(saved):
                start = 0
                for rows, kept in _rows(weight, mask):
                    drop = ~kept.to(weight.device)
                    taken = int(torch.count_nonzero(drop))
                    rows.masked_scatter_(drop, removed[start : start + taken])
                    start += taken
