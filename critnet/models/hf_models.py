"""Hugging Face ``transformers`` image classifiers as ``hf/<name>`` (optional: ``pip install critnet[transformers]``).

``<name>`` is looked for, in this order, as

1. a local directory holding a ``config.json`` (what ``save_pretrained`` writes): ``hf/runs/my-vit``;
2. a hub model id whose configuration is in the local Hugging Face cache (``~/.cache/huggingface``);
3. a hub model id of :data:`KNOWN_CONFIGS`: the published architecture hyper-parameters of common checkpoints,
   so that ``hf/google/vit-base-patch16-224`` builds offline;
4. a transformers model type with an image-classification class (``vit``, ``deit``, ``beit``, ``swin``,
   ``convnext``, …): its default configuration.

The model is built from the configuration with random weights, as the other families are without ``weights``;
``weights="pretrained"`` loads the checkpoint's own weights from the directory or the cache, never from the
network. The model returned is the transformers model itself: its forward returns a ``ModelOutput`` whose
``.logits`` every analysis reads (:func:`critnet.outputs.logits_of`). transformers is imported only when an
``hf/`` name is used, so critnet works without it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from critnet.models.checkpoints import CheckpointError, WeightsInfo, sha256_of
from critnet.models.spec import (
    HF_PREFIX,
    INTERPOLATIONS,
    PRETRAINED_NAMES,
    MissingExtraError,
    ModelSpec,
    Preprocessing,
    UnknownModelError,
)

#: Published architectures of common hub checkpoints (ImageNet-1k classifiers): ``id -> (model type, config
#: arguments)``; the rest of each configuration is the type's default. A cached configuration takes precedence.
KNOWN_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "google/vit-base-patch16-224": ("vit", {}),
    "google/vit-large-patch16-224": ("vit", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                             "intermediate_size": 4096}),
    "facebook/deit-tiny-patch16-224": ("deit", {"hidden_size": 192, "num_attention_heads": 3,
                                                "intermediate_size": 768}),
    "facebook/deit-small-patch16-224": ("deit", {"hidden_size": 384, "num_attention_heads": 6,
                                                 "intermediate_size": 1536}),
    "facebook/deit-base-patch16-224": ("deit", {}),
    "microsoft/beit-base-patch16-224": ("beit", {"use_relative_position_bias": True, "use_mean_pooling": True,
                                                 "use_absolute_position_embeddings": False}),
    "microsoft/swin-tiny-patch4-window7-224": ("swin", {}),
    "microsoft/swin-base-patch4-window7-224": ("swin", {"embed_dim": 128, "depths": [2, 2, 18, 2],
                                                        "num_heads": [4, 8, 16, 32]}),
    "facebook/convnext-tiny-224": ("convnext", {}),
    "facebook/convnext-base-224": ("convnext", {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]}),
}
# Model types whose input size is free (convolutions and global pooling); the others fix it through position
# embeddings or attention windows.
_FREE_SIZE_TYPES = frozenset({"bit", "convnext", "convnextv2", "efficientnet", "hgnet_v2", "mobilenet_v1",
                              "mobilenet_v2", "poolformer", "pp_lcnet", "regnet", "resnet", "textnet"})
_FLOOR = 32  # the smallest side that leaves a stride-32 network a feature map worth analysing
# PIL's resampling filters (the processors' ``resample``) by number; LANCZOS, BOX and HAMMING have no torchvision
# resize of their own and take the nearest one in spirit.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(
            f"--model.arch {HF_PREFIX}...: transformers is not installed; install it with "
            "`pip install critnet[transformers]`"
        ) from None
    return transformers


def transformers_installed() -> bool:
    """Whether transformers can be imported (asked of the import system, so nothing is imported)."""
    return importlib.util.find_spec("transformers") is not None


def hf_model_names() -> list[str]:
    """The ``hf/`` names that build offline without a cache (:data:`KNOWN_CONFIGS`); empty without transformers."""
    return [HF_PREFIX + name for name in KNOWN_CONFIGS] if transformers_installed() else []


@dataclass(frozen=True)
class HFSource:
    """Where an ``hf/<name>`` comes from.

    Attributes:
        arch: the full name, ``hf/<name>``.
        origin: ``directory``, ``cache``, ``table`` (:data:`KNOWN_CONFIGS`) or ``type`` (a model type's defaults).
        location: the directory or the hub id (the name itself for ``table`` and ``type``).
        config: the transformers configuration.
    """

    arch: str
    origin: str
    location: str
    config: Any

    @property
    def has_weights(self) -> bool:
        return self.origin in ("directory", "cache")


def _image_classifier_types() -> dict[str, Any]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    return dict(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def resolve(arch: str) -> HFSource:
    """The :class:`HFSource` of ``hf/<name>`` (see the module docstring for the order); a one-line
    :class:`~critnet.models.registry.UnknownModelError` otherwise.

    >>> import pytest; _ = pytest.importorskip("transformers")  # the example needs transformers
    >>> source = resolve("hf/google/vit-base-patch16-224")
    >>> source.origin, source.config.model_type, source.config.num_attention_heads
    ('table', 'vit', 12)
    """
    transformers = _transformers()
    name = arch.removeprefix(HF_PREFIX)
    directory = Path(name).expanduser()
    if (directory / "config.json").is_file():
        return HFSource(arch, "directory", str(directory), transformers.AutoConfig.from_pretrained(str(directory)))
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid hub id: the table and the model types follow
        config = None
    if config is not None:
        return HFSource(arch, "cache", name, config)
    if name in KNOWN_CONFIGS:
        model_type, arguments = KNOWN_CONFIGS[name]
        config = transformers.AutoConfig.for_model(model_type, **arguments)
        config.num_labels = 1000
        return HFSource(arch, "table", name, config)
    if name in _image_classifier_types():
        config = transformers.AutoConfig.for_model(name)
        config.num_labels = 1000  # the types' defaults have 2 labels; ImageNet's 1000 as the other families
        return HFSource(arch, "type", name, config)
    raise UnknownModelError(
        f"unknown model {arch!r} (--model.arch): {name!r} is neither a directory with a config.json, a hub model in "
        f"the local Hugging Face cache, a known id ({', '.join(KNOWN_CONFIGS)}) nor a transformers image-classifier "
        f"type ({', '.join(sorted(_image_classifier_types()))})"
    )


def model_class(source: HFSource) -> type[nn.Module]:
    """The transformers image-classification class of ``source``: the one its configuration names
    (``architectures``) if that is an image classifier of its type, else the type's first."""
    config = source.config
    known = _image_classifier_types().get(config.model_type)
    if known is None:
        raise UnknownModelError(f"--model.arch {source.arch}: a {config.model_type!r} model; transformers has no "
                                "image classifier of that type")
    candidates = (known,) if isinstance(known, str) else tuple(c for c in known if c)
    chosen = next((a for a in (config.architectures or ()) if a in candidates), candidates[0])
    return getattr(_transformers(), chosen)


def _input_size(config: Any) -> int:
    size = getattr(config, "image_size", 224)
    return int(size[-1] if isinstance(size, (list, tuple)) else size)


def hf_spec(arch: str) -> ModelSpec:
    """The spec of ``hf/<name>``: input size from its configuration, classes from its labels (1000 for the table
    and the model types).

    >>> import pytest; _ = pytest.importorskip("transformers")  # the example needs transformers
    >>> spec = hf_spec("hf/facebook/convnext-tiny-224")
    >>> spec.input_size, spec.smallest_input, spec.default_num_classes
    (224, 32, 1000)
    """
    source = resolve(arch)
    size = _input_size(source.config)
    free = source.config.model_type in _FREE_SIZE_TYPES

    def factory(num_classes: int | None = None) -> nn.Module:
        return build(source, num_classes)

    factory.__name__ = arch
    return ModelSpec(arch, factory, "hf", source.config.num_labels, size, min(size, _FLOOR) if free else size)


def _config_for(source: HFSource, num_classes: int | None) -> Any:
    config = source.config
    if num_classes is not None and num_classes != config.num_labels:
        config = copy.deepcopy(config)
        config.num_labels = num_classes
    return config


def build(source: HFSource, num_classes: int | None = None) -> nn.Module:
    """The classifier of ``source`` with random weights (transformers' own initialisation)."""
    return model_class(source)(_config_for(source, num_classes))


def wants_pretrained(arch: str, weights: str) -> bool:
    """True if ``weights`` names the checkpoint's own weights (``pretrained``, ``DEFAULT``), False for a file;
    a one-line :class:`~critnet.models.checkpoints.CheckpointError` for anything else."""
    if weights in PRETRAINED_NAMES:
        return True
    if Path(weights).expanduser().is_file():
        return False
    raise CheckpointError(f"--model.weights {weights!r}: neither a file nor 'pretrained' (the weights of {arch} from "
                          "its directory or the local Hugging Face cache)")


def _weights_file(source: HFSource) -> Path | None:
    """The single weights file of a directory or cached model (None when sharded or absent)."""
    for filename in _WEIGHT_FILES:
        if source.origin == "directory":
            path = Path(source.location) / filename
            if path.is_file():
                return path
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source.location, filename)
            if isinstance(found, str):
                return Path(found)
    return None


