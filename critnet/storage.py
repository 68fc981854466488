"""What a model stores, by name, with its number format: where weight faults land and weight perturbations act.

A float parameter (float32, float16, bfloat16) is read and written through an integer view of its own storage. A
quantized conv or linear layer of ``torch.ao`` (what :func:`critnet.quantize_int8` produces, and torchvision's
quantized classifiers) holds its int8 weight inside packed parameters, out of reach of a view: its values are read
from ``module.weight()`` and a changed weight is packed again with ``module.set_weight_bias``, under the name
``<module>.weight`` a float model gives the same weight; its scales and zero points are stored values too
(``<module>.weight_scale``, float32; ``<module>.weight_zero_point``, int8), selected only when asked for. Each stored array is a :class:`StoredValues`, whatever holds
it; :func:`stored_values` finds them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from critnet.choices import SettingError
from critnet.formats import FORMATS, NumberFormat, format_of


@dataclass
class StoredValues:
    """One named array of stored values a fault can strike.

    Args:
        name: the parameter name (``layer1.0.conv1.weight``).
        module: the module that owns it (its class decides ``module_types`` selections).
        format: the number format the values are stored in.
        shape: the array's shape (for a conv weight: output channels first).
    """

    name: str
    module: nn.Module
    format: NumberFormat
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def read(self, index: int) -> int:
        """The bit pattern of flat element ``index``."""
        raise NotImplementedError

    def write(self, updates: dict[int, int]) -> None:
        """Store the patterns ``{flat index: pattern}`` where the model reads them."""
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        """The values as the model computes with them (a float tensor; quantized weights as a quantized tensor)."""
        raise NotImplementedError


@dataclass
class ParameterValues(StoredValues):
    """A float parameter, written in place through an integer view of its storage."""

    parameter: torch.Tensor = None

    def _view(self) -> torch.Tensor:
        if not self.parameter.is_contiguous():
            raise SettingError(f"include: {self.name} is not contiguous in memory; its flat indices would be "
                               "ambiguous")
        return self.format.patterns(self.parameter)

    def read(self, index: int) -> int:
        return int(self._view()[index])

    def write(self, updates: dict[int, int]) -> None:
        view = self._view()
        with torch.no_grad():
            for index, pattern in updates.items():
                view[index] = pattern

    def values(self) -> torch.Tensor:
        return self.parameter.detach()


@dataclass
class PackedWeightValues(StoredValues):
    """The int8 weight of a ``torch.ao`` quantized conv or linear layer (per-tensor or per-channel scales)."""

    def read(self, index: int) -> int:
        return int(self.module.weight().int_repr().reshape(-1)[index])

    def write(self, updates: dict[int, int]) -> None:
        weight = self.module.weight()
        integers = weight.int_repr().clone()
        flat = integers.view(-1)
        for index, pattern in updates.items():
            flat[index] = pattern
        self.module.set_weight_bias(requantized(weight, integers), self.module.bias())

    def values(self) -> torch.Tensor:
        return self.module.weight()


@dataclass
class QuantizationParameterValues(StoredValues):
    """The scales (float32) or zero points (int8) of a ``torch.ao`` quantized layer's weight, one per output
    channel (one for a per-tensor weight): its quantization metadata, named ``<module>.weight_scale`` and
    ``<module>.weight_zero_point``. A changed value is packed again with the weight's integers as they were."""

    kind: str = "scale"  # or "zero_point"

    @property
    def _position(self) -> int:
        return 0 if self.kind == "scale" else 1

    def read(self, index: int) -> int:
        value = quantization_parameters(self.module.weight())[self._position][index]
        return self.format.pattern(float(value)) if self.kind == "scale" else int(value)

    def write(self, updates: dict[int, int]) -> None:
        weight = self.module.weight()
        parameters = list(quantization_parameters(weight))
        changed = parameters[self._position] = parameters[self._position].clone()
        for index, pattern in updates.items():
            changed[index] = self.format.value(pattern) if self.kind == "scale" else pattern
        self.module.set_weight_bias(quantized_from(weight, weight.int_repr(), *parameters), self.module.bias())

    def values(self) -> torch.Tensor:
        return quantization_parameters(self.module.weight())[self._position]


