"""torchvision's ImageNet ResNets, registered by their torchvision names."""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from critnet.models.registry import register_model

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _register(name: str) -> None:
    builder = getattr(tvm, name)

    @register_model(name, family="imagenet", default_num_classes=1000, input_size=224)
    def factory(num_classes: int = 1000) -> nn.Module:
        return builder(weights=None, num_classes=num_classes)

    factory.__name__ = name
    factory.__doc__ = f"torchvision {name} (ImageNet layout, 224×224 inputs)."


for _name in TORCHVISION_RESNETS:
    _register(_name)
