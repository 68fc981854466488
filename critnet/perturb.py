"""Units of a network and reversible perturbations of them (Lightning-free).

A *unit* is what a ranking scores: a whole parameter tensor (``tensor``), one
output channel of a parameter, i.e. the slice ``weight[c]`` along dimension 0
(``channel``: a conv filter, grouped and depthwise ones included, or a linear neuron
— also a Linear inside a transformer block), one output channel of a module's
output, reached through a forward hook (``activation``), or one head of a
multi-head attention module (``head``).

Activation channels: the channel dimension is decided per module from its output:
modules that are channels-first by construction (convolutions, batch and instance
norms) use dimension 1; modules that act on the last dimension (Linear, LayerNorm)
use the last; any other module (ReLU, GELU, Dropout, ...) uses the last dimension
of a rank-3 output (``[batch, tokens, channels]`` in transformers) and dimension 1
otherwise (``[batch, channels, height, width]``, ``[batch, features]``).

Head units: head ``h`` of an attention module with ``num_heads`` heads of width
``d`` is the column block ``proj.weight[:, h*d:(h+1)*d]`` of its output projection
(``out_proj`` of ``nn.MultiheadAttention``, ``proj`` of timm's ``Attention`` and
torchvision's Swin attention, ``o_proj`` of Hugging Face transformers 5 attentions,
``output.dense`` of transformers 4.x ``ViTAttention``-style containers): the heads'
outputs are concatenated head by head before that projection, so zeroing the block
removes exactly head ``h``'s contribution. Other perturbations act on the same block
of weights.

A :class:`Perturbation` is a pure function of a unit's values. :func:`perturbed`
applies it to a model for the duration of a ``with`` block and puts back the
exact original bits afterwards, also when the block raises.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from critnet.choices import LEVELLESS, PERTURBATION_KINDS, UNIT_KINDS, SettingError
from critnet.formats import bit_patterns, format_of
from critnet.storage import packed_weights, quantized_like, requantized

# Output projections of attention modules, in the order they are looked for (torchvision's MaxViT calls it merge,
# Hugging Face transformers 5 o_proj).
_PROJECTION_NAMES = ("out_proj", "proj", "merge", "o_proj")
# Attributes holding an attention module's number of heads (transformers: num_attention_heads).
_HEAD_COUNTS = ("num_heads", "n_heads", "num_attention_heads")
# transformers 4.x splits an attention in two: ViTAttention holds the heads in ``attention`` (Swin: ``self``) and
# the projection after them in ``output.dense``, so the container is the head module.
_SPLIT_HEAD_CHILDREN = ("attention", "self")
_SPLIT_PROJECTION = "output.dense"
# Modules whose output is channels-first whatever its rank.
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.GroupNorm)
# Modules whose channels are the last dimension whatever its rank.
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)


@dataclass(frozen=True, order=True)
class Unit:
    """One scored unit.

    Args:
        kind: ``"tensor"``, ``"channel"``, ``"activation"`` or ``"head"``.
        name: the parameter name for tensor and channel units (``"layer1.0.conv1.weight"``), the module name for
            activation units (``"layer1.0.conv1"``) and head units (the attention module,
            ``"encoder.layers.encoder_layer_0.self_attention"``).
        index: the output channel for channel and activation units, the head for head units; ``None`` for tensor
            units.

    >>> Unit("head", "blocks.0.attn", 3).label
    'blocks.0.attn[3]'
    """

    kind: str
    name: str
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise SettingError(f"unit kind {self.kind!r} is not one of {', '.join(UNIT_KINDS)}")
        if (self.kind == "tensor") != (self.index is None):
            raise SettingError(f"a {self.kind} unit needs {'no index' if self.kind == 'tensor' else 'an index'}: {self!r}")

    @property
    def label(self) -> str:
        return self.name if self.index is None else f"{self.name}[{self.index}]"

    @property
    def layer(self) -> str:
        if self.kind in ("activation", "head"):
            return self.name
        return self.name.rpartition(".")[0]


def activation_channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of ``module``'s ``output`` that holds its channels (see the module docstring).

    >>> activation_channel_dim(nn.GELU(), torch.zeros(2, 5, 8))
    2
    """
    if isinstance(module, _CHANNELS_FIRST):
        return 1
    if isinstance(module, _CHANNELS_LAST) or output.dim() == 3:
        return output.dim() - 1
    return 1


def _head_count(module: nn.Module | None) -> int | None:
    for attribute in _HEAD_COUNTS:
        heads = getattr(module, attribute, None)
        if isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1:
            return heads
    return None