def _per_channel(tensor: torch.Tensor) -> bool:
    return tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)


def quantization_parameters(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized tensor's scales (float64) and zero points, per channel or as one-element tensors."""
    if _per_channel(weight):
        return weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    return torch.tensor([weight.q_scale()], dtype=torch.float64), torch.tensor([weight.q_zero_point()])


def quantized_from(like: torch.Tensor, integers: torch.Tensor, scales: torch.Tensor,
                   zero_points: torch.Tensor) -> torch.Tensor:
    """A quantized tensor of ``like``'s scheme (per channel along its axis, or per tensor) holding ``integers``
    with ``scales`` and ``zero_points``."""
    if _per_channel(like):
        return torch._make_per_channel_quantized_tensor(integers, scales, zero_points, like.q_per_channel_axis())
    return torch._make_per_tensor_quantized_tensor(integers, float(scales[0]), int(zero_points[0]))


def requantized(like: torch.Tensor, integers: torch.Tensor) -> torch.Tensor:
    """A quantized tensor with ``like``'s scales, zero points and dtype holding ``integers``."""
    return quantized_from(like, integers, *quantization_parameters(like))


def quantized_like(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (floats) quantized with ``like``'s scales, zero points and dtype."""
    if _per_channel(like):
        return torch.quantize_per_channel(values, like.q_per_channel_scales(), like.q_per_channel_zero_points(),
                                          like.q_per_channel_axis(), like.dtype)
    return torch.quantize_per_tensor(values, like.q_scale(), like.q_zero_point(), like.dtype)


def packed_weights(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<module>.weight": module}`` for the ``torch.ao`` quantized layers of ``model``, in model order.

    >>> packed_weights(nn.Linear(2, 1))
    {}
    """
    return {f"{name}.weight" if name else "weight": module for name, module in model.named_modules()
            if _packed_weight(module) is not None}


def _packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The quantized weight of a ``torch.ao`` quantized layer, or None for any other module."""
    if not (callable(getattr(module, "weight", None)) and hasattr(module, "set_weight_bias")):
        return None
    weight = module.weight()
    return weight if isinstance(weight, torch.Tensor) and weight.is_quantized else None


def stored_values(model: nn.Module) -> dict[str, StoredValues]:
    """Every array of ``model`` a weight fault can strike, in model order: its float parameters of a known format
    (:data:`critnet.formats.FORMATS`) and the int8 weights of its quantized layers.

    >>> sorted((name, s.format.name) for name, s in stored_values(nn.Linear(2, 1).half()).items())
    [('bias', 'float16'), ('weight', 'float16')]
    """
    found: dict[str, StoredValues] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, parameter in module.named_parameters(recurse=False):
            number_format = format_of(parameter.dtype)
            if number_format is not None and prefix + name not in found:
                found[prefix + name] = ParameterValues(prefix + name, module, number_format, parameter.shape,
                                                       parameter)
        weight = _packed_weight(module)
        if weight is not None:
            found[f"{prefix}weight"] = PackedWeightValues(f"{prefix}weight", module, format_of(weight.dtype),
                                                         weight.shape)
            # the scales are float32 in the packed weight (torch hands them out as float64 copies)
            channels = quantization_parameters(weight)[0].shape
            for kind, number_format in (("scale", FORMATS["float32"]), ("zero_point", FORMATS["int8"])):
                found[f"{prefix}weight_{kind}"] = QuantizationParameterValues(
                    f"{prefix}weight_{kind}", module, number_format, channels, kind)
    return found


__all__ = ["PackedWeightValues", "ParameterValues", "QuantizationParameterValues", "StoredValues", "packed_weights",
           "quantization_parameters", "quantized_from", "quantized_like", "requantized", "stored_values"]
