"""Fault models and their reversible injection (Lightning-free).

A :class:`Fault` is one injection trial: one or more :class:`Site`\\ s (a stored value named by parameter or
module, flat index and lowest bit struck) and a fault model — a bit flip, stuck-at-0, stuck-at-1, or a bit-error-rate
draw (several flips at once) — striking ``width`` adjacent bits of each site's value (1: a single-bit upset; more: a
multi-bit upset). Values are stored in a number format (:mod:`critnet.formats`): float32, float16, bfloat16, the
int8 of a quantized weight, the uint8 of a quantized activation. Weight faults are written where the model reads
the value (:mod:`critnet.storage`) and the original bits are put back on exit, also when the evaluation
raises, so NaN payloads and signed zeros survive. Activation faults live in a forward hook that is removed on exit.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from critnet.choices import FAULT_MODELS, FAULT_TARGETS
from critnet.errors import CritnetError
from critnet.storage import StoredValues, requantized, stored_values
from critnet.formats import FORMATS, format_of

#: The columns of the fault list in ``faults.csv`` (enough to replay it; ``field`` names the bits struck).
FAULT_LIST_COLUMNS = ("fault", "fault_model", "target", "parameter", "index", "bit", "width", "format", "field",
                      "original", "faulty")
#: Columns a fault list needs to be replayed (lists written before multi-bit upsets lack width and format).
REQUIRED_COLUMNS = ("fault", "fault_model", "target", "parameter", "index", "bit", "original")
_SEPARATOR = ";"  # several sites of one fault (bit-error-rate draws) share one row


class FaultListError(CritnetError):
    """A fault list (``faults.csv``) that cannot be read back or does not fit the model."""


@dataclass(frozen=True, order=True)
class Site:
    """One stored value and the lowest of the bits a fault strikes in it.

    Args:
        parameter: the parameter name (weight faults) or the module name (activation faults: its output).
        index: the flat index into the parameter, or into one image's output of the module.
        bit: 0 (the lowest bit) … the format's width - 1 (the sign of float and int8 values).
    """

    parameter: str
    index: int
    bit: int


@dataclass(frozen=True)
class Fault:
    """One injection trial.

    Args:
        id: position in the fault list.
        fault_model: ``bitflip``, ``stuck_at_0``, ``stuck_at_1`` or ``ber`` (independent flips; any number of sites).
        target: ``weights`` or ``activations``.
        sites: where the fault strikes.
        original_bits: the bit patterns of the sites before the fault (weights only; None for activations, whose
            values change with every image).
        width: adjacent bits struck in each site's value, from its ``bit`` upwards (a multi-bit upset when > 1).
        format: the number format the sites' values are stored in (:data:`critnet.formats.FORMATS`).

    >>> fault = Fault(0, "bitflip", "weights", (Site("fc.weight", 3, 30),), (0x3F800000,))
    >>> fault.faulty_bits
    (2139095040,)
    >>> upset = Fault(1, "bitflip", "weights", (Site("fc.weight", 3, 13),), (0x3C00,), width=2, format="float16")
    >>> upset.list_row()["original"], upset.list_row()["faulty"], upset.list_row()["field"]  # bits 13 and 14 flip
    ('1.0', '256.0', 'exponent')
    """

    id: int
    fault_model: str
    target: str
    sites: tuple[Site, ...]
    original_bits: tuple[int, ...] | None = None
    width: int = 1
    format: str = "float32"

    @property
    def bit_model(self) -> str:
        """What happens to each bit struck: ``ber`` draws flip them."""
        return "bitflip" if self.fault_model == "ber" else self.fault_model

    @property
    def faulty_bits(self) -> tuple[int, ...] | None:
        """Each site's value with the fault in place: every site that strikes the same value is applied to it (a
        bit-error-rate draw may flip several bits of one value)."""
        if self.original_bits is None:
            return None
        number_format = FORMATS[self.format]
        faulty: dict[tuple[str, int], int] = {}
        for bits, site in zip(self.original_bits, self.sites):
            key = (site.parameter, site.index)
            faulty[key] = number_format.apply(faulty.get(key, bits), site.bit, self.bit_model, self.width)
        return tuple(faulty[(site.parameter, site.index)] for site in self.sites)

    @property
    def is_identity(self) -> bool:
        """The fault leaves every bit as it was (stuck-at on bits that already hold the value, or no site)."""
        return not self.sites or (self.original_bits is not None and self.faulty_bits == self.original_bits)

    @property
    def parameter(self) -> str:
        return _SEPARATOR.join(dict.fromkeys(s.parameter for s in self.sites))

    def list_row(self) -> dict[str, object]:
        """The fault's row of the fault list (values as Python numbers, several sites joined by ``;``)."""
        number_format = FORMATS[self.format]

        def values(bits: tuple[int, ...] | None) -> str:
            return "" if bits is None else _SEPARATOR.join(repr(number_format.value(b)) for b in bits)

        return {
            "fault": self.id,
            "fault_model": self.fault_model,
            "target": self.target,
            "parameter": _SEPARATOR.join(s.parameter for s in self.sites),
            "index": _SEPARATOR.join(str(s.index) for s in self.sites),
            "bit": _SEPARATOR.join(str(s.bit) for s in self.sites),
            "width": self.width,
            "format": self.format,
            "field": _SEPARATOR.join(dict.fromkeys(number_format.fields_struck(s.bit, self.width) for s in self.sites)),
            "original": values(self.original_bits),
            "faulty": values(self.faulty_bits),
        }