def attention_heads(module: nn.Module) -> tuple[str, int, int] | None:
    """``(projection child name, number of heads, head width)`` of an attention module, or None if ``module`` is
    not one: an ``nn.MultiheadAttention`` or any module with an integer ``num_heads`` (``n_heads``,
    ``num_attention_heads``) and a Linear ``out_proj``, ``proj``, ``merge`` (MaxViT) or ``o_proj`` (Hugging Face
    transformers 5) child whose input features split evenly into the heads; or a transformers 4.x attention
    container (``ViTAttention``), whose ``attention`` (``self``) child holds the heads and whose ``output.dense`` is
    the projection after them.

    >>> attention_heads(nn.MultiheadAttention(16, 4))
    ('out_proj', 4, 4)
    """
    heads = _head_count(module)
    if heads is not None:
        for child in _PROJECTION_NAMES:
            projection = getattr(module, child, None)
            if isinstance(projection, nn.Linear) and projection.in_features % heads == 0:
                return child, heads, projection.in_features // heads
        return None
    for child in _SPLIT_HEAD_CHILDREN:
        heads = _head_count(module._modules.get(child))
        if heads is None:
            continue
        output = module._modules.get(_SPLIT_PROJECTION.partition(".")[0])
        projection = getattr(output, _SPLIT_PROJECTION.partition(".")[2], None)
        if isinstance(projection, nn.Linear) and projection.in_features % heads == 0:
            return _SPLIT_PROJECTION, heads, projection.in_features // heads
    return None


def head_parameter_name(model: nn.Module, unit: Unit) -> str:
    """The name of the output-projection weight a head unit lives in; ValueError naming the unit otherwise."""
    modules = dict(model.named_modules())
    found = attention_heads(modules[unit.name]) if unit.name in modules else None
    if unit.kind != "head" or found is None:
        raise SettingError(f"unit {unit.label}: the model has no attention module named {unit.name!r}")
    child, heads, _ = found
    if not 0 <= unit.index < heads:
        raise SettingError(f"unit {unit.label}: head index out of range for {heads} heads")
    return f"{unit.name}.{child}.weight" if unit.name else f"{child}.weight"


def unit_seed(seed: int, unit: Unit) -> int:
    """The generator seed of a unit's noise draw: a stable function of (seed, unit label), never of ``hash()``.

    32 bits, because torch's CPU generator (mt19937) only uses the low 32 bits of its seed.
    """
    return zlib.crc32(f"{int(seed)}\x00{unit.label}".encode("utf-8"))


