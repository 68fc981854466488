"""timm models as ``timm/<name>`` (optional: ``pip install critnet[timm]``).

timm is imported only when a ``timm/`` name is used, so critnet works without it. Pretrained weights come through
timm's own cache (the Hugging Face hub), named by timm's pretrained tag.
"""

from __future__ import annotations

import functools
from pathlib import Path

from torch import nn

from critnet.errors import CritnetError
from critnet.models.spec import (
    PRETRAINED_NAMES,
    TIMM_PREFIX,
    MissingExtraError,
    ModelSpec,
    UnknownModelError,
)


def _timm():
    try:
        import timm
    except ImportError:
        raise MissingExtraError(
            "--model.arch timm/...: timm is not installed; install it with `pip install critnet[timm]`"
        ) from None
    return timm


def timm_installed() -> bool:
    try:
        _timm()
    except MissingExtraError:
        return False
    return True


def timm_model_names() -> list[str]:
    """timm's architecture names (without the prefix); empty when timm is not installed."""
    if not timm_installed():
        return []
    return list(_timm().list_models())


def split_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else arch


@functools.lru_cache(maxsize=None)
def timm_spec(arch: str) -> ModelSpec:
    """The spec of ``timm/<name>``; input size from timm's pretrained config of the model."""
    timm = _timm()
    name = split_name(arch)
    if not timm.is_model(name):
        raise UnknownModelError(f"unknown model {arch!r} (--model.arch): timm has no model {name!r}")
    size = 224
    try:
        size = int(timm.get_pretrained_cfg(name).input_size[-1])
    except Exception:  # noqa: BLE001 - a model without a pretrained config keeps timm's usual size
        pass

    def factory(num_classes: int = 1000, pretrained_tag: str | None = None) -> nn.Module:
        full = name if pretrained_tag is None else f"{name}.{pretrained_tag}"
        return timm.create_model(full, pretrained=pretrained_tag is not None, num_classes=num_classes)

    # timm's ViTs and Swins fix their size through img_size; most convnets accept smaller inputs.
    fixed = any(part in name for part in ("vit", "swin", "deit", "beit", "eva", "maxvit", "coat", "xcit"))
    return ModelSpec(arch, factory, "timm", 1000, size, size if fixed else min(size, 32))


def pretrained_tag(arch: str, weights: str) -> str | None:
    """The timm pretrained tag ``weights`` names (``pretrained``, a tag, or ``<name>.<tag>``); None for a file."""
    if Path(weights).expanduser().is_file():
        return None
    timm = _timm()
    name = split_name(arch)
    if weights in PRETRAINED_NAMES:  # timm's default pretrained tag for this model
        cfg = timm.get_pretrained_cfg(name)
        tag = getattr(cfg, "tag", None)
        return tag or ""
    tag = weights.split(".", 1)[1] if weights.startswith(name + ".") else weights
    if f"{name}.{tag}" not in set(timm.list_pretrained(f"{name}.*")):
        known = ", ".join(t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")) or "none"
        raise CritnetError(
            f"--model.weights {weights!r}: neither a file nor a timm pretrained tag of {name} (tags: {known})"
        )
    return tag


def build_pretrained(arch: str, tag: str, num_classes: int) -> nn.Module:
    """timm's pretrained model through timm's cache; one line naming what to fetch when it cannot download."""
    timm = _timm()
    name = split_name(arch)
    full = f"{name}.{tag}" if tag else name
    try:
        return timm.create_model(full, pretrained=True, num_classes=num_classes)
    except Exception as err:  # noqa: BLE001 - offline, hub errors: all end in the same advice
        cfg = timm.get_pretrained_cfg(full)
        where = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or full
        raise CritnetError(
            f"--model.weights: could not fetch timm weights {full} ({type(err).__name__}); on a machine with "
            f"internet run `python -c \"import timm; timm.create_model('{full}', pretrained=True)\"` to fill the "
            f"Hugging Face cache (source: {where}), copy the cache (~/.cache/huggingface) here, or pass a "
            "state-dict file with --model.weights PATH"
        ) from err
