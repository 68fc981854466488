"""Fault models and their reversible injection (Lightning-free).

A :class:`Fault` is one injection trial: one or more :class:`Site`\\ s (a float32 value named by parameter or module,
flat index and bit) and a fault model — a bit flip, stuck-at-0, stuck-at-1, or a bit-error-rate draw (several flips
at once). Weight faults are written into the parameter through an integer view and the original bits are put back
on exit, also when the evaluation raises, so NaN payloads and signed zeros survive. Activation faults live in a
forward hook that is removed on exit.
"""

from __future__ import annotations

import csv
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from critnet.choices import FAULT_MODELS, FAULT_TARGETS, SettingError
from critnet.errors import CritnetError


#: The columns of the fault list in ``faults.csv`` (enough to replay it).
FAULT_LIST_COLUMNS = ("fault", "fault_model", "target", "parameter", "index", "bit", "original", "faulty")
_SEPARATOR = ";"  # several sites of one fault (bit-error-rate draws) share one row


class FaultListError(CritnetError):
    """A fault list (``faults.csv``) that cannot be read back or does not fit the model."""


@dataclass(frozen=True, order=True)
class Site:
    """One float32 value and one of its bits.

    Args:
        parameter: the parameter name (weight faults) or the module name (activation faults: its output).
        index: the flat index into the parameter, or into one image's output of the module.
        bit: 0 (lowest mantissa bit) … 31 (sign).
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
        original_bits: the int32 bit patterns of the sites before the fault (weights only; None for activations,
            whose values change with every image).

    >>> fault = Fault(0, "bitflip", "weights", (Site("fc.weight", 3, 30),), (0x3F800000,))
    >>> fault.faulty_bits
    (2139095040,)
    """

    id: int
    fault_model: str
    target: str
    sites: tuple[Site, ...]
    original_bits: tuple[int, ...] | None = None

    @property
    def faulty_bits(self) -> tuple[int, ...] | None:
        if self.original_bits is None:
            return None
        model = "bitflip" if self.fault_model == "ber" else self.fault_model
        return tuple(apply_fault_bit(bits, site.bit, model) for bits, site in zip(self.original_bits, self.sites))

    @property
    def is_identity(self) -> bool:
        """The fault leaves every bit as it was (stuck-at on a bit that already holds the value, or no site)."""
        return not self.sites or (self.original_bits is not None and self.faulty_bits == self.original_bits)

    @property
    def parameter(self) -> str:
        return _SEPARATOR.join(dict.fromkeys(s.parameter for s in self.sites))

    def list_row(self) -> dict[str, object]:
        """The fault's row of the fault list (values as Python floats, several sites joined by ``;``)."""
        def values(bits: tuple[int, ...] | None) -> str:
            return "" if bits is None else _SEPARATOR.join(repr(bits_to_float(b)) for b in bits)

        return {
            "fault": self.id,
            "fault_model": self.fault_model,
            "target": self.target,
            "parameter": _SEPARATOR.join(s.parameter for s in self.sites),
            "index": _SEPARATOR.join(str(s.index) for s in self.sites),
            "bit": _SEPARATOR.join(str(s.bit) for s in self.sites),
            "original": values(self.original_bits),
            "faulty": values(self.faulty_bits),
        }


def bit_mask(bit: int) -> int:
    """The int32 mask of ``bit`` (bit 31 is the sign, a negative int32)."""
    return -(1 << 31) if bit == 31 else 1 << bit


def apply_fault_bit(bits: int, bit: int, fault_model: str) -> int:
    """The int32 pattern ``bits`` after ``fault_model`` strikes ``bit``.

    >>> apply_fault_bit(0, 31, "bitflip")  # 0.0 -> -0.0
    -2147483648
    """
    mask = bit_mask(bit)
    if fault_model == "bitflip":
        return _int32(bits ^ mask)
    if fault_model == "stuck_at_0":
        return _int32(bits & ~mask)
    if fault_model == "stuck_at_1":
        return _int32(bits | mask)
    raise ValueError(f"fault_model: {fault_model!r} is not one of {', '.join(FAULT_MODELS)}")


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def apply_fault_bits_tensor(values: torch.Tensor, bit: int, fault_model: str) -> torch.Tensor:
    """``values`` (an int32 view) after ``fault_model`` strikes ``bit`` of every element."""
    mask = torch.tensor(bit_mask(bit), dtype=torch.int32, device=values.device)
    if fault_model in ("bitflip", "ber"):
        return values ^ mask
    if fault_model == "stuck_at_0":
        return values & ~mask
    if fault_model == "stuck_at_1":
        return values | mask
    raise ValueError(f"fault_model: {fault_model!r} is not one of {', '.join(FAULT_MODELS)}")


def int_view(parameter: torch.Tensor, name: str) -> torch.Tensor:
    """The flat int32 view of a float32 parameter (shares its storage)."""
    if parameter.dtype != torch.float32:
        raise SettingError(f"include: {name} holds {parameter.dtype}; bit faults are defined for float32 values")
    if not parameter.is_contiguous():
        raise SettingError(f"include: {name} is not contiguous in memory; its flat indices would be ambiguous")
    return parameter.detach().view(-1).view(torch.int32)


