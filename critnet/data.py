"""Datamodules for CIFAR-10 and ImageNet.

Evaluation splits (val/test/predict and the analysis loader) are never shuffled and
never padded: under DDP each rank reads a disjoint shard through
:class:`~critnet.distributed.UnpaddedDistributedSampler`, so metric sums count every
image exactly once. CIFAR normalisation uses ImageNet mean/std because that is what
the public CIFAR-10 ResNet checkpoints were trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Sequence

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from critnet.distributed import UnpaddedDistributedSampler
from critnet.errors import CritnetError
from critnet.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocessing

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(CritnetError):
    """A data root that cannot be used, with the path at fault in the message."""


class ImageReadError(OSError):
    """An image file that cannot be decoded."""


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a broken file names itself instead of surfacing as a bare PIL error."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from None


def image_folder(split_dir: Path, transform: Callable, expected_classes: int | None = None) -> datasets.ImageFolder:
    """An ImageFolder over ``split_dir/<class>/<image>`` with layout errors that name the path."""
    if not split_dir.is_dir():
        raise DataError(f"--data.root: expected the directory {split_dir} (layout <root>/<split>/<class>/<image>)")
    try:
        ds = datasets.ImageFolder(str(split_dir), transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"--data.root: {split_dir} has no class folders with images ({err})") from None
    if expected_classes is not None and len(ds.classes) != expected_classes:
        raise DataError(
            f"--data.root: {split_dir} has {len(ds.classes)} class folders, expected {expected_classes}"
        )
    return ds


def evaluation_subset(dataset: Dataset, size: int | None, seed: int | None) -> Dataset:
    """The first ``size`` samples, or ``size`` samples drawn with ``seed`` (kept in dataset order)."""
    if size is None:
        return dataset
    total = len(dataset)  # type: ignore[arg-type]
    if not 0 < size <= total:
        raise DataError(f"--data.subset_size must be in [1, {total}] (the evaluation split's size), got {size}")
    if seed is None:
        indices: Sequence[int] = range(size)
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(total, generator=generator)[:size].tolist())
    return Subset(dataset, list(indices))


class ClassificationDataModule(L.LightningDataModule):
    """Shared loader logic; subclasses build the datasets."""

    num_classes: int

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 2,
        subset_size: int | None = None,
        subset_seed: int | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"--data.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.subset_size = subset_size
        self.subset_seed = subset_seed
        self.pin_memory = pin_memory
        self.train_dataset: Dataset | None = None
        self.eval_dataset: Dataset | None = None

    # The training split is only built when fitting, so evaluating needs no train/ directory.
    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def build_eval_dataset(self) -> Dataset:
        raise NotImplementedError

    def build_held_out_dataset(self) -> Dataset:
        """The training split with the evaluation transforms: images for calibrating an analysis (e.g. a criticality
        ranking) that the evaluation never sees."""
        raise NotImplementedError

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"--data.root: {self.root} does not exist or is not a directory")

    def setup(self, stage: str | None = None) -> None:
        self._check_root()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.build_train_dataset()
        if self.eval_dataset is None:
            self.eval_dataset = evaluation_subset(self.build_eval_dataset(), self.subset_size, self.subset_seed)
            if len(self.eval_dataset) == 0:  # type: ignore[arg-type]
                raise DataError(f"--data.root: the evaluation split under {self.root} is empty")

    def _loader(self, dataset: Dataset, *, shuffle: bool = False, sampler=None, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )

    def _eval_loader(self) -> DataLoader:
        assert self.eval_dataset is not None, "setup() must run first"
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(self.eval_dataset, trainer.world_size, trainer.global_rank)
        return self._loader(self.eval_dataset, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "setup('fit') must run first"
        return self._loader(self.train_dataset, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def analysis_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The evaluation split (subset applied) in dataset order, for analyses.

        With the defaults every rank gets the whole split (rankings share units, not images, among ranks). With
        ``world_size > 1`` rank ``r`` gets only the batches ``r, r + world_size, …`` of that order, so a sweep that
        shares images among ranks reads and decodes each image once in all.
        """
        if self.eval_dataset is None:
            self.setup("validate")
        assert self.eval_dataset is not None
        if world_size == 1:
            return DataLoader(self.eval_dataset, batch_size=self.batch_size, shuffle=False,
                              num_workers=self.num_workers)
        batches = BatchShard(len(self.eval_dataset), self.batch_size, rank, world_size)  # type: ignore[arg-type]
        return DataLoader(self.eval_dataset, batch_sampler=batches, num_workers=self.num_workers)