@dataclass(frozen=True)
class Perturbation:
    """A perturbation of a unit's values.

    Args:
        kind: ``add`` (add ``level``), ``scale`` (multiply by ``level``), ``noise`` (add Gaussian noise of standard
            deviation ``level``), ``zero`` (ablation), ``sign_flip``, ``bitflip`` (flip bit ``level`` of every stored
            value: 0..31 of a float32, 0..15 of a float16 or bfloat16, 0..7 of a quantized int8 or uint8), ``prune`` (zero the ``level`` fraction of the unit's values with the smallest magnitude).
        level: the amount, see ``kind``; ignored by ``zero`` and ``sign_flip``.
        relative: ``noise`` only: the standard deviation is ``level`` times the (population) standard deviation of
            the unit's values.
        seed: ``noise`` only: the draw for a unit depends on (seed, unit label) only, so it is the same on any
            number of processes and in any order of evaluation.
    """

    kind: str = "add"
    level: float = 0.1
    relative: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise SettingError(f"perturbation: {self.kind!r} is not one of {', '.join(PERTURBATION_KINDS)}")
        if not math.isfinite(float(self.level)):
            raise SettingError(f"level: {self.level!r} is not a finite number")
        if self.kind == "bitflip" and (float(self.level) != int(self.level) or not 0 <= int(self.level) <= 31):
            raise SettingError(f"level: bitflip needs a bit index 0..31 of a stored value, got {self.level!r}")
        if self.kind == "prune" and not 0.0 <= float(self.level) <= 1.0:
            raise SettingError(f"level: prune needs a fraction in [0, 1], got {self.level!r}")
        if self.kind == "noise" and float(self.level) < 0:
            raise SettingError(f"level: noise needs a non-negative standard deviation, got {self.level!r}")
        if self.relative and self.kind != "noise":
            raise SettingError(f"relative: only the noise perturbation has a relative form, not {self.kind!r}")

    @property
    def label(self) -> str:
        if self.kind in LEVELLESS:
            return self.kind
        if self.kind == "bitflip":
            return f"bitflip({int(self.level)})"
        if self.kind == "noise":
            return f"noise({'rel ' if self.relative else ''}{self.level:g}, seed={self.seed})"
        return f"{self.kind}({self.level:g})"

    def check_unit_kind(self, kind: str) -> None:
        """Raise ValueError if this perturbation is not defined for units of ``kind``."""
        if kind == "activation" and self.kind == "noise" and self.relative:
            # The standard deviation of an activation depends on which samples share a batch; a ranking must not.
            raise SettingError("relative: relative noise is defined for weight units (tensor, channel), not activations")

    def apply(self, values: torch.Tensor, unit: Unit) -> torch.Tensor:
        """The perturbed copy of ``values`` (the unit's values; for activation units ``output[:, index]``, batch first).

        For activation units every sample gets the same perturbation pattern (noise drawn over the non-batch
        dimensions, pruning per sample), so a score does not depend on how the samples are batched.
        """
        kind = self.kind
        if kind == "add":
            return values + self.level
        if kind == "scale":
            return values * self.level
        if kind == "zero":
            return torch.zeros_like(values)
        if kind == "sign_flip":
            return -values
        if kind == "bitflip":
            return self.flip_bits(values.contiguous(), unit)
        if kind == "noise":
            self.check_unit_kind(unit.kind)
            shape = values.shape[1:] if unit.kind == "activation" else values.shape
            generator = torch.Generator(device="cpu").manual_seed(unit_seed(self.seed, unit))
            draw = torch.randn(shape, generator=generator, dtype=torch.float32).to(values.device, values.dtype)
            # population std (correction 0): the unit's values are the whole population, and one value gives 0
            sigma = self.level * values.double().std(correction=0).item() if self.relative else self.level
            return values + sigma * draw
        if kind == "prune":
            if unit.kind == "activation":
                flat = values.reshape(values.shape[0], -1)
                return _prune_rows(flat, self.level).reshape(values.shape)
            return _prune_rows(values.reshape(1, -1), self.level).reshape(values.shape)
        raise AssertionError(kind)


    def flip_bits(self, values: torch.Tensor, unit: Unit) -> torch.Tensor:
        """``values`` (a float tensor, or the integers of a quantized one) with bit ``level`` of each flipped."""
        number_format = format_of(values.dtype)
        bit = int(self.level)
        if number_format is None or bit >= number_format.width:
            held = values.dtype if number_format is None else f"{number_format.width}-bit {number_format.name} values"
            raise SettingError(f"level: bit {bit} is not a bit of unit {unit.label}, which holds {held}")
        patterns = values.view(number_format.bits_dtype)
        return number_format.apply_tensor(patterns, bit, "bitflip").view(values.dtype)

    def apply_quantized(self, values: torch.Tensor, unit: Unit, select) -> torch.Tensor:
        """The integers of a quantized tensor ``values`` after the perturbation of the part ``select(tensor)`` picks
        (a view): ``bitflip`` flips the stored integers' bit; any other perturbation acts on the dequantized values,
        which are quantized again with the tensor's own scales (the other values come back as they were)."""
        integers = values.int_repr().contiguous().clone()
        if self.kind == "bitflip":
            part = select(integers)
            part.copy_(self.flip_bits(part.contiguous(), unit))
            return integers
        floats = values.dequantize()
        part = select(floats)
        part.copy_(self.apply(part.clone(), unit))
        select(integers).copy_(select(quantized_like(values, floats).int_repr()))
        return integers


