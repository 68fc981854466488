"""Loading weights into a model from a file or from a known public checkpoint.

Accepted files: raw state dicts (``.th``/``.pth``/``.pt``), with or without a
``state_dict`` wrapper and a ``module.`` (DataParallel) prefix, and Lightning
``.ckpt`` files written by :class:`critnet.module.ClassifierModule`. Known names
(``resnet20-cifar10``, ``ResNet50_Weights.IMAGENET1K_V2``, ...) are downloaded
once into the checkpoint directory and hash-verified before every load.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from critnet.errors import CritnetError

#: Where known checkpoints are downloaded to; ``CRITNET_CHECKPOINT_DIR`` overrides it.
DEFAULT_CHECKPOINT_DIR = Path("checkpoints")

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"


@dataclass(frozen=True)
class KnownCheckpoint:
    """A public checkpoint: where to get it and how to recognise it."""

    arch: str
    url: str
    sha256: str  # full digest, or the published prefix where only that is known (torch.hub convention)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


#: Public CIFAR-10 ResNets (akamaster/pytorch_resnet_cifar10, BSD-2-Clause).
KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "resnet20-cifar10": KnownCheckpoint(
        "resnet20", f"{_AKAMASTER}/resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    "resnet32-cifar10": KnownCheckpoint(
        "resnet32", f"{_AKAMASTER}/resnet32-d509ac18.th",
        "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    "resnet44-cifar10": KnownCheckpoint(
        "resnet44", f"{_AKAMASTER}/resnet44-014dd654.th",
        "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    "resnet56-cifar10": KnownCheckpoint(
        "resnet56", f"{_AKAMASTER}/resnet56-4bfd9763.th",
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
    "resnet110-cifar10": KnownCheckpoint("resnet110", f"{_AKAMASTER}/resnet110-1d1ed7c2.th", "1d1ed7c2"),
}


class CheckpointError(CritnetError):
    """A checkpoint that cannot be loaded into the requested model."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from, for the run's artifacts."""

    source: str
    path: str
    sha256: str


def checkpoint_dir() -> Path:
    return Path(os.environ.get("CRITNET_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: str) -> str:
    actual = sha256_of(path)
    if not actual.startswith(expected):
        raise CheckpointError(
            f"{path}: sha256 {actual} does not match the published {expected}; "
            "the file is corrupt or not the checkpoint it claims to be — delete it to download again"
        )
    return actual


def _download(url: str, dst: Path, expected: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
        _verify(tmp, expected)
        tmp.replace(dst)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"could not download {url} ({reason}); offline? Fetch that URL on a machine with internet and put the "
            f"file at {dst.resolve()} (or pass it with --model.weights PATH)"
        ) from err


def torchvision_weights(arch: str, name: str | None):
    """The torchvision weights enum member ``name`` means for ``arch`` (``IMAGENET1K_V1``, ``DEFAULT``,
    ``ResNet50_Weights.IMAGENET1K_V2``), or None.

    >>> torchvision_weights("resnet50", "DEFAULT").name
    'IMAGENET1K_V2'
    """
    if not name:
        return None
    import torchvision.models as tvm

    enum_name, _, member = name.rpartition(".")
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    if enum_name and enum_name != enum.__name__:
        return None
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        return None


def resolve_weights(source: str, arch: str) -> tuple[Path, str | None]:
    """Turn ``--model.weights`` into a local file, downloading a known checkpoint if needed.

    Returns the path and the expected sha256 (prefix) when the source was a known name.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, None
    known = KNOWN_CHECKPOINTS.get(source)
    if known is not None:
        if known.arch != arch:
            raise CheckpointError(f"--model.weights {source!r} is a {known.arch} checkpoint, but the model is {arch}")
        dst = checkpoint_dir() / known.filename
        if not dst.is_file():
            _download(known.url, dst, known.sha256)
        return dst, known.sha256
    tv_weights = torchvision_weights(arch, source)
    if tv_weights is not None:
        filename = tv_weights.url.rsplit("/", 1)[-1]
        # torchvision file names end in the first hex digits of the file's sha256.
        prefix = filename.rsplit("-", 1)[-1].split(".")[0]
        dst = checkpoint_dir() / filename
        if not dst.is_file():
            _download(tv_weights.url, dst, prefix)
        return dst, prefix
    if path.suffix or os.sep in source:
        raise CheckpointError(f"--model.weights: no such file: {source}")
    raise CheckpointError(
        f"--model.weights {source!r} is neither a file nor a known checkpoint; known names: "
        f"{', '.join(KNOWN_CHECKPOINTS)}; for {arch}: {_torchvision_names(arch) or 'no torchvision weights'}"
    )


def _torchvision_names(arch: str) -> str:
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        return ""
    return ", ".join(["DEFAULT", *(member.name for member in enum)])


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    state = dict(obj)
    for prefix in ("module.", "model."):  # DataParallel / ClassifierModule.model
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from any supported checkpoint file (on the CPU)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:
        if path.suffix != ".ckpt":
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({safe_error})") from safe_error
        # Lightning checkpoints may pickle hyper-parameters that weights_only refuses; the user named this file.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot be read as a Lightning checkpoint ({err})") from err
    return _unwrap_state_dict(obj, path)


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    # Old checkpoints predate BatchNorm's step counter; it does not affect evaluation.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

        raise CheckpointError(
            f"{origin} does not fit the model ({type(model).__name__}): "
            f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; mis-shaped keys: {show(misshaped)}. "
            "Is --model.arch (or the number of classes) the one this checkpoint was trained with?"
        )


def load_weights(
    model: nn.Module,
    source: str,
    arch: str,
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> WeightsInfo:
    """Load ``source`` (a file or a known name) into ``model`` strictly; the model is untouched on error.

    ``adapt`` rewrites the file's state dict first (old key names of a published checkpoint, say).
    """
    path, expected = resolve_weights(source, arch)
    digest = _verify(path, expected) if expected else sha256_of(path)
    state = read_state_dict(path)
    if adapt is not None:
        state = adapt(state)
    check_compatible(model, state, str(path))
    model.load_state_dict(state, strict=False)  # strictness was checked above, with a better message
    return WeightsInfo(source=source, path=str(path), sha256=digest)