def weight_store(stores: dict[str, StoredValues], name: str) -> StoredValues:
    """The stored values named ``name``; a one-line error naming it otherwise."""
    store = stores.get(name)
    if store is None:
        raise CritnetError(f"weight fault: the model stores no values named {name!r} in a known number format "
                           f"({', '.join(FORMATS)})")
    return store


@contextmanager
def injected(model: nn.Module, fault: Fault, stores: dict[str, StoredValues] | None = None) -> Iterator[None]:
    """The model with ``fault`` in place for the ``with`` block; the exact original bits come back on exit.

    ``stores``: the model's :func:`~critnet.storage.stored_values` when the caller holds them already.

    >>> model = nn.Linear(2, 1)
    >>> with injected(model, Fault(0, "bitflip", "weights", (Site("weight", 0, 31),))):
    ...     pass
    """
    if fault.target == "activations":
        with ExitStack() as stack:
            modules = dict(model.named_modules())
            for site in fault.sites:
                hook = _activation_hook(site, fault)
                stack.callback(modules[site.parameter].register_forward_hook(hook).remove)
            yield
        return
    stores = stored_values(model) if stores is None else stores
    targets = [weight_store(stores, site.parameter) for site in fault.sites]
    for store in targets:
        if store.format.name != fault.format:
            raise CritnetError(f"weight fault: {store.name} stores {store.format.name} values, the fault was drawn "
                               f"for {fault.format}")
    # several sites may strike one value (a bit-error-rate draw flipping two of its bits): each value is read
    # once, gets every site's bits, and is written once
    saved: dict[tuple[str, int], int] = {}
    faulty: dict[tuple[str, int], int] = {}
    owner: dict[tuple[str, int], StoredValues] = {}
    number_format = FORMATS[fault.format]
    for store, site in zip(targets, fault.sites):
        key = (site.parameter, site.index)
        if key not in saved:
            saved[key] = faulty[key] = store.read(site.index)
            owner[key] = store
        faulty[key] = number_format.apply(faulty[key], site.bit, fault.bit_model, fault.width)
    written: list[tuple[str, int]] = []
    try:
        for key, bits in faulty.items():
            written.append(key)
            owner[key].write({key[1]: bits})
        yield
    finally:
        for key in reversed(written):
            owner[key].write({key[1]: saved[key]})


def _activation_hook(site: Site, fault: Fault):
    number_format = FORMATS[fault.format]

    def hook(_module, _inputs, output):
        found = format_of(output.dtype) if isinstance(output, torch.Tensor) else None
        if found is not number_format:
            raise CritnetError(f"activation fault: module {site.parameter!r} does not output {fault.format} values")
        if output.is_quantized:
            integers = output.int_repr().contiguous()
            rows = integers.view(integers.shape[0], -1)
        else:
            faulty = output.contiguous().clone()
            rows = number_format.patterns(faulty).view(faulty.shape[0], -1)
        if site.index >= rows.shape[1]:
            raise CritnetError(f"activation fault: module {site.parameter!r} has no output element {site.index}")
        rows[:, site.index] = number_format.apply_tensor(rows[:, site.index], site.bit, fault.bit_model, fault.width)
        return requantized(output, integers) if output.is_quantized else faulty

    return hook


