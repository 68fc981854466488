"""PruneSweep under DDP with 2 CPU processes (gloo) through the real entry point: the same masks on both ranks and the
numbers of one process, exactly; only rank 0 writes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import CIFAR_ROOT, PRESETS, RESNET20_WEIGHTS, requires_shared
from critnet.cli import main

pytestmark = requires_shared


def arguments(root: Path, devices: int, *extra: str) -> list[str]:
    return [
        "validate",
        "-c", str(PRESETS / "resnet20_cifar10.yaml"), "-c", str(PRESETS / "prune_connections.yaml"),
        "--data.root", str(CIFAR_ROOT), "--model.weights", str(RESNET20_WEIGHTS),
        # 3 batches of 32 over 2 ranks: rank 0 evaluates two of them, rank 1 one
        "--data.subset_size", "96", "--data.subset_seed", "1", "--data.batch_size", "32", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.default_root_dir", str(root),
        # the Bernoulli draws and the random channel order are where ranks could disagree
        "--trainer.callbacks.init_args.p_prune=[0.3]", "--trainer.callbacks.init_args.p_bern=[0.5]",
        "--trainer.callbacks.init_args.repeats=2", "--trainer.callbacks.init_args.guided_orders=[random]",
        "--trainer.callbacks.init_args.guided_ratios=[0.1]", *extra,
    ]  # fmt: skip


def log_dirs(root: Path) -> list[Path]:
    """The log_dirs of the runs under root, oldest first: prune_sweep.csv is written once per run, by rank 0."""
    return sorted((p.parent for p in root.rglob("prune_sweep.csv")), key=lambda d: int(d.name.split("_")[-1]))


@pytest.fixture(scope="module")
def two_processes(ddp_runs) -> tuple[Path, Path]:
    """(folder, log_dir of the first run) of the resumable two-process sweep of tests/ddp_runs.py, run there with
    ``arguments(folder / "devices2", 2, "--trainer.callbacks.init_args.resume=true")``; each such launch starts
    three interpreters and a gloo group. Recording the partial file does not change the numbers."""
    root = ddp_runs / "prune"
    return root, log_dirs(root / "devices2")[0]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_give_the_numbers_of_one(tmp_path, two_processes):
    single = Path(main(arguments(tmp_path / "devices1", 1)).trainer.log_dir)  # one process: this one
    _, double = two_processes
    for name in ("prune_sweep.csv", "prune_guided.csv"):
        one, two = rows(single / name), rows(double / name)
        assert len(one) == len(two) > 0
        # identical to the last digit: each batch is evaluated whole by one rank (the same kernels on the same
        # inputs) and the per-batch float64 sums are added in batch order
        assert one == two
    assert all(r["samples"] == "96" for r in rows(double / "prune_sweep.csv"))
    assert '"devices": 2' in (double / "prune_sweep.json").read_text()


def test_a_resumed_two_process_sweep_gives_the_same_numbers(two_processes):
    tmp, first = two_processes
    (partial,) = (tmp / "devices2" / "prune_partial").glob("*.jsonl")  # rank 0 alone writes
    # tests/ddp_runs.py kept the first run's whole file, then cut it to its first two records, as if stopped after
    # two settings, and ran the same two-process sweep again
    lines = (tmp / "partial_whole.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    runs = log_dirs(tmp / "devices2")
    assert len(runs) == 2 and runs[0] == first
    second = runs[1]
    assert second != first
    for name in ("prune_sweep.csv", "prune_guided.csv"):
        assert rows(second / name) == rows(first / name)
    assert len(partial.read_text().splitlines()) == len(lines)  # only the missing settings were evaluated again
