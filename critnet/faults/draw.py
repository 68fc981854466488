"""Which faults a campaign injects: the selected values, their strata, the sample size per stratum, the seeded draw."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from critnet.choices import SettingError
from critnet.faults.injection import Fault, Site
from critnet.faults.stats import achieved_margin, leveugle_sample_size
from critnet.storage import stored_values
from critnet.formats import NumberFormat, format_of
from critnet.selection import Selection

#: What a campaign selects when include / module_types are not given: every weight of every conv and linear layer.
DEFAULT_WEIGHT_INCLUDE = (r"\.weight$",)
DEFAULT_MODULE_TYPES = ("Conv2d", "Linear")


@dataclass(frozen=True)
class Layer:
    """What a fault can strike in one layer: ``elements`` values (per image for activations) of ``format``."""

    elements: int
    format: NumberFormat


@dataclass
class Stratum:
    """A part of the fault population sampled on its own: one layer (all selected bits) or one layer × bit.

    ``elements`` is the number of values of the layer (per image for activations), ``bits`` the lowest bits an
    upset may start at, ``population`` the number of possible faults (``elements × len(bits)``; infinite for
    bit-error-rate draws).
    """

    layer: str
    bits: tuple[int, ...]
    elements: int
    population: float
    planned: int = 0  # Leveugle's n (or the share of a given total)
    members: dict[str, int] | None = None  # bit-error-rate draws: the layers (and their sizes) the stratum spans
    format: str = "float32"

    @property
    def label(self) -> str:
        return self.layer if len(self.bits) != 1 else f"{self.layer}/bit{self.bits[0]}"


def selected_layers(model: nn.Module, target: str, selection: Selection,
                    example_input: torch.Tensor | None) -> dict[str, Layer]:
    """``{name: Layer}`` of the stored weights (:func:`~critnet.storage.stored_values`) or module outputs
    per image (activations) that ``selection`` picks; its ``include`` defaults to ``DEFAULT_WEIGHT_INCLUDE`` for
    weights. Activations count when their values are stored in a known format (float, or a quantized tensor).

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    >>> layers = selected_layers(model, "activations", Selection(module_types=["Conv2d", "ReLU"]),
    ...                          torch.randn(2, 3, 4, 4))
    >>> {name: (layer.elements, layer.format.name) for name, layer in layers.items()}
    {'0': (16, 'float32'), '1': (16, 'float32')}
    """
    try:
        if target == "weights":
            stores = stored_values(model)
            names = selection.names(model, {name: store.module for name, store in stores.items()},
                                    default_include=DEFAULT_WEIGHT_INCLUDE)
            return {name: Layer(stores[name].numel, stores[name].format) for name in names}
        # Selecting activation units runs the model once on the example (to count channels and to leave out
        # modules it never calls); hooks on every module read each output's size per image in that same pass.
        sizes: dict[str, Layer] = {}
        handles = [module.register_forward_hook(_size_recorder(sizes, name))
                   for name, module in model.named_modules()]
        try:
            units = selection.units(model, "activation", example_input[:1])
        finally:
            for handle in handles:
                handle.remove()
    except ValueError as err:  # the selection's errors name their key, but for an empty one: the patterns' doing
        keyed = str(err).partition(":")[0] in ("include", "exclude", "module_types")
        raise SettingError(str(err) if keyed else f"include: {err}") from None
    # a module whose output is in no known number format holds no bit faults
    return {name: sizes[name] for name in dict.fromkeys(u.name for u in units) if name in sizes}


def _size_recorder(sizes: dict[str, Layer], name: str):
    def hook(_module, _inputs, output):
        number_format = format_of(output.dtype) if isinstance(output, torch.Tensor) else None
        if number_format is not None:
            sizes[name] = Layer(output[0].numel(), number_format)
    return hook


def upset_bits(number_format: NumberFormat, bits: Sequence[int] | None, width: int, layer: str) -> tuple[int, ...]:
    """The lowest bits a ``width``-bit upset may start at in ``layer``'s values: ``bits`` (None: every bit of the
    format), each with room for ``width`` bits; a one-line error when a given bit is not in the format.

    >>> from critnet.formats import FORMATS
    >>> upset_bits(FORMATS["int8"], None, 3, "fc.weight")
    (0, 1, 2, 3, 4, 5)
    """
    if bits is None:
        return tuple(range(number_format.width - width + 1))
    for bit in bits:
        if bit + width > number_format.width:
            span = f"bits {bit}..{bit + width - 1}" if width > 1 else f"bit {bit}"
            raise SettingError(f"bits: {span} do not fit the {number_format.width}-bit {number_format.name} values "
                               f"of {layer} ({number_format.layout()})")
    return tuple(bits)


def build_strata(layers: dict[str, Layer], bits: Sequence[int] | None, stratify: Sequence[str], fault_model: str,
                 width: int = 1) -> list[Stratum]:
    per_layer = {name: upset_bits(layer.format, bits, width, name) for name, layer in layers.items()}
    if fault_model == "ber":
        formats = {layer.format.name for layer in layers.values()}
        if len(formats) != 1 or len(set(per_layer.values())) != 1:
            raise SettingError(f"fault_model: 'ber' draws over one number format at a time; the selection holds "
                               f"{', '.join(sorted(formats))}")
        (number_format,), (layer_bits,) = formats, set(per_layer.values())
        return [Stratum("(all selected)", layer_bits, sum(layer.elements for layer in layers.values()), math.inf,
                        members={name: layer.elements for name, layer in layers.items()}, format=number_format)]
    if "bit" in stratify:
        return [Stratum(name, (bit,), layer.elements, float(layer.elements), format=layer.format.name)
                for name, layer in layers.items() for bit in per_layer[name]]
    return [Stratum(name, per_layer[name], layer.elements, float(layer.elements * len(per_layer[name])),
                    format=layer.format.name) for name, layer in layers.items()]


def plan_sample(strata: list[Stratum], faults: int | str | None, error_margin: float, confidence: float) -> None:
    """Set every stratum's ``planned`` size: Leveugle's n (``faults=None``), a share of a total proportional to
    the stratum's population (``faults=n``, largest remainders) or the whole population (``"exhaustive"``).

    When the total allows it (at least one fault per stratum), no share falls below one fault: a stratum with none
    drawn would leave every rate that covers it unknown (reported as such, with an interval over what it could hold).
    """
    if faults is None:
        for s in strata:
            s.planned = leveugle_sample_size(s.population, error_margin, confidence)
    elif faults == "exhaustive":
        if any(math.isinf(s.population) for s in strata):
            raise SettingError("faults: 'exhaustive' has no meaning for bit-error-rate draws (unbounded population)")
        for s in strata:
            s.planned = int(s.population)
    else:
        if math.isinf(strata[0].population):
            strata[0].planned = int(faults)
            return
        total = sum(s.population for s in strata)
        if faults > total:
            raise SettingError(f"faults: {faults} is more than the {int(total)} possible faults; use 'exhaustive'")
        floors = [min(1, int(s.population)) if faults >= len(strata) else 0 for s in strata]
        shares = [faults * s.population / total for s in strata]
        for s, share, least in zip(strata, shares, floors):
            s.planned = max(least, int(math.floor(share)))
        # the floors took faults from the proportional shares: the largest shares give them back, one at a time
        while sum(s.planned for s in strata) > faults:
            over = max((p for p in range(len(strata)) if strata[p].planned > floors[p]),
                       key=lambda p: (strata[p].planned - shares[p], -p))
            strata[over].planned -= 1
        left = faults - sum(s.planned for s in strata)
        order = sorted((p for p in range(len(strata)) if strata[p].planned < strata[p].population),
                       key=lambda p: (-(shares[p] - math.floor(shares[p])), p))
        for position in order[:left]:
            strata[position].planned += 1


def stratum_seed(seed: int, label: str) -> list[int]:
    """The generator seed of one stratum: a stable function of (seed, label), never of ``hash()``."""
    return [int(seed), zlib.crc32(label.encode("utf-8"))]


def draw_faults(model: nn.Module, strata: list[Stratum], *, target: str, fault_model: str, seed: int,
                ber: float | None = None, width: int = 1) -> list[Fault]:
    """The fault list: per stratum a seeded sample without replacement, ordered by layer, index and bit; each
    fault strikes ``width`` adjacent bits from its drawn bit upwards.

    Bit-error-rate draws make ``strata[0].planned`` trials; in each, every selected bit flips independently with
    probability ``ber`` (the number of flips is binomial, their positions uniform without replacement).
    """
    stores = stored_values(model) if target == "weights" else {}
    formats = {s.layer: s.format for s in strata}
    drawn: list[tuple[Site, ...]] = []
    if fault_model == "ber":
        stratum = strata[0]
        layers = list(stratum.members.items())
        bounds = np.cumsum([0] + [n for _, n in layers])
        total_bits = int(bounds[-1]) * len(stratum.bits)
        for trial in range(stratum.planned):
            rng = np.random.default_rng([int(seed), zlib.crc32(b"ber"), trial])
            flips = int(rng.binomial(total_bits, ber))
            positions = np.sort(rng.choice(total_bits, size=flips, replace=False)) if flips else []
            sites = []
            for position in positions:
                element, bit = divmod(int(position), len(stratum.bits))
                layer = int(np.searchsorted(bounds, element, side="right") - 1)
                sites.append(Site(layers[layer][0], element - int(bounds[layer]), stratum.bits[bit]))
            drawn.append(tuple(sites))
    else:
        order = {name: i for i, name in enumerate(dict.fromkeys(s.layer for s in strata))}
        singles = []
        for stratum in strata:
            rng = np.random.default_rng(stratum_seed(seed, stratum.label))
            picks = rng.choice(int(stratum.population), size=stratum.planned, replace=False)
            for pick in picks.tolist():
                element, bit = divmod(pick, len(stratum.bits))
                singles.append(Site(stratum.layer, element, stratum.bits[bit]))
        singles.sort(key=lambda s: (order[s.parameter], s.index, s.bit))
        drawn = [(site,) for site in singles]
    faults = []
    for number, sites in enumerate(drawn):
        original = None
        if target == "weights":
            original = tuple(stores[s.parameter].read(s.index) for s in sites)
        number_format = strata[0].format if fault_model == "ber" else formats[sites[0].parameter]
        faults.append(Fault(number, fault_model, target, sites, original, width, number_format))
    return faults


def sizing_rows(strata: list[Stratum], drawn: dict[str, int], error_margin: float, confidence: float) -> list[dict]:
    """Per stratum: population, Leveugle's n for the requested margin, faults drawn, the worst-case margin reached."""
    rows = []
    for s in strata:
        n = drawn.get(s.label, 0)
        rows.append({
            "stratum": s.label,
            "layer": s.layer,
            "bits": list(s.bits),
            "population": s.population if math.isinf(s.population) else int(s.population),
            "leveugle_n": leveugle_sample_size(s.population, error_margin, confidence),
            "drawn": n,
            "margin_p05": achieved_margin(n, s.population, confidence),
        })
    return rows


__all__ = ["Layer", "Stratum", "build_strata", "draw_faults", "plan_sample", "selected_layers", "sizing_rows", "stratum_seed",
           "upset_bits"]
