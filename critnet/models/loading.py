"""A registered model with its weights, loaded the one way the CLI and the Python API share."""

from __future__ import annotations

from torch import nn

from critnet.checkpoints import WeightsInfo, load_weights
from critnet.models.registry import build_model, get_model_spec

#: The attribute of a model returned by :func:`load_model` that says where its weights came from.
WEIGHTS_ATTRIBUTE = "critnet_weights"


def load_model(arch: str, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """A registered architecture in eval mode, with weights from a file or a known name (strictly checked).

    Args:
        arch: a registered model name (``critnet.models.list_models()``), e.g. ``"resnet20"``.
        weights: a state-dict file (``.th``/``.pth``/``.pt``), a Lightning ``.ckpt`` or a known checkpoint name;
            ``None`` keeps the random initialisation.
        num_classes: output classes; default: the architecture's own.

    The returned module carries :class:`~critnet.checkpoints.WeightsInfo` (path and sha256 of the weights) as
    ``model.critnet_weights`` (None for random weights), which the reports record.

    >>> model = load_model("resnet20")
    >>> model.training, model.critnet_weights
    (False, None)
    """
    spec = get_model_spec(arch)
    model = build_model(arch, num_classes if num_classes is not None else spec.default_num_classes)
    info: WeightsInfo | None = None
    if weights is not None:
        info = load_weights(model, weights, arch)
    setattr(model, WEIGHTS_ATTRIBUTE, info)
    return model.eval()


def weights_info(model: nn.Module) -> WeightsInfo | None:
    """Where ``model``'s weights came from, if it was made by :func:`load_model`."""
    return getattr(model, WEIGHTS_ATTRIBUTE, None)