def write_fault_list(path: str | Path, faults: Sequence[Fault]) -> Path:
    """Write the fault list (``FAULT_LIST_COLUMNS``), one row per fault.

    >>> import tempfile
    >>> model = nn.Linear(2, 1)
    >>> original = stored_values(model)["weight"].read(1)
    >>> faults = [Fault(0, "bitflip", "weights", (Site("weight", 1, 30),), (original,), width=2)]
    >>> path = write_fault_list(Path(tempfile.mkdtemp()) / "faults.csv", faults)
    >>> read_fault_list(path, model) == faults
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FAULT_LIST_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for fault in faults:
            writer.writerow(fault.list_row())
    return path


def read_fault_list(path: str | Path, model: nn.Module) -> list[Fault]:
    """The faults of a fault list (``faults.csv``, with or without outcome columns), checked against ``model``.

    The original bits are read from ``model`` and must equal the recorded original values, so a list never
    replays onto other weights than the ones it was drawn on (example: :func:`write_fault_list`). Lists without
    ``width`` and ``format`` columns are single-bit float32 faults.

    Raises:
        FaultListError: naming the file and row at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise FaultListError(f"fault list: {path} does not exist")
    stores = stored_values(model)
    modules = dict(model.named_modules())
    faults: list[Fault] = []
    seen: set[int] = set()
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FaultListError(f"fault list: {path} lacks the columns {', '.join(missing)}")
        for number, row in enumerate(reader, 2):
            try:
                faults.append(_fault_from_row(row, stores, modules))
            except (ValueError, KeyError, IndexError, CritnetError) as err:
                raise FaultListError(f"fault list: {path}, line {number}: {err}") from None
            if faults[-1].id in seen:
                raise FaultListError(f"fault list: {path}, line {number}: fault {faults[-1].id} appears twice")
            seen.add(faults[-1].id)
    return faults


def _fault_from_row(row: dict[str, str], stores: dict[str, StoredValues], modules: dict) -> Fault:
    fault_model, target = row["fault_model"], row["target"]
    if fault_model not in FAULT_MODELS or target not in FAULT_TARGETS:
        raise ValueError(f"unknown fault model {fault_model!r} or target {target!r}")
    split = [row[c].split(_SEPARATOR) if row[c] else [] for c in ("parameter", "index", "bit")]
    if len({len(s) for s in split}) != 1:
        raise ValueError("parameter, index and bit list different numbers of sites")
    sites = tuple(Site(p, int(i), int(b)) for p, i, b in zip(*split))
    width = int(row.get("width") or 1)
    number_format = row.get("format") or "float32"
    if number_format not in FORMATS:
        raise ValueError(f"format {number_format!r} is not one of {', '.join(FORMATS)}")
    for site in sites:
        FORMATS[number_format].check_bits(site.bit, width)
        if target == "weights":
            store = weight_store(stores, site.parameter)
            if store.format.name != number_format:
                raise ValueError(f"{site.parameter} stores {store.format.name} values, the list {number_format}")
            if not 0 <= site.index < store.numel:
                raise ValueError(f"{site.parameter} has no element {site.index}")
        elif modules.get(site.parameter) is None:
            raise ValueError(f"the model has no module {site.parameter!r}")
    original = None
    if target == "weights":
        original = tuple(stores[s.parameter].read(s.index) for s in sites)
        recorded = [float(v) for v in row["original"].split(_SEPARATOR)] if row["original"] else []
        actual = [FORMATS[number_format].value(b) for b in original]
        if len(recorded) != len(actual) or any(
            not (a == r or (math.isnan(a) and math.isnan(r))) for a, r in zip(actual, recorded)
        ):
            raise ValueError(f"the original values {recorded} differ from the model's {actual}: another model?")
    return Fault(int(row["fault"]), fault_model, target, sites, original, width, number_format)


__all__ = ["FAULT_LIST_COLUMNS", "Fault", "FaultListError", "Site", "injected",
           "read_fault_list", "weight_store", "write_fault_list"]
