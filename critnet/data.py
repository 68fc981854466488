"""Datamodules for CIFAR-10 and ImageNet.

Evaluation splits (val/test/predict and the analysis loader) are never shuffled and
never padded: under DDP each rank reads a disjoint shard through
:class:`~critnet.distributed.UnpaddedDistributedSampler`, so metric sums count every
image exactly once. CIFAR normalisation uses ImageNet mean/std because that is what
the public CIFAR-10 ResNet checkpoints were trained with.

An image file that cannot be decoded stops the run with one :class:`ImageReadError` naming
it, or, with ``skip_unreadable``, is left out of its batch and listed by
:meth:`ClassificationDataModule.skipped_images`. The datamodule's loaders decide this in the
main process (see :class:`ReadingDataLoader`), so it works the same with worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import datasets, transforms

from critnet.distributed import UnpaddedDistributedSampler, all_gather_objects
from critnet.errors import CritnetError
from critnet.models.preprocessing import preprocessing
from critnet.models.spec import IMAGENET_MEAN, IMAGENET_STD

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(CritnetError):
    """A data root that cannot be used, with the path at fault in the message."""


class ImageReadError(DataError):
    """An image file that cannot be decoded (corrupt, truncated or not an image), named in the message.

    ``path`` and ``reason`` are None when torch re-raises it from a DataLoader worker: its ``ExceptionWrapper``
    rebuilds the exception from the message alone.
    """

    def __init__(self, message: str, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a broken file names itself instead of surfacing as a bare PIL error.

    ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False: a truncated file is an error, not an image padded with grey.
    """
    try:
        with open(path, "rb") as f:
            # convert() decodes; open() alone only reads the header, so a truncated body would pass it.
            return Image.open(f).convert("RGB")
    except UnidentifiedImageError:
        # PIL's own message repeats the path as a file-object repr
        reason = "not an image in a format PIL can read"
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        reason = str(err) or type(err).__name__
    raise ImageReadError(f"cannot read image {path}: {reason}", path, reason)


@dataclass(frozen=True)
class UnreadableImage:
    """What :class:`ReadingDataset` yields in place of a sample whose image cannot be decoded.

    Attributes:
        index: the sample's index in the dataset the loader reads.
        path: the image file.
        reason: why it cannot be read.
    """

    index: int
    path: str
    reason: str


class ReadingDataset(Dataset):
    """``dataset`` with an unreadable image returned as an :class:`UnreadableImage` instead of raised.

    Raising inside a DataLoader worker would reach the main process as a worker traceback; a marker travels back
    like any sample, and the main process decides (see :class:`ReadingDataLoader`).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except ImageReadError as err:
            return UnreadableImage(index, str(err.path), str(err.reason))


def collate_readable(samples: list[Any]) -> tuple[Any, list[UnreadableImage]]:
    """``(batch of the readable samples or None if there are none, the unreadable ones)``."""
    unreadable = [s for s in samples if isinstance(s, UnreadableImage)]
    readable = [s for s in samples if not isinstance(s, UnreadableImage)]
    return (default_collate(readable) if readable else None), unreadable


class UnreadableLog:
    """The unreadable images one split's loaders met in this process: stop at the first, or note each one.

    Args:
        skip: note and go on (``--data.skip_unreadable true``) instead of raising :class:`ImageReadError`.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.found: dict[int, str] = {}

    def add(self, unreadable: Sequence[UnreadableImage]) -> None:
        if unreadable and not self.skip:
            first = unreadable[0]
            raise ImageReadError(f"cannot read image {first.path}: {first.reason} "
                                 "(--data.skip_unreadable true leaves such files out)", first.path, first.reason)
        for image in unreadable:
            self.found[image.index] = image.path


