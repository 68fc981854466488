"""What critnet knows about a model before building it: its :class:`ModelSpec`, the name prefixes of the optional
families, and the evaluation :class:`Preprocessing` its weights expect. Every family module builds on this one, and
the registry on the families."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn
from torchvision import transforms

from critnet.errors import CritnetError

ModelFactory = Callable[..., nn.Module]

#: Prefix of timm model names: ``timm/vit_tiny_patch16_224``.
TIMM_PREFIX = "timm/"
#: Prefix of Hugging Face transformers classifiers: ``hf/google/vit-base-patch16-224``, ``hf/path/to/directory``.
HF_PREFIX = "hf/"
#: ``--model.weights`` values that mean "the named model's own pretrained weights" (timm's default tag, a
#: transformers checkpoint's weights).
PRETRAINED_NAMES = ("pretrained", "DEFAULT")


class MissingExtraError(CritnetError):
    """An optional dependency that is not installed."""


@dataclass(frozen=True)
class ModelSpec:
    """What critnet knows about a registered architecture.

    Attributes:
        name: the registered name (``--model.arch``).
        factory: builds the model with random weights: ``factory(num_classes=...)``.
        family: ``cifar`` (CIFAR layout), ``imagenet`` (torchvision, ImageNet layout), ``timm`` or ``hf``
            (Hugging Face transformers).
        default_num_classes: output classes when none are asked for.
        input_size: the side of the square input the model is meant for (the eval crop of its default weights).
        min_input_size: the smallest input side it accepts; equal to ``input_size`` where only that size works
            (ViT, Swin: position embeddings and attention windows fix it).
    """

    name: str
    factory: ModelFactory
    family: str
    default_num_classes: int
    input_size: int
    min_input_size: int | None = None

    @property
    def smallest_input(self) -> int:
        return self.input_size if self.min_input_size is None else self.min_input_size


class UnknownModelError(CritnetError):
    """A model name that is not registered."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC,
                  "nearest": transforms.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, centre-crop ``crop_size``, scale to [0, 1], normalise."""

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def with_sizes(self, resize_size: int | None = None, crop_size: int | None = None) -> Preprocessing:
        """These settings with the sizes a user asked for; a crop alone keeps the weights' resize-to-crop ratio.

        >>> Preprocessing(256, 224).with_sizes(crop_size=112)
        Preprocessing(resize_size=128, crop_size=112, interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        """
        if crop_size is not None and resize_size is None:
            resize_size = round(crop_size * self.resize_size / self.crop_size)
        return replace(self, resize_size=resize_size or self.resize_size, crop_size=crop_size or self.crop_size)

    def eval_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.Resize(self.resize_size, interpolation=INTERPOLATIONS[self.interpolation]),
            transforms.CenterCrop(self.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def train_transform(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomResizedCrop(self.crop_size, interpolation=INTERPOLATIONS[self.interpolation]),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])
