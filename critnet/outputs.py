"""Reading the logits out of whatever a model returns: the one place where the library consumes a model's output.

A classifier may return its logits as a tensor, inside a Hugging Face ``ModelOutput`` (``.logits``), a dict
(``"logits"``), a tuple (``(logits, aux)``) or anything else. Every analysis takes an ``output=`` argument, an
:data:`OutputSelector`, and every forward pass of the library (the evaluation loop, the exact engine's traced suffixes,
the naive loop, the Taylor passes, pruning and fault campaigns) reads its logits through :func:`logits_of`, so a
model is read the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from torch import Tensor

from critnet.choices import SettingError
from critnet.errors import OutputError

#: How to find the logits in a model's output: ``None`` (a tensor as it is, else its ``logits`` attribute or key),
#: a key or attribute name (``"scores"``), an index into a tuple or list (``0``), or a callable that takes the
#: model's output and returns the logits tensor.
OutputSelector = Union[None, str, int, Callable[[Any], Tensor]]

_HOW = ("pass output= a key or attribute name (output='logits'), an index (output=0) or a callable that takes the "
        "model's output and returns the logits tensor")


def check_selector(selector: Any, key: str = "output") -> OutputSelector:
    """``selector`` if it is an :data:`OutputSelector`; otherwise a one-line :class:`SettingError` naming ``key``.

    >>> check_selector(0), check_selector("logits")
    (0, 'logits')
    """
    if selector is None or isinstance(selector, str) or callable(selector):
        return selector
    if isinstance(selector, int) and not isinstance(selector, bool):
        return selector
    raise SettingError(f"{key}: {selector!r} is not a key (str), an index (int) or a callable that returns the "
                       "logits tensor")


def describe_selector(selector: OutputSelector) -> str | int | None:
    """How reports and resume fingerprints record ``selector``: a key or index as it is, a callable by its module
    and qualified name (its code cannot be hashed, so two callables of one name count as one).

    >>> describe_selector(None), describe_selector(0), describe_selector(len)
    (None, 0, 'callable:builtins.len')
    """
    if selector is None or isinstance(selector, (str, int)):
        return selector
    name = getattr(selector, "__qualname__", None) or type(selector).__qualname__
    return f"callable:{getattr(selector, '__module__', None) or type(selector).__module__}.{name}"


def logits_of(output: Any, selector: OutputSelector = None) -> Tensor:
    """The logits tensor in ``output``, what a model's forward pass returned, as ``selector`` says.

    Args:
        output: the model's output.
        selector: ``None``: a tensor as it is; otherwise its ``logits`` attribute (a Hugging Face ``ModelOutput``,
            a dataclass, a namedtuple) or ``"logits"`` key (a dict). A ``str``: that key of a mapping, else that
            attribute. An ``int``: that item of a tuple or list (or of a mapping's values, in order, as
            ``ModelOutput`` indexes). A callable: ``selector(output)``.

    Raises:
        OutputError: one line naming the output's type (with its keys or length) when the logits cannot be read
            this way, or when what was selected is not a tensor.

    >>> logits_of(torch.zeros(2, 3)).shape
    torch.Size([2, 3])
    >>> logits_of({"logits": torch.zeros(2, 3), "hidden": torch.ones(2, 4)}).shape
    torch.Size([2, 3])
    >>> logits_of((torch.zeros(2, 3), torch.ones(2, 4)), 1).shape
    torch.Size([2, 4])
    >>> logits_of((torch.zeros(2, 3), torch.ones(2, 4)))
    Traceback (most recent call last):
    ...
    critnet.errors.OutputError: output: the model returns a tuple of 2 items (Tensor (2, 3), Tensor (2, 4)), not a logits tensor; pass output= a key or attribute name (output='logits'), an index (output=0) or a callable that takes the model's output and returns the logits tensor
    """
    if selector is None:
        if isinstance(output, Tensor):
            return output
        found = _logits_field(output)
        if found is None:
            raise OutputError(f"output: the model returns {describe_output(output)}, not a logits tensor; {_HOW}")
        return found
    if isinstance(selector, str):
        if isinstance(output, Mapping) and selector in output:
            value = output[selector]
        elif not isinstance(output, Mapping) and hasattr(output, selector):
            value = getattr(output, selector)
        else:
            raise OutputError(f"output: {selector!r} is not in what the model returns, {describe_output(output)}")
    elif isinstance(selector, int) and not isinstance(selector, bool):
        items = (list(output.values()) if isinstance(output, Mapping)
                 else output if isinstance(output, Sequence) and not isinstance(output, str) else None)
        if items is None or not -len(items) <= selector < len(items):
            raise OutputError(f"output: index {selector} does not select an item of what the model returns, "
                              f"{describe_output(output)}")
        value = items[selector]
    else:
        value = selector(output)
        selector = describe_selector(selector)
    if not isinstance(value, Tensor):
        raise OutputError(f"output: {selector!r} selects {_describe_value(value)} from what the model returns, "
                          f"{describe_output(output)}; it must select the logits tensor")
    return value


def _logits_field(output: Any) -> Tensor | None:
    if isinstance(output, Mapping):
        value = output.get("logits")
    else:
        value = getattr(output, "logits", None)
    return value if isinstance(value, Tensor) else None


def describe_output(output: Any) -> str:
    """One line saying what a model returned: its type and, for containers, its keys or items.

    >>> describe_output({"a": torch.zeros(2, 3), "b": None})
    "a dict with keys 'a', 'b'"
    """
    kind = type(output).__name__
    if isinstance(output, Mapping):
        keys = [repr(k) for k in list(output)[:8]] + (["…"] if len(output) > 8 else [])
        return f"a {kind} with keys {', '.join(keys)}" if keys else f"an empty {kind}"
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return f"a {kind} (namedtuple) with fields {', '.join(output._fields)}"
    if isinstance(output, (tuple, list)):
        items = [_describe_value(v) for v in output[:6]] + (["…"] if len(output) > 6 else [])
        return f"a {kind} of {len(output)} items ({', '.join(items)})"
    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {kind} object"


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor {tuple(value.shape)}"
    return type(value).__name__


__all__ = ["OutputSelector", "check_selector", "describe_output", "describe_selector", "logits_of"]