@contextmanager
def injected(model: nn.Module, fault: Fault) -> Iterator[None]:
    """The model with ``fault`` in place for the ``with`` block; the exact original bits come back on exit.

    >>> model = nn.Linear(2, 1)
    >>> with injected(model, Fault(0, "bitflip", "weights", (Site("weight", 0, 31),))):
    ...     pass
    """
    if fault.target == "activations":
        with ExitStack() as stack:
            modules = dict(model.named_modules())
            for site in fault.sites:
                handle = modules[site.parameter].register_forward_hook(_activation_hook(site, fault.fault_model))
                stack.callback(handle.remove)
            yield
        return
    parameters = dict(model.named_parameters())
    views = [int_view(parameters[site.parameter], site.parameter) for site in fault.sites]
    saved = [int(view[site.index]) for view, site in zip(views, fault.sites)]
    model_of = "bitflip" if fault.fault_model == "ber" else fault.fault_model
    try:
        with torch.no_grad():
            for view, site, bits in zip(views, fault.sites, saved):
                view[site.index] = apply_fault_bit(bits, site.bit, model_of)
        yield
    finally:
        with torch.no_grad():
            # restored in reverse so that two sites on one value (never drawn, but allowed) unwind correctly
            for view, site, bits in reversed(list(zip(views, fault.sites, saved))):
                view[site.index] = bits


def _activation_hook(site: Site, fault_model: str):
    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.dtype != torch.float32:
            raise CritnetError(f"activation fault: module {site.parameter!r} does not output a float32 tensor")
        faulty = output.contiguous().clone()
        rows = faulty.view(faulty.shape[0], -1).view(torch.int32)
        if site.index >= rows.shape[1]:
            raise CritnetError(f"activation fault: module {site.parameter!r} has no output element {site.index}")
        rows[:, site.index] = apply_fault_bits_tensor(rows[:, site.index], site.bit, fault_model)
        return faulty

    return hook


def write_fault_list(path: str | Path, faults: Sequence[Fault]) -> Path:
    """Write the fault list (``FAULT_LIST_COLUMNS``), one row per fault.

    >>> import tempfile
    >>> model = nn.Linear(2, 1)
    >>> faults = [Fault(0, "bitflip", "weights", (Site("weight", 1, 30),), (int(int_view(model.weight, "weight")[1]),))]
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
    replays onto other weights than the ones it was drawn on (example: :func:`write_fault_list`).

    Raises:
        FaultListError: naming the file and row at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise FaultListError(f"fault list: {path} does not exist")
    parameters = dict(model.named_parameters())
    modules = dict(model.named_modules())
    faults: list[Fault] = []
    seen: set[int] = set()
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in FAULT_LIST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FaultListError(f"fault list: {path} lacks the columns {', '.join(missing)}")
        for number, row in enumerate(reader, 2):
            try:
                faults.append(_fault_from_row(row, parameters, modules))
            except (ValueError, KeyError, IndexError) as err:
                raise FaultListError(f"fault list: {path}, line {number}: {err}") from None
            if faults[-1].id in seen:
                raise FaultListError(f"fault list: {path}, line {number}: fault {faults[-1].id} appears twice")
            seen.add(faults[-1].id)
    return faults


def _fault_from_row(row: dict[str, str], parameters: dict, modules: dict) -> Fault:
    fault_model, target = row["fault_model"], row["target"]
    if fault_model not in FAULT_MODELS or target not in FAULT_TARGETS:
        raise ValueError(f"unknown fault model {fault_model!r} or target {target!r}")
    split = [row[c].split(_SEPARATOR) if row[c] else [] for c in ("parameter", "index", "bit")]
    if len({len(s) for s in split}) != 1:
        raise ValueError("parameter, index and bit list different numbers of sites")
    sites = tuple(Site(p, int(i), int(b)) for p, i, b in zip(*split))
    for site in sites:
        if not 0 <= site.bit <= 31:
            raise ValueError(f"bit {site.bit} is not in 0..31")
        if (parameters if target == "weights" else modules).get(site.parameter) is None:
            raise ValueError(f"the model has no {'parameter' if target == 'weights' else 'module'} {site.parameter!r}")
    original = None
    if target == "weights":
        original = tuple(int(int_view(parameters[s.parameter], s.parameter)[s.index]) for s in sites)
        recorded = [float(v) for v in row["original"].split(_SEPARATOR)] if row["original"] else []
        actual = [bits_to_float(b) for b in original]
        if len(recorded) != len(actual) or any(
            not (a == r or (math.isnan(a) and math.isnan(r))) for a, r in zip(actual, recorded)
        ):
            raise ValueError(f"the original values {recorded} differ from the model's {actual}: another model?")
    return Fault(int(row["fault"]), fault_model, target, sites, original)


__all__ = ["FAULT_LIST_COLUMNS", "Fault", "FaultListError", "Site", "apply_fault_bit", "bits_to_float", "injected",
           "read_fault_list", "write_fault_list"]
