"""PruneSweep under DDP with 2 CPU processes (gloo) through the real entry point: the same masks on both ranks and the
numbers of one process, exactly; only rank 0 writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CIFAR_ROOT, REPO, RESNET20_WEIGHTS, requires_shared

from critnet.cli import main

pytestmark = requires_shared


def arguments(root: Path, devices: int, *extra: str) -> list[str]:
    return [
        "validate",
        "-c", str(REPO / "configs/resnet20_cifar10.yaml"), "-c", str(REPO / "configs/prune_connections.yaml"),
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


def run(tmp_path: Path, devices: int, *extra: str) -> Path:
    """The sweep in two processes started through analyze.py; returns the newest log_dir."""
    root = tmp_path / f"devices{devices}"
    command = [sys.executable, str(REPO / "analyze.py"), *arguments(root, devices, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log_dirs = sorted(p.parent for p in root.rglob("prune_sweep.csv"))  # written once per run, by rank 0
    return log_dirs[-1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, Path]:
    """(tmp dir, log_dir) of one resumable two-process sweep, shared by both tests: each such run starts three
    interpreters and a gloo group. Recording the partial file does not change the numbers."""
    tmp = tmp_path_factory.mktemp("prune_ddp")
    return tmp, run(tmp, 2, "--trainer.callbacks.init_args.resume=true")


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
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    partial.write_text("".join(lines[:2]))  # as if stopped after two settings
    second = run(tmp, 2, "--trainer.callbacks.init_args.resume=true")
    assert second != first
    for name in ("prune_sweep.csv", "prune_guided.csv"):
        assert rows(second / name) == rows(first / name)
    assert len(partial.read_text().splitlines()) == len(lines)  # only the missing settings were evaluated again
