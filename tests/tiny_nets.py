"""The tiny CNN and random data of test_faults.py, in a module that imports neither Lightning nor conftest, so that
the two gloo processes of tests/gloo_runs.py can build them without importing Lightning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Conv → BN → ReLU, a residual conv pair, pooling and a linear head: every shape the engine plans for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    model.conv1.weight.data[0, 0, 0, 0] = 0.0  # a zero weight: its sign flip leaves every logit as it was
    return model.eval()


def tiny_data(images: int = 24, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 6, 6, generator=generator)
    y = torch.randint(0, 5, (images,), generator=generator)
    return [(x[i: i + batch], y[i: i + batch]) for i in range(0, images, batch)]


class SmallResNet(nn.Module):
    """Three convolutions with batch norms (the second in a residual pair, the third strided) and a 10-class head:
    the channel shortcut of several conv layers, packs across batches, a (quantized) residual add, top-5 < classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_net(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    model = SmallResNet()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
