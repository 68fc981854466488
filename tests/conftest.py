"""Shared fixtures: the read-only ../shared material and small real-data batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_ROOT = SHARED / "data" / "cifar10"
CIFAR_CHECKPOINTS = SHARED / "checkpoints" / "cifar10"
RESNET20_WEIGHTS = CIFAR_CHECKPOINTS / "resnet20-12fca82f.th"

requires_shared = pytest.mark.skipif(not RESNET20_WEIGHTS.is_file(), reason="../shared is not beside the repo")


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One intra-op thread per test process. The suite runs on 2-core machines where DDP tests start two
    processes and other jobs may run beside it: competing OpenMP thread pools make a forward pass many times
    slower. No result depends on it (both sides of every comparison run with the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the repo")
    return SHARED


@pytest.fixture()
def resnet20_cifar():
    """The public ResNet20 in eval mode, loaded through critnet's own loader."""
    if not RESNET20_WEIGHTS.is_file():
        pytest.skip("../shared is not beside the repo")
    from critnet.checkpoints import load_weights
    from critnet.models import build_model

    model = build_model("resnet20")
    load_weights(model, str(RESNET20_WEIGHTS), "resnet20")
    return model.eval()


def first_test_images(n: int, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images of the shared CIFAR-10 test split, in dataset order, as (x, y) batches."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torch.utils.data.Subset(datasets.ImageFolder(CIFAR_ROOT / "test", tf), range(n))
    return list(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False))


@pytest.fixture(scope="session")
def cifar_test_256():
    """The first 256 shared test images in two batches of 128."""
    if not CIFAR_ROOT.is_dir():
        pytest.skip("../shared is not beside the repo")
    return first_test_images(256)
