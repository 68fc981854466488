"""Under DDP (2 CPU processes, gloo; the run is one of tests/ddp_runs.py) the ranking equals the single-device ranking and only rank 0 writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import (
    CIFAR_ROOT,
    KERNEL_REL,
    PRESETS,
    RESNET20_WEIGHTS,
    assert_ranked_like,
    f32_close,
    requires_shared,
)
from critnet.cli import main

pytestmark = requires_shared

# Relative noise on channel units: the draws must not depend on which process evaluates a unit.
ANALYSIS = [
    "--trainer.callbacks.init_args.unit", "channel",
    "--trainer.callbacks.init_args.include", '["layer3.2.conv1.weight", "linear.weight"]',
    "--trainer.callbacks.init_args.perturbation", "noise",
    "--trainer.callbacks.init_args.levels", "[1.0]",
    "--trainer.callbacks.init_args.relative", "true",
    "--trainer.callbacks.init_args.seed", "5",
    "--trainer.callbacks.init_args.num_batches", "null",
    "--trainer.callbacks.init_args.score", "delta_loss",
    "--trainer.callbacks.init_args.progress", "false",
]  # fmt: skip


def arguments(root: Path, *extra: str) -> list[str]:
    return [
        "validate",
        "-c", str(PRESETS / "resnet20_cifar10.yaml"), "-c", str(PRESETS / "rank_seed.yaml"),
        "--data.root", str(CIFAR_ROOT), "--model.weights", str(RESNET20_WEIGHTS),
        "--data.subset_size", "48", "--data.batch_size", "16", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        *ANALYSIS, *extra,
    ]  # fmt: skip


def read_rows(root: Path) -> tuple[list[dict[str, str]], dict]:
    (csv_path,) = list(root.rglob("ranking.csv"))  # exactly one file: only rank 0 writes
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((csv_path.parent / "ranking.json").read_text())


def test_two_cpu_processes_equal_one(tmp_path, ddp_runs):
    main(arguments(tmp_path / "single", "--trainer.accelerator", "cpu", "--trainer.devices", "1"))  # in this process
    # the same arguments with --trainer.devices 2 --trainer.strategy ddp: a run of tests/ddp_runs.py
    ddp_root = ddp_runs / "ranking" / "ddp"
    single, single_summary = read_rows(tmp_path / "single")
    ddp, ddp_summary = read_rows(ddp_root)
    assert single_summary["devices"] == 1 and ddp_summary["devices"] == 2
    assert ddp_summary["samples"] == single_summary["samples"] == 48
    assert len(single) == 64 + 10
    # Each rank stacks as many perturbed copies of a batch of 16 into one suffix pass as it holds units of a layer,
    # which differs between one and two ranks: another batch size may take another kernel, so losses agree to
    # float32 rounding (and units within that rounding of each other may swap), hit counts exactly.
    loss = max(float(row["loss"]) for row in single)
    scores = {row["unit"]: float(row["score"]) for row in single}
    assert_ranked_like([row["unit"] for row in ddp], scores, rel=KERNEL_REL, scale=loss)
    by_unit = {row["unit"]: row for row in ddp}
    for a in single:
        b = by_unit[a["unit"]]
        assert (b["top1"], b["top5"], b["samples"]) == (a["top1"], a["top5"], "48"), a["unit"]
        assert f32_close(float(b["loss"]), float(a["loss"]), rel=KERNEL_REL), a["unit"]
        # the paired errors are gathered like the sums: the same on any number of devices (to the same rounding)
        for column in ("score", "delta_loss", "delta_loss_se", "delta_loss_lo", "delta_loss_hi"):
            close = f32_close(float(b[column]), float(a[column]), scale=float(a["loss"]), rel=KERNEL_REL)
            assert close, (a["unit"], column)
        for column in ("top1_drop_se", "top1_drop_lo", "top1_drop_hi"):  # from counts: identical
            assert b[column] == a[column], (a["unit"], column)
    # Two units' odd-half scores lie only 2e-7 of the loss apart, within that rounding: they may swap places in one
    # half's ranking, which moves Spearman by 12 / (n (n² - 1)) = 3e-5 for n = 74; any real difference moves it more.
    assert abs(ddp_summary["split_half_spearman"] - single_summary["split_half_spearman"]) <= 1e-4
    assert len(list(ddp_root.rglob("version_*"))) == 1
    assert len(list(ddp_root.rglob("events.out.tfevents*"))) == 1