class BatchShard:
    """The index lists of batches ``rank, rank + world_size, …`` of a sequential, unshuffled batching of
    ``size`` samples (the last batch may be short)."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size

    def __iter__(self):
        for start in range(self.rank * self.batch_size, self.size, self.world_size * self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.size)))

    def __len__(self) -> int:
        batches = -(-self.size // self.batch_size)
        return len(range(self.rank, batches, self.world_size))


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 from torchvision's binary format or from an ImageFolder tree.

    Args:
        root: Either a directory holding ``cifar-10-batches-py`` (torchvision's format; see
            ``download``) or an ImageFolder tree ``<root>/{train,test}/<class>/*.jpg``.
        batch_size: Images per batch for every split.
        num_workers: DataLoader worker processes.
        subset_size: Evaluate on this many test images instead of all (a calibration subset).
        subset_seed: ``None`` takes the first ``subset_size`` images; an integer draws them at random with this seed.
        pin_memory: Pin host memory when a CUDA device is present.
        format: ``auto`` detects the layout; ``binary`` or ``folder`` force one.
        download: Download the binary format into ``root`` if it is missing.
        augment: Random crop (pad 4) and horizontal flip for training.
    """

    num_classes = 10

    def __init__(
        self,
        root: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 2,
        subset_size: int | None = None,
        subset_seed: int | None = None,
        pin_memory: bool = True,
        format: Literal["auto", "binary", "folder"] = "auto",
        download: bool = False,
        augment: bool = True,
    ) -> None:
        super().__init__(root, batch_size, num_workers, subset_size, subset_seed, pin_memory)
        self.format = format
        self.download = download
        self.augment = augment
        normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.eval_transform = transforms.Compose(normalize)
        train_ops = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        self.train_transform = transforms.Compose(train_ops + normalize)

    def prepare_data(self) -> None:
        if self.download and self._layout() != "folder":
            datasets.CIFAR10(str(self.root), train=True, download=True)
            datasets.CIFAR10(str(self.root), train=False, download=True)

    def _check_root(self) -> None:
        if self.download and not self.root.exists():
            self.root.mkdir(parents=True)
        super()._check_root()

    def _layout(self) -> str:
        if self.format != "auto":
            return self.format
        if (self.root / "cifar-10-batches-py").is_dir() or self.download:
            return "binary"
        if (self.root / "test").is_dir() or (self.root / "train").is_dir():
            return "folder"
        raise DataError(
            f"--data.root: {self.root} holds neither cifar-10-batches-py (torchvision's binary format; "
            "add --data.download true to fetch it) nor an ImageFolder tree train/ and test/"
        )

    def _dataset(self, train: bool, transform=None) -> Dataset:
        if transform is None:
            transform = self.train_transform if train else self.eval_transform
        if self._layout() == "binary":
            try:
                return datasets.CIFAR10(str(self.root), train=train, transform=transform, download=False)
            except RuntimeError as err:
                raise DataError(f"--data.root: {self.root}: {err}") from None
        return image_folder(self.root / ("train" if train else "test"), transform, expected_classes=10)

    def build_train_dataset(self) -> Dataset:
        return self._dataset(train=True)

    def build_eval_dataset(self) -> Dataset:
        return self._dataset(train=False)

    def build_held_out_dataset(self) -> Dataset:
        self._check_root()
        return self._dataset(train=True, transform=self.eval_transform)


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet (ILSVRC-2012) in the standard ImageFolder layout ``<root>/{train,val}/<wnid>/*.JPEG``.

    Evaluation uses the eval transform of the model's weights (``weights.transforms()`` of torchvision: resize,
    centre crop, interpolation, mean/std differ per model), taken from ``arch``/``weights``, which the CLI fills in
    from ``--model.arch``/``--model.weights``; ``resize_size``/``crop_size`` override the sizes. Without a model:
    resize 256, centre crop 224, ImageNet mean/std.

    Args:
        root: Directory holding ``train/`` and ``val/`` (``val/`` sorted into class folders).
        batch_size: Images per batch per device.
        num_workers: DataLoader worker processes per device.
        subset_size: Evaluate on this many validation images instead of all (a calibration subset).
        subset_seed: ``None`` takes the first ``subset_size`` images; an integer draws them at random with this seed.
        pin_memory: Pin host memory when a CUDA device is present.
        num_classes: Class folders expected under ``val/`` (1000 for ILSVRC-2012).
        resize_size: Shorter side after resizing, before the centre crop; ``None`` = the weights' own.
        crop_size: Side of the centre (evaluation) or random-resized (training) crop; ``None`` = the weights' own.
        arch: The model whose weights' preprocessing to use; set from ``--model.arch`` by the CLI.
        weights: Its weights (a torchvision weight name picks that name's transforms); set from ``--model.weights``.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 64,
        num_workers: int = 8,
        subset_size: int | None = None,
        subset_seed: int | None = None,
        pin_memory: bool = True,
        num_classes: int = 1000,
        resize_size: int | None = None,
        crop_size: int | None = None,
        arch: str | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__(root, batch_size, num_workers, subset_size, subset_seed, pin_memory)
        self.num_classes = num_classes
        self.preprocessing = preprocessing(arch, weights).with_sizes(resize_size, crop_size)
        self.eval_transform = self.preprocessing.eval_transform()
        self.train_transform = self.preprocessing.train_transform()

    def build_train_dataset(self) -> Dataset:
        return image_folder(self.root / "train", self.train_transform, expected_classes=self.num_classes)

    def build_eval_dataset(self) -> Dataset:
        return image_folder(self.root / "val", self.eval_transform, expected_classes=self.num_classes)

    def build_held_out_dataset(self) -> Dataset:
        self._check_root()
        return image_folder(self.root / "train", self.eval_transform, expected_classes=self.num_classes)
