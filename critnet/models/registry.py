"""A registry of model constructors by name.

Every model critnet can analyse is registered here under a unique name, so that a
YAML config can say ``arch: resnet56`` and a typo gets a list of valid names
instead of an ``AttributeError`` from deep inside an import. Names of the form
``timm/<name>`` are looked up in timm and ``hf/<name>`` in Hugging Face transformers
(optional extras) when first asked for.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from critnet.models.hf_models import hf_model_names, hf_spec
from critnet.models.spec import (
    HF_PREFIX,
    TIMM_PREFIX,
    ModelFactory,
    ModelSpec,
    UnknownModelError,
)
from critnet.models.timm_models import timm_model_names, timm_spec

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, family: str, default_num_classes: int, input_size: int, min_input_size: int | None = None
) -> Callable[[ModelFactory], ModelFactory]:
    """Class/function decorator that registers ``factory`` under ``name``.

    >>> @register_model("tiny", family="cifar", default_num_classes=10, input_size=32)
    ... def tiny(num_classes=10): return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
    >>> build_model("tiny")(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 10])

    Raises:
        ValueError: if ``name`` is already registered — two models silently
            sharing a name would make configs ambiguous.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].factory!r})")
        _REGISTRY[name] = ModelSpec(name, factory, family, default_num_classes, input_size, min_input_size)
        return factory

    return decorator


def list_models(include_timm: bool = True, include_hf: bool = True) -> list[str]:
    """Names of all models critnet can build, sorted: registered ones, then ``timm/<name>`` when timm is installed,
    then the ``hf/<id>`` that build offline when transformers is installed (any transformers image classifier in
    a local directory or the Hugging Face cache, or of a model type such as ``hf/vit``, builds too).

    >>> "mobilenet_v2" in list_models()
    True
    """
    names = sorted(_REGISTRY)
    if include_timm:
        names += [TIMM_PREFIX + n for n in timm_model_names()]
    if include_hf:
        names += hf_model_names()
    return names


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; a one-line :class:`UnknownModelError` naming ``--model.arch`` otherwise.

    >>> get_model_spec("resnet20").input_size
    32
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return timm_spec(name)
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        return hf_spec(name)
    raise UnknownModelError(
        f"unknown model {name!r} (--model.arch); registered models: {', '.join(sorted(_REGISTRY))}, "
        f"or {TIMM_PREFIX}<name> with timm installed, or {HF_PREFIX}<hub id, directory or model type> with "
        "transformers installed (`python analyze.py --list-models` lists them all)"
    )


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Instantiate the registered model ``name`` with random weights.

    >>> build_model("resnet20", num_classes=7).linear.out_features
    7
    """
    spec = get_model_spec(name)
    return spec.factory(num_classes=spec.default_num_classes if num_classes is None else num_classes)
