"""Every torchvision classification model, registered by its torchvision name.

Input sizes come from the weights' metadata: ``input_size`` is the eval crop of the default weights and
``min_input_size`` the smallest side torchvision documents (``meta["min_size"]``); models whose position
embeddings or attention windows fix the size (ViT, Swin, MaxViT) have both equal.
"""

from __future__ import annotations

import re
from typing import Callable

import torchvision.models as tvm
from torch import nn

from critnet.models.registry import register_model

#: torchvision's own list of classification models (detection, segmentation, video and quantized ones live in
#: sub-modules and are not included).
TORCHVISION_CLASSIFIERS: tuple[str, ...] = tuple(tvm.list_models(module=tvm))
# The smallest side that still gives a valid forward pass; torchvision's meta says 1 for nets whose global pooling
# would accept it, but their stride-32 feature maps then shrink to nothing useful for an analysis.
_FLOOR = 32


def image_size_kwargs(name: str, weights) -> dict:
    """Constructor arguments that a set of weights fixes (ViT weights trained at another resolution)."""
    if weights is not None and name.startswith("vit_"):
        return {"image_size": weights.meta["min_size"][0]}
    return {}


def _register(name: str) -> None:
    builder = tvm.get_model_builder(name)
    default = tvm.get_model_weights(name).DEFAULT
    crop = default.transforms().crop_size[0]
    minimum = default.meta.get("min_size", (crop, crop))[0]

    @register_model(name, family="imagenet", default_num_classes=1000, input_size=crop,
                    min_input_size=max(minimum, _FLOOR) if minimum < crop else crop)
    def factory(num_classes: int = 1000, weights=None) -> nn.Module:
        # inception_v3/googlenet build auxiliary heads only for training; analyses need one output tensor.
        extra = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        # without weights, build for the registered input size (the default weights' crop): ViT-H/14's is 518,
        # its builder's own default 224
        size = image_size_kwargs(name, weights if weights is not None else default)
        return builder(weights=None, num_classes=num_classes, **extra, **size)

    factory.__name__ = name
    factory.__doc__ = f"torchvision {name} ({crop}×{crop} inputs)."


for _name in TORCHVISION_CLASSIFIERS:
    _register(_name)


# Published DenseNet files predate a rename of their layer keys ("norm.1" → "norm1"); torchvision rewrites them on
# load, and so must anyone loading the same files.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
# Auxiliary classifiers exist only for training; critnet builds these models without them.
_AUXILIARY_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def adapt_torchvision_state(name: str) -> Callable[[dict], dict]:
    """The rewrite of a torchvision checkpoint's state dict that ``name``'s own loader applies."""

    def adapt(state: dict) -> dict:
        if name.startswith("densenet"):
            renamed = {}
            for key, value in state.items():
                match = _DENSENET_OLD_KEY.match(key)
                renamed[match.group(1) + match.group(2) if match else key] = value
            state = renamed
        if name in ("googlenet", "inception_v3"):
            state = {k: v for k, v in state.items() if not k.startswith(_AUXILIARY_PREFIXES)}
        return state

    return adapt
