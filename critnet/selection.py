"""Which parts of a network an analysis works on: one :class:`Selection` for rankings, fault campaigns and pruning."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from critnet.choices import UNIT_KINDS, SettingError
from critnet.modes import evaluation_mode
from critnet.perturb import Unit, activation_channel_dim, attention_heads
from critnet.storage import packed_weights


# What each kind of unit selects when include / module_types are None.
_DEFAULT_INCLUDE = {"tensor": ("weight",), "channel": ("weight",), "activation": None, "head": None}
_DEFAULT_MODULE_TYPES = {"tensor": None, "channel": ("Conv2d", "Linear"), "activation": ("Conv2d", "Linear"),
                         "head": None}
# Attributes that tell how many output channels a module produces without running it.
_OUT_CHANNEL_ATTRIBUTES = ("out_channels", "out_features", "num_features", "embedding_dim")


def _compile(patterns: Sequence[str] | None, option: str) -> list[re.Pattern[str]] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise SettingError(f"{option}: {pattern!r} is not a valid regular expression ({err})") from None
    return compiled


def _matches(name: str, include: list[re.Pattern[str]] | None, exclude: list[re.Pattern[str]]) -> bool:
    if include is not None and not any(p.search(name) for p in include):
        return False
    return not any(p.search(name) for p in exclude)


def _check_module_types(model: nn.Module, module_types: Sequence[str] | None) -> set[str] | None:
    if module_types is None:
        return None
    if isinstance(module_types, str):
        module_types = [module_types]
    present = set().union(*(module_type_names(m) for m in model.modules()))
    for type_name in module_types:
        if type_name not in present and not isinstance(getattr(nn, type_name, None), type):
            raise SettingError(
                f"module_types: {type_name!r} is neither a torch.nn module class nor a module type in this model "
                f"(present: {', '.join(sorted(present))})"
            )
    return set(module_types)


def _as_names(key: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    for position, name in enumerate(names):
        if not isinstance(name, str):
            raise SettingError(f"{key}[{position}]: {name!r} is not a string")
    return names


@dataclass(eq=False)
class Selection:
    """Which parts of a network an analysis works on: the same three keys for rankings, fault campaigns and pruning.

    Args:
        include: regular expressions searched in the names (parameter names for tensor and channel units and
            weight faults, module names otherwise); a name is kept if any matches. ``None``: the analysis's default.
        exclude: regular expressions; a name matching any of them is dropped.
        module_types: class names of the owning modules (``["Conv2d", "Linear"]``). ``None``: the analysis's
            default.

    A bad pattern or a non-string raises a one-line :class:`~critnet.choices.SettingError` naming the key. The
    settings of every analysis (:class:`~critnet.analyses.ranking.RankSettings`, …) build on it.

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    >>> [unit.label for unit in Selection(include=["weight"], module_types=["Conv2d"]).units(model, "tensor")]
    ['0.weight']
    >>> [name for name, _ in Selection(exclude=["^3$"]).modules(model, ("Conv2d", "LazyLinear"))]
    ['0']
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    module_types: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.include = _as_names("include", self.include)
        self.exclude = _as_names("exclude", self.exclude) or ()
        self.module_types = _as_names("module_types", self.module_types)
        _compile(self.include, "include")
        _compile(self.exclude, "exclude")

    def units(self, model: nn.Module, kind: str, example_input: torch.Tensor | None = None) -> list[Unit]:
        """The units of ``kind`` this selection picks from ``model``: :func:`select_units`."""
        return select_units(model, kind, self.include, self.exclude, self.module_types, example_input)

    def modules(self, model: nn.Module, default_types: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the modules whose names it keeps and whose class is one of ``module_types`` (or
        ``default_types`` when that is ``None``; ``None`` for both: any class), in model order."""
        include, exclude = _compile(self.include, "include"), _compile(self.exclude, "exclude") or []
        types = _check_module_types(model, self.module_types if self.module_types is not None else default_types)
        return [(name, module) for name, module in model.named_modules()
                if name and _matches(name, include, exclude) and (types is None or module_type_names(module) & types)]

    def names(self, model: nn.Module, owners: dict[str, nn.Module], default_include: Sequence[str] | None = None,
              default_types: Sequence[str] | None = None) -> list[str]:
        """The names of ``owners`` (a name → the module owning it) that it keeps, in their order; ``default_*``
        stand in for ``include`` / ``module_types`` when those are ``None``.

        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> Selection(include=["weight"]).names(model, {"0.weight": model[0], "1.weight": model[1]},
        ...                                     default_types=["Conv2d"])
        ['0.weight']
        """
        include = _compile(self.include if self.include is not None else default_include, "include")
        exclude = _compile(self.exclude, "exclude") or []
        types = _check_module_types(model, self.module_types if self.module_types is not None else default_types)
        kept = [name for name, owner in owners.items()
                if _matches(name, include, exclude) and (types is None or module_type_names(owner) & types)]
        if not kept:
            raise SettingError(f"the selection is empty: include={self.include!r}, exclude={list(self.exclude)!r}, "
                               f"module_types={self.module_types!r} match none of {type(model).__name__}'s "
                               f"{len(owners)} candidates")
        return kept

    def as_dict(self) -> dict[str, list[str] | None]:
        """The selection as the JSON records of every analysis keep it."""
        return {"include": None if self.include is None else list(self.include), "exclude": list(self.exclude),
                "module_types": None if self.module_types is None else list(self.module_types)}


def module_type_names(module: nn.Module) -> set[str]:
    """The class names ``module_types`` matches ``module`` by: its own class's, and for a ``torch.ao`` quantized
    layer also the quantized layer classes it derives from (a fused ``ConvReLU2d`` is a quantized ``Conv2d``), so
    one selection picks the same layers of a float model and of its quantized copy."""
    names = {type(module).__name__}
    for cls in type(module).__mro__[1:]:
        if cls.__module__.startswith("torch.ao.nn.quantized"):
            names.add(cls.__name__)
    return names


def _owner(modules: dict[str, nn.Module], param_name: str) -> nn.Module:
    return modules[param_name.rpartition(".")[0]]


def _activation_channels(name: str, module: nn.Module, example_input: torch.Tensor | None) -> int:
    for attribute in _OUT_CHANNEL_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    raise SettingError(
        f"activation units: cannot tell how many output channels module {name!r} ({type(module).__name__}) has; "
        "pass example_input or restrict module_types to modules with out_channels/out_features/num_features"
    )


def _probe_activation_channels(model: nn.Module, names: list[str], example_input: torch.Tensor) -> dict[str, int]:
    """The output channels of each of the modules ``names`` that the model calls on ``example_input`` (one forward
    pass in eval mode, so no BatchNorm statistic moves); modules it never calls are absent."""
    modules = dict(model.named_modules())
    channels: dict[str, int] = {}
    handles = []

    def recorder(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise SettingError(f"activation units: module {name!r} does not output a (batch, channel, ...) tensor")
            channels[name] = output.shape[activation_channel_dim(_module, output)]

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(recorder(name)))
        with torch.no_grad(), evaluation_mode(model, deterministic=False):
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return channels


def select_units(
    model: nn.Module,
    kind: str = "tensor",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Sequence[str] | None = None,
    example_input: torch.Tensor | None = None,
) -> list[Unit]:
    """The units of ``model`` to score, in model order (then channel index).

    Args:
        model: the network.
        kind: ``tensor``, ``channel``, ``activation`` or ``head``.
        include: regular expressions searched in the parameter name (tensor, channel) or the module name
            (activation, head); a name is kept if any matches. Default: ``["weight"]`` for tensor and channel units
            (the original experiment: every parameter whose name contains ``weight``), everything for activations
            and heads.
        exclude: regular expressions; a name matching any of them is dropped.
        module_types: class names of the owning module (e.g. ``["Conv2d", "Linear"]``; subclasses such as
            ``NonDynamicallyQuantizableLinear`` are matched by their own name). Default: any for tensor units,
            ``["Conv2d", "Linear"]`` for channel and activation units, every attention module for head units.
        example_input: an input batch for activation units: the model is run once on it (in eval mode) to read
            each module's output channels and to leave out modules it never calls. Without it only modules that
            declare their channels (``out_channels``, ``out_features``, ``num_features``) can be selected.

    Raises:
        ValueError: unknown kind or module type, an invalid regular expression, or an empty selection.

    >>> encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, nhead=4, batch_first=True), num_layers=2)
    >>> units = select_units(encoder, "head")
    >>> len(units), units[0].label
    (8, 'layers.0.self_attn[0]')
    """
    if kind not in UNIT_KINDS:
        raise SettingError(f"kind: {kind!r} is not one of {', '.join(UNIT_KINDS)}")
    include_patterns = _compile(include if include is not None else _DEFAULT_INCLUDE[kind], "include")
    exclude_patterns = _compile(list(exclude or ()), "exclude") or []
    types = _check_module_types(model, module_types if module_types is not None else _DEFAULT_MODULE_TYPES[kind])
    modules = dict(model.named_modules())

    units: list[Unit] = []
    if kind in ("tensor", "channel"):
        # a quantized layer's int8 weight lives in packed parameters: it is a unit under its float name too
        weights = dict(model.named_parameters())
        weights.update({name: module.weight() for name, module in packed_weights(model).items()
                        if name not in weights})
        for name, param in weights.items():
            if not _matches(name, include_patterns, exclude_patterns):
                continue
            if types is not None and not module_type_names(_owner(modules, name)) & types:
                continue
            if kind == "tensor":
                units.append(Unit("tensor", name))
            elif param.dim() >= 1:
                units.extend(Unit("channel", name, c) for c in range(param.shape[0]))
    elif kind == "head":
        for name, module in model.named_modules():
            found = attention_heads(module)
            if found is None or not _matches(name, include_patterns, exclude_patterns):
                continue
            if types is not None and not module_type_names(module) & types:
                continue
            units.extend(Unit("head", name, h) for h in range(found[1]))
    else:
        names = [
            name
            for name, module in model.named_modules()
            if name
            and _matches(name, include_patterns, exclude_patterns)
            and (types is None or module_type_names(module) & types)
        ]
        if example_input is None:
            declared = {name: _activation_channels(name, modules[name], None) for name in names}
        else:
            # The forward pass says which modules are called at all: a module whose weight the model reads
            # functionally (Swin's attn.qkv and attn.proj) is never called, so a hook on it would never fire and
            # its "units" would score zero.
            declared = _probe_activation_channels(model, names, example_input)
            uncalled = [name for name in names if name not in declared]
            if uncalled and len(uncalled) < len(names):
                warnings.warn(f"activation units: {len(uncalled)} selected modules are never called in the forward "
                              f"pass in eval mode and are left out (e.g. {uncalled[0]!r}: the model reads its weights "
                              "directly, or calls it only in training)", stacklevel=2)
            elif uncalled:
                raise SettingError(f"activation units: the selected modules {uncalled[:3]} are never called in the "
                                   "model's forward pass")
        for name in names:
            units.extend(Unit("activation", name, c) for c in range(declared.get(name, 0)))

    if not units:
        raise SettingError(
            f"the selection is empty: kind={kind!r}, include={include!r}, exclude={list(exclude or ())!r}, "
            f"module_types={module_types!r} match no {'parameter' if kind in ('tensor', 'channel') else 'module'} of "
            f"{type(model).__name__}"
        )
    return units