def build_pretrained(arch: str, weights: str, num_classes: int | None = None) -> tuple[nn.Module, WeightsInfo]:
    """The classifier of ``arch`` with its checkpoint's weights, from its directory or the local cache only,
    strictly checked (every key present and of its shape); one line saying what to do when they are not there."""
    source = resolve(arch)
    if source.origin == "type":
        raise CheckpointError(
            f"--model.weights {weights}: {arch} is the default configuration of the model type "
            f"{source.location!r}, which has no weights; name a directory written by save_pretrained() "
            "(--model.arch hf/<directory>) or a hub id in the local Hugging Face cache")
    if source.origin == "table":
        raise CheckpointError(
            f"--model.weights {weights}: {source.location} is not in the local Hugging Face cache (critnet never "
            "downloads it); on a machine with internet run `python -c \"from transformers import "
            f"AutoModelForImageClassification as A; A.from_pretrained('{source.location}')\"` and copy its cache "
            "(~/.cache/huggingface) here, or save_pretrained() the model into a directory and use "
            "--model.arch hf/<directory>")
    labels = source.config.num_labels
    if num_classes is not None and num_classes != labels:
        raise CheckpointError(f"--model.weights {weights}: {arch} was trained with {labels} classes, not "
                              f"{num_classes}; is the number of classes (or the data) the one of this checkpoint?")
    try:
        model, info = model_class(source).from_pretrained(source.location, local_files_only=True,
                                                          output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - a missing or unreadable file: one line naming where it was looked for
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"--model.weights {weights}: cannot load the weights of {arch} from {source.location} "
                              f"({type(err).__name__}: {first})") from err
    faults = {key: sorted(info.get(key) or ()) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(faults.values()):
        shown = "; ".join(f"{key.replace('_', ' ')}: {', '.join(map(str, keys[:8]))}"
                          + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")
                          for key, keys in faults.items() if keys)
        raise CheckpointError(f"--model.weights {weights}: the checkpoint in {source.location} does not fit "
                              f"{type(model).__name__}: {shown}")
    path = _weights_file(source)
    found = WeightsInfo(source=weights, path=str(path) if path else f"hf:{source.location}",
                        sha256=sha256_of(path) if path else "")
    return model, found


def _processor_settings(source: HFSource) -> tuple[dict[str, Any], bool]:
    """The image processor's settings and whether they are the checkpoint's own (its ``preprocessor_config.json``)
    rather than its processor class's defaults."""
    path: Path | None = None
    if source.origin == "directory":
        path = Path(source.location) / "preprocessor_config.json"
    elif source.origin == "cache":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.location, "preprocessor_config.json")
        path = Path(found) if isinstance(found, str) else None
    if path is not None and path.is_file():
        return json.loads(path.read_text()), True
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
    )

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(source.config.model_type)
    # transformers 5 maps a type to {backend: class}, 4.x to (slow, fast)
    candidates = list(names.values()) if isinstance(names, dict) else [names] if isinstance(names, str) else list(
        names or ())
    for name in candidates:
        processor = getattr(_transformers(), name, None) if name else None
        if processor is not None:
            return processor().to_dict(), False
    return {}, False


