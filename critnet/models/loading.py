"""A registered model with its weights, loaded the one way the CLI and the Python API share."""

from __future__ import annotations

from torch import nn

from critnet.models.checkpoints import WeightsInfo, load_weights, torchvision_weights
from critnet.models.registry import get_model_spec
from critnet.models.torchvision_models import adapt_torchvision_state

#: The attribute of a model returned by :func:`load_model` that says where its weights came from.
WEIGHTS_ATTRIBUTE = "critnet_weights"


def load_model(arch: str, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A registered architecture in eval mode, with weights from a file or a known name (strictly checked).

    Args:
        arch: a model name from ``critnet.models.list_models()``: a torchvision classifier (``"mobilenet_v2"``), a
            CIFAR ResNet (``"resnet20"``), ``"timm/<name>"`` (with ``pip install critnet[timm]``) or
            ``"hf/<hub id, directory or model type>"``, a Hugging Face transformers image classifier (with
            ``pip install critnet[transformers]``; see :mod:`critnet.models.hf_models`), which returns its
            ``ModelOutput``.
        weights: a state-dict file (``.th``/``.pth``/``.pt``), a Lightning ``.ckpt``, a known checkpoint name
            (``resnet20-cifar10``), a torchvision weight name of ``arch`` (``DEFAULT``, ``IMAGENET1K_V2``,
            ``ResNet50_Weights.IMAGENET1K_V2``; downloaded once into ``checkpoints/`` and hash-checked) or, for timm
            models, ``pretrained`` or a timm pretrained tag (through timm's cache); for transformers models
            ``pretrained``: the checkpoint's weights from its directory or the local Hugging Face cache (never
            downloaded). ``None`` keeps the random initialisation.
        num_classes: output classes; default: the architecture's own.

    The returned module carries :class:`~critnet.models.checkpoints.WeightsInfo` (path and sha256 of the weights) as
    ``model.critnet_weights`` (None for random weights), which the reports record.

    >>> model = load_model("resnet20")
    >>> model.training, model.critnet_weights
    (False, None)
    """
    spec = get_model_spec(arch)
    classes = num_classes if num_classes is not None else spec.default_num_classes
    info: WeightsInfo | None = None
    if spec.family == "hf" and weights is not None:
        from critnet.models.hf_models import build_pretrained, wants_pretrained

        if wants_pretrained(arch, weights):
            model, info = build_pretrained(arch, weights, num_classes)
            setattr(model, WEIGHTS_ATTRIBUTE, info)
            return model.eval()
    if spec.family == "timm" and weights is not None:
        from critnet.models.timm_models import build_pretrained, pretrained_tag

        tag = pretrained_tag(arch, weights)
        if tag is not None:
            model = build_pretrained(arch, tag, classes)
            info = WeightsInfo(source=weights, path=f"timm:{arch}.{tag}".rstrip("."), sha256="")
            setattr(model, WEIGHTS_ATTRIBUTE, info)
            return model.eval()
    tv_weights = torchvision_weights(arch, weights) if spec.family == "imagenet" else None
    # Some torchvision weights fix constructor arguments (a ViT trained at 384 px), so they shape the model.
    model = spec.factory(num_classes=classes, weights=tv_weights) if tv_weights is not None else spec.factory(
        num_classes=classes)
    if weights is not None:
        adapt = adapt_torchvision_state(arch) if spec.family == "imagenet" else None
        info = load_weights(model, weights, arch, adapt=adapt)
    setattr(model, WEIGHTS_ATTRIBUTE, info)
    return model.eval()


def weights_info(model: nn.Module) -> WeightsInfo | None:
    """Where ``model``'s weights came from, if it was made by :func:`load_model`."""
    return getattr(model, WEIGHTS_ATTRIBUTE, None)