class ReadingDataLoader(DataLoader):
    """A DataLoader over a :class:`ReadingDataset` that yields plain ``(inputs, targets)`` batches.

    The unreadable images of each batch go to ``unreadable`` (which raises unless skipping) in the main process;
    a batch whose images are all unreadable is not yielded, so there may be fewer batches than ``len()``.

    Args:
        dataset: the dataset to read (wrapped in a :class:`ReadingDataset` here unless it already is one).
        unreadable: where the unreadable images go.
        **kwargs: DataLoader arguments; ``collate_fn`` is always :func:`collate_readable`.
    """

    def __init__(self, dataset: Dataset, unreadable: UnreadableLog, **kwargs: Any) -> None:
        if not isinstance(dataset, ReadingDataset):
            dataset = ReadingDataset(dataset)
        kwargs["collate_fn"] = collate_readable
        super().__init__(dataset, **kwargs)
        # Lightning re-creates the loader (to inject a sampler) from its __init__ arguments and attributes.
        self.unreadable = unreadable

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Unpacking, not indexing: pin_memory rebuilds the (batch, unreadable) pair (as a list in older torch).
        for batch, unreadable in super().__iter__():
            self.unreadable.add(unreadable)
            if batch is not None:
                yield batch


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
    """Shared loader logic; subclasses build the datasets.

    Args:
        root: The data directory.
        batch_size: Images per batch for every split.
        num_workers: DataLoader worker processes.
        subset_size: Evaluate on this many images of the evaluation split instead of all.
        subset_seed: ``None`` takes the first ``subset_size`` images; an integer draws them at random with this seed.
        pin_memory: Pin host memory when a CUDA device is present.
        skip_unreadable: Leave out image files that cannot be decoded (corrupt, truncated, not an image) instead of
            stopping at the first; ``metrics.json`` lists them (``skipped_images``, ``skipped_paths``).
    """

    num_classes: int

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 2,
        subset_size: int | None = None,
        subset_seed: int | None = None,
        pin_memory: bool = True,
        skip_unreadable: bool = False,
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
        self.skip_unreadable = skip_unreadable
        self.train_dataset: Dataset | None = None
        self.eval_dataset: Dataset | None = None
        self._unreadable: dict[str, UnreadableLog] = {}

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

    def reading_loader(self, dataset: Dataset, split: str, **kwargs: Any) -> ReadingDataLoader:
        """A DataLoader over ``dataset`` that stops at an unreadable image with one :class:`ImageReadError` or, with
        ``skip_unreadable``, leaves it out and notes it under ``split`` (see :meth:`skipped_images`).

        Args:
            dataset: the samples to read; indices noted under ``split`` are indices of this dataset, so give each
                dataset its own ``split`` name (``"train"`` and ``"eval"`` are the datamodule's own).
            split: the name the unreadable images are noted under.
            **kwargs: DataLoader arguments; ``batch_size`` (unless a ``batch_sampler`` is given) and
                ``num_workers`` default to the datamodule's.
        """
        if kwargs.get("batch_sampler") is None:
            kwargs.setdefault("batch_size", self.batch_size)
        kwargs.setdefault("num_workers", self.num_workers)
        log = self._unreadable.setdefault(split, UnreadableLog(self.skip_unreadable))
        return ReadingDataLoader(dataset, log, **kwargs)

    def skipped_images(self, split: str = "eval", gather: bool = False) -> list[str]:
        """The image files of ``split`` left out as unreadable so far, sorted, each once.

        Empty unless ``skip_unreadable`` (without it the first unreadable image stops the run). ``"eval"`` is the
        evaluation split as read by the val/test/predict and analysis loaders, ``"train"`` the training split.

        Args:
            split: which loaders' images (the ``split`` given to :meth:`reading_loader`).
            gather: the union over all ranks of a torch.distributed job (a collective: every rank must call it
                with ``gather=True``); False = the images this process read.
        """
        log = self._unreadable.get(split)
        local = sorted(set(log.found.values())) if log is not None else []
        if not gather:
            return local
        return sorted({path for paths in all_gather_objects(local) for path in paths})

    def skipped_indices(self, split: str = "eval") -> list[int]:
        """Indices (in the dataset that ``split``'s loaders read) of the samples this process left out, sorted."""
        log = self._unreadable.get(split)
        return sorted(log.found) if log is not None else []

    def _loader(self, dataset: Dataset, split: str, *, shuffle: bool = False, sampler=None,
                drop_last: bool = False) -> DataLoader:
        return self.reading_loader(
            dataset,
            split,
            shuffle=shuffle,
            sampler=sampler,
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
        return self._loader(self.eval_dataset, "eval", sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "setup('fit') must run first"
        return self._loader(self.train_dataset, "train", shuffle=True, drop_last=True)

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

        With ``skip_unreadable`` a batch holds only its readable images (a batch with none is left out), the same
        ones on every pass; the skipped files are noted under ``"eval"`` (:meth:`skipped_images`).
        """
        if self.eval_dataset is None:
            self.setup("validate")
        assert self.eval_dataset is not None
        if world_size == 1:
            return self.reading_loader(self.eval_dataset, "eval", shuffle=False)
        batches = BatchShard(len(self.eval_dataset), self.batch_size, rank, world_size)  # type: ignore[arg-type]
        return self.reading_loader(self.eval_dataset, "eval", batch_sampler=batches)


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
        skip_unreadable: Leave out image files that cannot be decoded (corrupt, truncated, not an image) instead of
            stopping at the first; ``metrics.json`` lists them (``skipped_images``, ``skipped_paths``).
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
        skip_unreadable: bool = False,
        format: Literal["auto", "binary", "folder"] = "auto",
        download: bool = False,
        augment: bool = True,
    ) -> None:
        super().__init__(root, batch_size, num_workers, subset_size, subset_seed, pin_memory, skip_unreadable)
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
        skip_unreadable: Leave out image files that cannot be decoded (corrupt, truncated, not an image) instead of
            stopping at the first; ``metrics.json`` lists them (``skipped_images``, ``skipped_paths``).
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
        skip_unreadable: bool = False,
        num_classes: int = 1000,
        resize_size: int | None = None,
        crop_size: int | None = None,
        arch: str | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__(root, batch_size, num_workers, subset_size, subset_seed, pin_memory, skip_unreadable)
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