def _prune_rows(rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero the ``fraction`` of each row with the smallest magnitude: exactly floor(fraction·n) values, ties broken
    by position, so the count never depends on equal magnitudes."""
    n = rows.shape[1]
    count = int(math.floor(fraction * n + 1e-9))
    pruned = rows.clone()
    if count == 0:
        return pruned
    order = torch.sort(rows.abs(), dim=1, stable=True).indices[:, :count]
    pruned.scatter_(1, order, 0.0)
    return pruned


def resolve_parameter(model: nn.Module, unit: Unit) -> nn.Parameter:
    """The parameter a tensor, channel or head unit lives in (for a head: the attention's output projection weight);
    ValueError naming the unit if the model has none."""
    if unit.kind == "activation":
        raise SettingError(f"unit {unit.label} is an activation unit, it has no parameter")
    if unit.kind == "head":
        return dict(model.named_parameters())[head_parameter_name(model, unit)]
    params = dict(model.named_parameters())
    if unit.name not in params:
        if unit.name in packed_weights(model):
            raise SettingError(f"unit {unit.label}: {unit.name} is the int8 weight of a quantized layer, which has no "
                               "float parameter (and no gradient): use method exact or naive")
        raise SettingError(f"unit {unit.label}: the model has no parameter named {unit.name!r}")
    param = params[unit.name]
    if unit.index is not None and not 0 <= unit.index < (param.shape[0] if param.dim() else 0):
        raise SettingError(f"unit {unit.label}: index out of range for a parameter of shape {tuple(param.shape)}")
    return param


def check_weight_unit(model: nn.Module, unit: Unit) -> None:
    """A one-line error naming ``unit`` unless the model holds its weights: a parameter, or the packed int8 weight
    of a quantized layer (whose channel index must be in range)."""
    packed = packed_weights(model).get(unit.name) if unit.kind != "head" else None
    if packed is None:
        resolve_parameter(model, unit)
        return
    channels = packed.weight().shape[0]
    if unit.index is not None and not 0 <= unit.index < channels:
        raise SettingError(f"unit {unit.label}: index out of range for a weight of {channels} output channels")


def unit_values(model: nn.Module, unit: Unit, tensor: torch.Tensor) -> torch.Tensor:
    """The view of ``tensor``, shaped like the unit's parameter (the parameter itself, its gradient, …), that a
    tensor, channel or head unit covers: all of it, row ``index``, or head ``index``'s block of input columns.

    >>> model = nn.MultiheadAttention(8, 2)
    >>> unit_values(model, Unit("head", "", 1), model.out_proj.weight.detach()).shape
    torch.Size([8, 4])
    """
    if unit.kind == "head":
        width = attention_heads(resolve_head_module(model, unit))[2]
        return tensor[:, unit.index * width : (unit.index + 1) * width]
    return tensor if unit.index is None else tensor[unit.index]


def resolve_module(model: nn.Module, unit: Unit) -> nn.Module:
    """The module an activation unit lives in; ValueError naming the unit if the model has none."""
    modules = dict(model.named_modules())
    if unit.kind != "activation" or unit.name not in modules:
        raise SettingError(f"unit {unit.label}: the model has no module named {unit.name!r}")
    return modules[unit.name]


def resolve_head_module(model: nn.Module, unit: Unit) -> nn.Module:
    """The attention module a head unit lives in; ValueError naming the unit if the model has none."""
    head_parameter_name(model, unit)
    return dict(model.named_modules())[unit.name]


@contextmanager
def perturbed(model: nn.Module, unit: Unit, perturbation: Perturbation) -> Iterator[None]:
    """Perturb one unit of ``model`` inside the ``with`` block.

    Tensor, channel and head units are written in place under ``no_grad`` and their exact original bits are put
    back on exit (also on exceptions). Activation units get a forward hook that replaces the channel ``index`` of the
    output (along :func:`activation_channel_dim`); it is removed on exit.

    >>> model = nn.MultiheadAttention(8, 2)
    >>> with perturbed(model, Unit("head", "", 1), Perturbation("zero")):
    ...     model.out_proj.weight[:, 4:].abs().sum().item()
    0.0
    """
    perturbation.check_unit_kind(unit.kind)
    if unit.kind == "activation":
        module = resolve_module(model, unit)
        index = unit.index

        def hook(hooked, _inputs, output):
            dim = activation_channel_dim(hooked, output) if isinstance(output, torch.Tensor) else 1
            if not isinstance(output, torch.Tensor) or output.dim() < 2 or index >= output.shape[dim]:
                raise SettingError(f"unit {unit.label}: module output has no channel {index}")
            if output.is_quantized:  # the quantized output's integers change, its scale and zero point stay
                return requantized(output, perturbation.apply_quantized(output, unit, lambda t: t.select(dim, index)))
            output = output.clone()
            channel = output.select(dim, index)
            channel.copy_(perturbation.apply(channel, unit))
            return output

        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        return

    packed = packed_weights(model).get(unit.name) if unit.kind != "head" else None
    if packed is not None:
        check_weight_unit(model, unit)
        weight, bias = packed.weight(), packed.bias()
        try:
            faulty = perturbation.apply_quantized(weight, unit, lambda t: unit_values(model, unit, t))
            packed.set_weight_bias(requantized(weight, faulty), bias)
            yield
        finally:
            packed.set_weight_bias(weight, bias)  # the original quantized tensor: the same integers and scales
        return

    target = unit_values(model, unit, resolve_parameter(model, unit).detach())
    saved = target.clone()
    try:
        with torch.no_grad():
            target.copy_(perturbation.apply(saved, unit))
        yield
    finally:
        with torch.no_grad():
            # Through an integer view so that NaN payloads and signed zeros come back bit for bit.
            bit_patterns(target).copy_(bit_patterns(saved))
