"""A registry of model constructors by name.

Every model critnet can analyse is registered here under a unique name, so that a
YAML config can say ``arch: resnet56`` and a typo gets a list of valid names
instead of an ``AttributeError`` from deep inside an import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from critnet.errors import CritnetError

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """What critnet knows about a registered architecture."""

    name: str
    factory: ModelFactory
    family: str  # "cifar" or "imagenet": decides the default input size and data
    default_num_classes: int
    input_size: int


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, family: str, default_num_classes: int, input_size: int
) -> Callable[[ModelFactory], ModelFactory]:
    """Class/function decorator that registers ``factory`` under ``name``.

    Raises:
        ValueError: if ``name`` is already registered — two models silently
            sharing a name would make configs ambiguous.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].factory!r})")
        _REGISTRY[name] = ModelSpec(name, factory, family, default_num_classes, input_size)
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


class UnknownModelError(CritnetError):
    """A model name that is not registered."""


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r} (--model.arch); registered models: {', '.join(list_models())}"
        ) from None


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Instantiate the registered model ``name`` with random weights."""
    spec = get_model_spec(name)
    return spec.factory(num_classes=spec.default_num_classes if num_classes is None else num_classes)
