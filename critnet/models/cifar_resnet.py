"""CIFAR ResNets (He et al. 2016, §4.2) with option-A shortcuts.

Parameter and buffer names match the public CIFAR-10 checkpoints of
akamaster/pytorch_resnet_cifar10 (after stripping their ``module.`` prefix), so
those files load with ``strict=True``. Unlike that implementation, the option-A
shortcut is a named module instead of a lambda and the residual sum is not
in-place, so the network can be traced by ``torch.fx`` (the ranking engine cuts
it into a cached prefix and a re-evaluated suffix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from critnet.models.registry import register_model


class ZeroPadShortcut(nn.Module):
    """Option A: subsample spatially by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ZeroPadShortcut(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 16/32/64 channels in three stages of n blocks."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _register(depth: int) -> None:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")

    @register_model(f"resnet{depth}", family="cifar", default_num_classes=10, input_size=32)
    def factory(num_classes: int = 10) -> CifarResNet:
        return CifarResNet((depth - 2) // 6, num_classes)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (option-A shortcuts)."


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
