"""Number formats: how a stored value's bits are laid out, read and written (independent of any quantization
library).

A fault strikes the bits a value is *stored* in: the 32 bits of a float32, the 16 of a float16 or bfloat16, the 8
of an int8 (a quantized weight) or uint8 (a quantized activation). :class:`NumberFormat` names each bit's field
(sign, exponent, mantissa; for integers the two's-complement sign and the value bits), applies a fault model to a
bit pattern — one bit, or ``width`` adjacent bits at once (a multi-bit upset) — and views a tensor's storage as
patterns. Patterns are Python integers in the range of the format's integer view (signed for float formats and
int8, 0..255 for uint8), so they round-trip through CSV files exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from critnet.choices import SettingError

NumberFormatName = Literal["float32", "float16", "bfloat16", "int8", "uint8"]
NUMBER_FORMATS: tuple[str, ...] = get_args(NumberFormatName)
#: What a fault does to each of the bits it strikes.
BitFaultModel = Literal["bitflip", "stuck_at_0", "stuck_at_1"]
BIT_FAULT_MODELS: tuple[str, ...] = get_args(BitFaultModel)


@dataclass(frozen=True)
class BitField:
    """Bits ``low``..``high`` (inclusive) of a format, named."""

    name: str
    low: int
    high: int


@dataclass(frozen=True)
class NumberFormat:
    """A stored number format.

    Args:
        name: one of ``NUMBER_FORMATS``.
        width: bits per value.
        dtype: the torch dtype a plain tensor of the format has (quantized tensors hold it as their ``int_repr``).
        bits_dtype: the integer dtype of the same width the storage is viewed as.
        fields: the bit fields, lowest first.

    >>> f = FORMATS["bfloat16"]
    >>> f.field(7), f.value(f.apply(f.pattern(1.0), 14, "bitflip"))  # the exponent's top bit: 1.0 -> inf
    ('exponent', inf)
    """

    name: str
    width: int
    dtype: torch.dtype
    bits_dtype: torch.dtype
    fields: tuple[BitField, ...]

    @property
    def signed(self) -> bool:
        return self.bits_dtype.is_signed

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def field(self, bit: int) -> str:
        """The name of the field bit ``bit`` belongs to."""
        for f in self.fields:
            if f.low <= bit <= f.high:
                return f.name
        raise SettingError(f"bit: {bit!r} is not a bit position 0..{self.width - 1} of a {self.name} value")

    def fields_struck(self, bit: int, width: int = 1) -> str:
        """The fields of bits ``bit``..``bit + width - 1``, joined by ``+`` when an upset spans two.

        >>> FORMATS["float16"].fields_struck(9, 2)
        'mantissa+exponent'
        """
        return "+".join(dict.fromkeys(self.field(b) for b in range(bit, bit + width)))

    def layout(self) -> str:
        """The fields as one line, lowest bit first (``bits 0-22 mantissa, 23-30 exponent, 31 sign``)."""
        parts = [f"{f.low}-{f.high} {f.name}" if f.high > f.low else f"{f.low} {f.name}" for f in self.fields]
        return "bits " + ", ".join(parts)

    def check_bits(self, bit: int, width: int = 1) -> None:
        if not (0 <= bit and bit + width <= self.width):
            raise SettingError(f"bit: {bit}..{bit + width - 1} are not bit positions 0..{self.width - 1} of a "
                               f"{self.name} value")

    def mask(self, bit: int, width: int = 1) -> int:
        """The pattern with bits ``bit``..``bit + width - 1`` set, as a pattern of the format."""
        self.check_bits(bit, width)
        return self._wrap(((1 << width) - 1) << bit)

    def apply(self, pattern: int, bit: int, fault_model: str, width: int = 1) -> int:
        """``pattern`` after ``fault_model`` strikes bits ``bit``..``bit + width - 1``.

        >>> FORMATS["float32"].apply(0, 31, "bitflip")  # 0.0 -> -0.0
        -2147483648
        >>> FORMATS["int8"].apply(0b0101, 1, "bitflip", width=2)  # 5 -> 3: bits 1 and 2 flip together
        3
        """
        mask = self.mask(bit, width)
        if fault_model == "bitflip":
            return self._wrap(pattern ^ mask)
        if fault_model == "stuck_at_0":
            return self._wrap(pattern & ~mask)
        if fault_model == "stuck_at_1":
            return self._wrap(pattern | mask)
        raise SettingError(f"fault_model: {fault_model!r} is not one of {', '.join(BIT_FAULT_MODELS)}")

    def apply_tensor(self, patterns: torch.Tensor, bit: int, fault_model: str, width: int = 1) -> torch.Tensor:
        """``patterns`` (a tensor of ``bits_dtype``) after ``fault_model`` strikes the same bits of every element."""
        mask = torch.tensor(self.mask(bit, width), dtype=self.bits_dtype, device=patterns.device)
        if fault_model == "bitflip":
            return patterns ^ mask
        if fault_model == "stuck_at_0":
            return patterns & ~mask
        if fault_model == "stuck_at_1":
            return patterns | mask
        raise SettingError(f"fault_model: {fault_model!r} is not one of {', '.join(BIT_FAULT_MODELS)}")

    def value(self, pattern: int) -> float:
        """The number ``pattern`` stores (for integer formats: the stored integer itself)."""
        if not self.is_float:
            return float(pattern)
        return float(torch.tensor([pattern], dtype=self.bits_dtype).view(self.dtype)[0])

    def pattern(self, value: float) -> int:
        """The pattern storing ``value`` (rounded to the format)."""
        return int(torch.tensor([value], dtype=self.dtype).view(self.bits_dtype)[0])

    def patterns(self, tensor: torch.Tensor) -> torch.Tensor:
        """The flat integer view of a plain tensor of the format (shares its storage)."""
        return tensor.detach().reshape(-1).view(self.bits_dtype)

    def _wrap(self, value: int) -> int:
        value &= (1 << self.width) - 1
        if self.signed and value >= 1 << (self.width - 1):
            value -= 1 << self.width
        return value


def _float(name: str, dtype: torch.dtype, bits_dtype: torch.dtype, mantissa: int, exponent: int) -> NumberFormat:
    fields = (BitField("mantissa", 0, mantissa - 1), BitField("exponent", mantissa, mantissa + exponent - 1),
              BitField("sign", mantissa + exponent, mantissa + exponent))
    return NumberFormat(name, mantissa + exponent + 1, dtype, bits_dtype, fields)


FORMATS: dict[str, NumberFormat] = {
    "float32": _float("float32", torch.float32, torch.int32, 23, 8),
    "float16": _float("float16", torch.float16, torch.int16, 10, 5),
    "bfloat16": _float("bfloat16", torch.bfloat16, torch.int16, 7, 8),
    # two's complement: bit 7 weighs -128, so it is the sign; the others are the value's bits
    "int8": NumberFormat("int8", 8, torch.int8, torch.int8, (BitField("value", 0, 6), BitField("sign", 7, 7))),
    "uint8": NumberFormat("uint8", 8, torch.uint8, torch.uint8, (BitField("value", 0, 7),)),
}
assert tuple(FORMATS) == NUMBER_FORMATS

_BY_DTYPE = {f.dtype: f for f in FORMATS.values()}
_QUANTIZED = {torch.qint8: FORMATS["int8"], torch.quint8: FORMATS["uint8"]}


def format_of(dtype: torch.dtype) -> NumberFormat | None:
    """The format values of ``dtype`` are stored in (quantized dtypes: their integer representation), or None.

    >>> format_of(torch.float16).layout()
    'bits 0-9 mantissa, 10-14 exponent, 15 sign'
    """
    return _BY_DTYPE.get(dtype) or _QUANTIZED.get(dtype)


def bit_patterns(tensor: torch.Tensor) -> torch.Tensor:
    """Integer patterns of any float or quantized tensor, same shape, for bit-exact comparisons.

    >>> bool((bit_patterns(torch.tensor([0.0])) == bit_patterns(torch.tensor([-0.0]))).all())
    False
    """
    if tensor.is_quantized:
        return tensor.int_repr()
    if tensor.dtype.is_floating_point:
        return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[tensor.element_size()])
    return tensor


__all__ = ["BIT_FAULT_MODELS", "FORMATS", "NUMBER_FORMATS", "BitFaultModel", "BitField", "NumberFormat",
           "NumberFormatName", "bit_patterns", "format_of"]
