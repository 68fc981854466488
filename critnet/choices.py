"""Every set of choices critnet offers, declared once.

Each choice set is a ``Literal`` type (what LightningCLI and type checkers read) and the runtime tuple derived
from it with ``typing.get_args`` (what the library validates against), so the two can never drift apart.

The settings of each analysis are a dataclass whose fields use these types (``RankSettings``, ``SweepSettings``,
``CampaignSettings``, built on :class:`critnet.selection.Selection`); each Lightning callback is a dataclass built
on its analysis's settings, so its command-line arguments are the settings themselves, and the analysis's JSON
record derives from the same fields. A settings object checks itself when built: a bad value raises a one-line
:class:`SettingError` naming the key, the value and what is allowed. The modules that declare them keep real
annotations (no ``from __future__ import annotations``): jsonargparse validates a dataclass field only when its
annotation is a real type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

from critnet.errors import CritnetError

UnitKind = Literal["tensor", "channel", "activation", "head"]
PerturbationKind = Literal["add", "scale", "noise", "zero", "sign_flip", "bitflip", "prune"]
Score = Literal["loss", "delta_loss", "top1_drop", "top5_drop"]
Method = Literal["exact", "naive", "taylor", "hybrid", "halving"]
TaylorOrder = Literal[1, 2]
#: The confidence bounds of ``method="halving"``: ``betting`` holds in finite samples, ``normal`` is nominal.
Bound = Literal["betting", "normal"]
PruneMethod = Literal["connections", "neurons", "weights"]
PruneScope = Literal["global", "layerwise"]
ChannelOrder = Literal["criticality", "l1", "random"]
CriticalityMethod = Literal["exact", "naive"]
CriticalitySplit = Literal["val", "train"]
Stage = Literal["fit", "validate"]
#: What a fault campaign injects into: parameters, or module outputs through a forward hook.
FaultTarget = Literal["weights", "activations"]
FaultModel = Literal["bitflip", "stuck_at_0", "stuck_at_1", "ber"]
#: What a fault campaign samples (and sizes) separately: each layer, or each layer and bit position.
StratifyKey = Literal["layer", "bit"]

UNIT_KINDS: tuple[str, ...] = get_args(UnitKind)
PERTURBATION_KINDS: tuple[str, ...] = get_args(PerturbationKind)
SCORES: tuple[str, ...] = get_args(Score)
METHODS: tuple[str, ...] = get_args(Method)
TAYLOR_ORDERS: tuple[int, ...] = get_args(TaylorOrder)
BOUNDS: tuple[str, ...] = get_args(Bound)
PRUNE_METHODS: tuple[str, ...] = get_args(PruneMethod)
PRUNE_SCOPES: tuple[str, ...] = get_args(PruneScope)
CHANNEL_ORDERS: tuple[str, ...] = get_args(ChannelOrder)
CRITICALITY_METHODS: tuple[str, ...] = get_args(CriticalityMethod)
CRITICALITY_SPLITS: tuple[str, ...] = get_args(CriticalitySplit)
STAGES: tuple[str, ...] = get_args(Stage)
FAULT_TARGETS: tuple[str, ...] = get_args(FaultTarget)
FAULT_MODELS: tuple[str, ...] = get_args(FaultModel)
STRATIFY_KEYS: tuple[str, ...] = get_args(StratifyKey)
#: Perturbations that ignore their level (one ranking, not one per level).
LEVELLESS: tuple[str, ...] = ("zero", "sign_flip")


class SettingError(CritnetError):
    """A setting with a value outside what is allowed; the message names the key, the value and the choices."""


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``; otherwise a :class:`SettingError` naming ``key``.

    >>> check_choice("unit", "channel", UNIT_KINDS)
    'channel'
    """
    if isinstance(value, bool) or value not in allowed:
        raise SettingError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    return value


def _number(key: str, value: Any, expected: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{key}: {value!r} is not {expected}") from None


def check_fraction(key: str, value: Any) -> float:
    """``value`` as a float in [0, 1] (NaN is refused); otherwise a :class:`SettingError` naming ``key``.

    >>> check_fraction("p_bern", 0.5)
    0.5
    """
    number = _number(key, value, "a number in [0, 1]")
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise SettingError(f"{key}: {value!r} is outside [0, 1]")
    return number


def check_probability(key: str, value: Any) -> float:
    """``value`` as a float strictly between 0 and 1; otherwise a :class:`SettingError` naming ``key``.

    >>> check_probability("top_k_confidence", 0.99)
    0.99
    """
    number = check_fraction(key, value)
    if not 0.0 < number < 1.0:
        raise SettingError(f"{key}: {value!r} is not allowed; expected a probability strictly between 0 and 1")
    return number


def check_fractions(key: str, values: Any) -> list[float]:
    """A non-empty list of fractions in [0, 1]; a single number counts as a list of one."""
    if isinstance(values, (int, float)):
        values = [values]
    checked = [check_fraction(f"{key}[{i}]", v) for i, v in enumerate(values)]
    if not checked:
        raise SettingError(f"{key}: must list at least one value in [0, 1]")
    return checked


def check_finite(key: str, value: Any) -> float:
    """``value`` as a finite float; otherwise a :class:`SettingError` naming ``key``."""
    number = _number(key, value, "a number")
    if not math.isfinite(number):
        raise SettingError(f"{key}: {value!r} is not a finite number")
    return number


def check_positive_number(key: str, value: Any) -> float:
    """``value`` as a finite float > 0; otherwise a :class:`SettingError` naming ``key``.

    >>> check_positive_number("delta_loss_clip", 20)
    20.0
    """
    number = check_finite(key, value)
    if not number > 0:
        raise SettingError(f"{key}: {value!r} is not a number > 0")
    return number


def check_positive_int(key: str, value: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int ≥ ``minimum`` (or None when allowed); otherwise a :class:`SettingError` naming ``key``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise SettingError(f"{key}: {value!r} is not {allowed}")
    return value


def field_values(settings: Any, cls: type) -> dict[str, Any]:
    """The init fields of the settings dataclass ``cls``, read from ``settings``: an instance of ``cls`` or of a
    class built on it, such as the Lightning callback that carries an analysis's settings as its own arguments.

    >>> @dataclasses.dataclass
    ... class Settings:
    ...     top_k: int = 20
    >>> field_values(Settings(5), Settings)
    {'top_k': 5}
    """
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(cls) if field.init}
