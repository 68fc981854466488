"""Shared fixtures: the read-only ../shared material and small real-data batches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "critnet" / "presets"  # the command line's YAML presets, shipped in the package
SHARED = REPO.parent / "shared"
CIFAR_ROOT = SHARED / "data" / "cifar10"
CIFAR_CHECKPOINTS = SHARED / "checkpoints" / "cifar10"
RESNET20_WEIGHTS = CIFAR_CHECKPOINTS / "resnet20-12fca82f.th"

requires_shared = pytest.mark.skipif(not RESNET20_WEIGHTS.is_file(), reason="../shared is not beside the repo")


def pytest_configure(config):
    """Import Lightning before anything imports rich (see critnet/__init__.py on the typing cache) in every process
    that runs tests, but not in pytest-xdist's controller, which runs none: on a 2-core machine its import of
    torch and Lightning delays the start of the workers by about as long as they take to import the same."""
    if config.getoption("numprocesses", default=None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return
    import lightning.pytorch  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread_for_shared_fixtures():
    """The same single thread for the module- and session-scoped fixtures (shared CLI runs, the seed preset):
    pytest sets those up before any function-scoped fixture, so without this they ran with every core's thread
    pool, several times slower beside other jobs on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One intra-op thread per test process. The suite runs on 2-core machines where DDP tests start two
    processes and other jobs may run beside it: competing OpenMP thread pools make a forward pass many times
    slower. No result depends on it (both sides of every comparison run with the same setting)."""
    import torch

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
    from critnet.models import build_model
    from critnet.models.checkpoints import load_weights

    model = build_model("resnet20")
    load_weights(model, str(RESNET20_WEIGHTS), "resnet20")
    return model.eval()


def first_test_images(n: int, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images of the shared CIFAR-10 test split, in dataset order, as (x, y) batches."""
    import torch
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


# ---------------------------------------------------------------- comparing two different float32 computations
#
# Two computations of the same float32 quantity agree only to rounding once they take different kernels: oneDNN and
# ATen pick their kernels, and so the order of their sums, by CPU ISA (AVX2, AVX-512) and by shape (a batch size, a
# one-channel convolution against the whole layer). One float32 ulp is 1.2e-7 relative.
#
# F32_REL: the same logits, reduced differently (a float32 mean against a float64 sum of the same float32 losses,
# a float32 copy of a float64 mean): a few ulps; 1e-6 is about 8.
F32_REL = 1e-6
# KERNEL_REL: another kernel somewhere upstream of the logits (critnet recomputes a perturbed channel alone,
# stacks perturbed copies into larger batches, evaluates other batches on other ranks): the rounding difference at
# that layer passes through the rest of the network. Measured up to 3e-7 on ResNet20 loss sums (AVX2, and with
# ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default); 1e-5 leaves a margin and still catches any real
# difference (a wrong sample, unit or level moves a loss by far more).
KERNEL_REL = 1e-5


def f32_close(actual: float, expected: float, *, scale: float | None = None, rel: float = F32_REL) -> bool:
    """``actual`` equals ``expected`` to ``rel`` of ``scale`` (default: the larger magnitude of the two).

    Pass ``scale`` for a difference of two float32 results (a Δloss): its rounding error is relative to the
    operands (the losses), not to the small difference.
    """
    if scale is None:
        scale = max(abs(actual), abs(expected))
    return abs(actual - expected) <= rel * scale + 1e-12


def assert_ranked_like(
    units: list[str], reference: dict[str, float], *, rel: float = F32_REL, scale: float | None = None
) -> None:
    """``units`` (most critical first) holds the units of ``reference`` in descending order of their reference
    scores, but for neighbours within ``rel`` of ``scale`` (default: the larger score) of each other: rounding on
    another CPU may swap those. Pass ``scale`` (the loss) for Δloss scores."""
    assert sorted(units) == sorted(reference)
    for a, b in zip(units, units[1:]):
        size = scale if scale is not None else max(abs(reference[a]), abs(reference[b]))
        assert reference[a] >= reference[b] - rel * size, (a, b)


def once_per_test_run(tmp_path_factory, name: str, build) -> Path:
    """The folder ``build(folder)`` filled (or the path it returned), built once for the whole test run.

    Under pytest-xdist (`make test` runs two workers) every worker sets up its own session fixtures; the
    multi-process launches are the costliest of them, and each already keeps both cores busy. So the first worker
    that needs one builds it under a lock in the folder all workers share, and the others wait and read it. A build
    that fails leaves no marker, so the next worker that needs it tries again and reports its own failure.
    """
    import fcntl

    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name)
        return build(out) or out
    shared = tmp_path_factory.getbasetemp().parent
    out, built = shared / name, shared / f"{name}.built"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            out.mkdir(exist_ok=True)
            built.write_text(str(build(out) or out))
    return Path(built.read_text())


@pytest.fixture(scope="session")
def seed_preset_log_dir(tmp_path_factory) -> Path:
    """The log_dir of one `analyze.py validate` run of the rank_seed preset on the first 256 test images (its
    num_batches=1 ranks the first batch of 128), shared by the tests that check its files."""
    if not RESNET20_WEIGHTS.is_file():
        pytest.skip("../shared is not beside the repo")
    from test_ranking_cli import run_cli

    return once_per_test_run(tmp_path_factory, "seed_preset", lambda out: run_cli(out, subset=256))


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory) -> Path:
    """The output folder of tests/ddp_runs.py: every two-process CLI run of test_cli, test_ranking_ddp and
    test_prune_ddp in one DDP launch (two interpreters and one gloo group instead of four of each)."""
    import socket
    import subprocess
    import sys

    if not RESNET20_WEIGHTS.is_file():
        pytest.skip("../shared is not beside the repo")

    def launch(out: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}  # two processes on two cores
        done = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_runs.py"), str(out)], cwd=out, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    return once_per_test_run(tmp_path_factory, "ddp_runs", launch)


@pytest.fixture(scope="session")
def gloo_runs(tmp_path_factory, request) -> Path:
    """The output folder of tests/gloo_runs.py: the two-process (gloo) runs of test_engine_modes and test_faults,
    and the fresh-interpreter checks of test_api and test_perturb, in one pair of processes that import no
    Lightning."""
    import socket
    import subprocess
    import sys

    def launch(out: Path) -> None:
        import torch

        if RESNET20_WEIGHTS.is_file() and CIFAR_ROOT.is_dir():  # else only the parts that need no ../shared run
            torch.save(request.getfixturevalue("cifar_test_256"), out / "images.pt")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        # two processes on two cores; a bare environment for the Lightning-free API check of test_api, another
        # hash seed for the noise check of test_perturb
        env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
        script = str(REPO / "tests" / "gloo_runs.py")
        procs = [subprocess.Popen([sys.executable, script, str(r), port, str(out), str(RESNET20_WEIGHTS)], env=env,
                                  cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]

    return once_per_test_run(tmp_path_factory, "gloo_runs", launch)
