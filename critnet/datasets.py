"""A datamodule for any ImageFolder tree: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (or ``test/``)."""

from __future__ import annotations

from typing import Literal

from torch.utils.data import Dataset

from critnet.data import ClassificationDataModule, DataError, image_folder
from critnet.models.preprocessing import preprocessing
from critnet.models.spec import INTERPOLATIONS, Preprocessing

EVAL_SPLITS = ("val", "test")


class ImageFolderDataModule(ClassificationDataModule):
    """Any ImageFolder tree ``<root>/{train,val|test}/<class>/<image>``, classes from the folder names.

    Preprocessing (resize, centre crop, interpolation, mean/std) defaults to the model's: the CLI fills ``arch`` and
    ``weights`` in from ``--model.arch``/``--model.weights``; each of the other settings overrides one part.

    Args:
        root: Directory holding ``val/`` or ``test/`` (evaluation) and, for training, ``train/``.
        batch_size: Images per batch per device.
        num_workers: DataLoader worker processes per device.
        subset_size: Evaluate on this many images instead of all (a calibration subset).
        subset_seed: ``None`` takes the first ``subset_size`` images; an integer draws them at random with this seed.
        pin_memory: Pin host memory when a CUDA device is present.
        image_size: Side of the square model input (the centre crop); ``None`` = the model's.
        resize_size: Shorter side after resizing, before the crop; ``None`` = the model's ratio to ``image_size``.
        mean: Per-channel mean for normalisation; ``None`` = the model's (ImageNet's without a model).
        std: Per-channel standard deviation for normalisation; ``None`` = the model's.
        interpolation: Resize interpolation; ``None`` = the model's.
        eval_split: The evaluation folder: ``val``, ``test`` or ``auto`` (``val`` if present, else ``test``).
        arch: The model whose preprocessing to start from; set from ``--model.arch`` by the CLI.
        weights: Its weights; set from ``--model.weights`` by the CLI.

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     for name in ("cat", "dog", "fox"):
    ...         os.makedirs(os.path.join(root, "val", name))
    ...     data = ImageFolderDataModule(root, image_size=32, arch="mobilenet_v2")
    >>> data.num_classes, data.preprocessing.crop_size
    (3, 32)
    """

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 2,
        subset_size: int | None = None,
        subset_seed: int | None = None,
        pin_memory: bool = True,
        image_size: int | None = None,
        resize_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None,
        eval_split: Literal["auto", "val", "test"] = "auto",
        arch: str | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__(root, batch_size, num_workers, subset_size, subset_seed, pin_memory)
        base = preprocessing(arch, weights).with_sizes(resize_size, image_size)
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise DataError(f"--data.interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        self.preprocessing = Preprocessing(
            base.resize_size, base.crop_size, interpolation or base.interpolation,
            tuple(mean) if mean is not None else base.mean, tuple(std) if std is not None else base.std,
        )
        self.eval_split = eval_split
        # Counted now: the CLI reads it to build the model, and an error raised while linking would lose its flag.
        self.num_classes = self._count_classes()
        self.eval_transform = self.preprocessing.eval_transform()
        self.train_transform = self.preprocessing.train_transform()

    def _eval_dir(self):
        if self.eval_split != "auto":
            return self.root / self.eval_split
        for split in EVAL_SPLITS:
            if (self.root / split).is_dir():
                return self.root / split
        raise DataError(f"--data.root: {self.root} has neither val/ nor test/ (layout <root>/{{train,val|test}}/<class>/)")

    def _count_classes(self) -> int:
        """The number of class folders of the evaluation split."""
        self._check_root()
        split = self._eval_dir()
        if not split.is_dir():
            raise DataError(f"--data.root: expected the directory {split} (layout <root>/<split>/<class>/<image>)")
        return sum(1 for entry in split.iterdir() if entry.is_dir())

    def build_train_dataset(self) -> Dataset:
        return image_folder(self.root / "train", self.train_transform, expected_classes=self.num_classes)

    def build_eval_dataset(self) -> Dataset:
        return image_folder(self._eval_dir(), self.eval_transform)

    def build_held_out_dataset(self) -> Dataset:
        self._check_root()
        return image_folder(self.root / "train", self.eval_transform, expected_classes=self.num_classes)