def _side(value: Any, *keys: str) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in keys:
            if value.get(key):
                return int(value[key])
    return None


def hf_preprocessing(arch: str):
    """The image processor's eval transform of ``hf/<name>`` as a :class:`~critnet.models.preprocessing
    .Preprocessing`: the checkpoint's ``preprocessor_config.json`` when the directory or the cache has it, else
    the defaults of the type's processor class; a model with a fixed input size gets its crop at that size (the
    processor's resize scaled with it).

    A processor that resizes to a fixed height × width without a crop (ViT's) squashes non-square images;
    critnet resizes the shorter side and centre-crops, which is the same for square images.
    """
    source = resolve(arch)
    settings, own = _processor_settings(source)
    size = _input_size(source.config)
    shortest = _side(settings.get("size"), "shortest_edge")
    resize = _side(settings.get("size"), "shortest_edge", "height") or size
    crop = _side(settings.get("crop_size"), "height") if settings.get("do_center_crop") else None
    crop_pct = settings.get("crop_pct")
    if crop is None and crop_pct and shortest and shortest < 384:
        # ConvNeXt's processor: below 384 px it resizes to shortest_edge / crop_pct and crops shortest_edge
        resize, crop = int(shortest / crop_pct), shortest
    if not settings.get("do_resize", True):
        resize = crop or size
    crop = crop or resize
    resample = settings.get("resample")
    interpolation = _RESAMPLE.get(int(resample), "bicubic") if resample is not None else "bilinear"
    assert interpolation in INTERPOLATIONS
    normalise = settings.get("do_normalize", True)
    mean = tuple(settings.get("image_mean") or (0.5, 0.5, 0.5)) if normalise else (0.0, 0.0, 0.0)
    std = tuple(settings.get("image_std") or (0.5, 0.5, 0.5)) if normalise else (1.0, 1.0, 1.0)
    result = Preprocessing(int(resize), int(crop), interpolation, tuple(map(float, mean)), tuple(map(float, std)))
    free = source.config.model_type in _FREE_SIZE_TYPES
    if crop != size and (not free or not own):
        result = result.with_sizes(crop_size=size)
    return result
