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
from critnet.digests import tensors_digest
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


def _expand(unit_mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A (bool) mask over units broadcast to the full weight shape."""
    return unit_mask.reshape(unit_mask.shape + (1,) * (weight.dim() - unit_mask.dim())).expand(weight.shape).clone()


@dataclass
class PruneMasks:
    """Keep-masks (True = keep) per layer, shaped like each layer's weight, and what they prune.

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
        every rank iff the masks are equal."""
        return int(tensors_digest(self.masks.items())[:16], 16)


def _total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finish(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], unit_masks: Sequence[torch.Tensor],
            **extra: Any) -> PruneMasks:
    masks: dict[str, torch.Tensor] = {}
    selected = pruned = units = units_pruned = 0
    for (name, module), keep_units in zip(layers, unit_masks):
        weight = module.weight
        mask = _expand(keep_units, weight)
        masks[name] = mask
        selected += weight.numel()
        pruned += int((~mask).sum())
        units += keep_units.numel()
        units_pruned += int((~keep_units).sum())
    return PruneMasks(masks, selected, pruned, _total_parameters(model), units, units_pruned, **extra)


def _threshold(norms: Sequence[torch.Tensor], p_prune: float) -> float | None:
    """The norm at index int(p_prune·N) of the ascending sort of all ``norms`` together; None when that is N
    (every unit is a candidate).

    A partial sort in place on one concatenated copy: a full sort would add the sorted values and an int64 index
    per unit, about three times the norms' memory (tens of GB for the largest torchvision models' connections).
    """
    count = sum(n.numel() for n in norms)
    index = int(p_prune * count)
    if index >= count:
        return None
    flat = torch.cat([n.flatten().cpu() for n in norms]).numpy()
    flat.partition(index)
    return float(flat[index])


def _candidates(norms: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Norms strictly below ``threshold`` (ties at it survive, as in the original); all of them when it is None."""
    return torch.ones_like(norms, dtype=torch.bool) if threshold is None else norms < threshold


def layer_norms(model: nn.Module, method: str = "connections", selection: LayerSelection | None = None
                ) -> list[torch.Tensor]:
    """The unit norms of every selected layer (CPU, float64), in model order: computed once, reusable by
    :func:`dwp_masks` for every setting of a sweep over an unchanged model."""
    return [unit_norms(module.weight, method).cpu() for _, module in prunable_layers(model, selection)]


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
        norms: the result of :func:`layer_norms` for the same model, method and selection (saves recomputing
            them for every setting); None = compute them here.
        selection: the pruned layers (:class:`LayerSelection`); None = ``LayerSelection(include_linear=...)``.
    """
    check_choice("method", method, PRUNE_METHODS)
    check_choice("scope", scope, PRUNE_SCOPES)
    p_prune = check_fraction("p_prune", p_prune)
    p_bern = check_fraction("p_bern", p_bern)
    selection = LayerSelection(include_linear=include_linear) if selection is None else selection
    layers = prunable_layers(model, selection)
    if norms is None:
        norms = layer_norms(model, method, selection)
    if len(norms) != len(layers):
        raise PruneError(f"norms cover {len(norms)} layers, the selection has {len(layers)}")
    threshold = _threshold(norms, p_prune) if scope == "global" else None
    generator = torch.Generator().manual_seed(int(seed))
    keep = []
    for n in norms:
        # Layer by layer, in model order: the CPU generator's uniform draws come out as one long draw would
        # (checked in tests/test_prune.py), without a float64 number per unit of the whole model in memory at once.
        candidates = _candidates(n, threshold if scope == "global" else _threshold([n], p_prune))
        draws = torch.rand(n.shape, generator=generator, dtype=torch.float64)
        keep.append(~(candidates & (draws < p_bern)))
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
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, mask in masks.masks.items():
                module = _named_module(model, name)
                weight = module._parameters.get("weight")
                if weight is None or torch_prune.is_pruned(module):
                    raise PruneError(f"layer {name!r} has no plain weight parameter to prune")
                if tuple(mask.shape) != tuple(weight.shape):
                    raise PruneError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
                keep = mask.to(weight.device)
                saved.append((weight, keep, weight[~keep].clone()))
                weight.mul_(keep.to(weight.dtype))
        yield masks
    finally:
        with torch.no_grad():
            for weight, keep, removed in reversed(saved):
                weight.masked_scatter_(~keep, removed)
