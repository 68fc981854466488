"""The ranking callback end to end through the real CLI: the exact reproduction of the original experiment,
NaN handling, a prune sweep against an independent loop, and the TensorBoard items read back."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    CIFAR_ROOT,
    KERNEL_REL,
    PRESETS,
    RESNET20_WEIGHTS,
    assert_ranked_like,
    f32_close,
    first_test_images,
    requires_shared,
)
from critnet.cli import main

pytestmark = requires_shared


def run_cli(tmp_path: Path, *extra: str, presets=("rank_seed.yaml",), subset: int = 128) -> Path:
    """``analyze.py validate`` on the first ``subset`` test images; returns the run's log_dir."""
    args = ["validate", "-c", str(PRESETS / "resnet20_cifar10.yaml")]
    for preset in presets:
        args += ["-c", str(PRESETS / preset)]
    args += [
        "--data.root", str(CIFAR_ROOT),
        "--model.weights", str(RESNET20_WEIGHTS),
        "--data.subset_size", str(subset),
        "--data.num_workers", "0",
        "--trainer.default_root_dir", str(tmp_path),
        *extra,
    ]  # fmt: skip
    cli = main(args)
    return Path(cli.trainer.log_dir)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def original_seed_loop(net, images, labels):
    """The original experiment (seeds/000), verbatim apart from the no_grad the original left commented out."""
    criterion = torch.nn.CrossEntropyLoss()
    scores = []
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "weight" in name:
                original_weights = param.data.clone()
                param.data += 0.1
                output = net(images)
                loss = criterion(output, labels)
                score = loss.item()
                scores.append((name, score))
                param.data = original_weights
    return sorted(scores, key=lambda x: x[1], reverse=True)


def test_seed_preset_reproduces_the_original_experiment(seed_preset_log_dir, resnet20_cifar):
    # 256 validation images, so the preset's num_batches=1 must pick the first batch of 128 in dataset order
    log_dir = seed_preset_log_dir
    rows = read_csv(log_dir / "ranking.csv")
    (images, labels) = first_test_images(128)[0]
    reference = original_seed_loop(resnet20_cifar, images, labels)

    # The original takes a float32 mean of the 128 losses, the pipeline a float64 sum of the same float32 losses:
    # they agree to float32 rounding only (one ulp at a loss of 412 is 3e-5; AMD EPYC and Intel Xeon round
    # differently), and so may the order of two units within that rounding of each other.
    expected = dict(reference)
    assert_ranked_like([row["unit"] for row in rows], expected)
    for row in rows:
        assert f32_close(float(row["score"]), expected[row["unit"]]), row["unit"]
        assert float(row["loss"]) == float(row["score"])
        assert row["samples"] == "128" and row["perturbation"] == "add" and float(row["level"]) == 0.1
    assert [int(row["rank"]) for row in rows] == list(range(1, len(reference) + 1))
    for column in ("rank", "unit", "layer", "index", "perturbation", "level", "score", "loss", "delta_loss",
                   "top1", "top5", "samples", "top1_drop", "top5_drop", "exact"):  # fmt: skip
        assert column in rows[0]

    summary = json.loads((log_dir / "ranking.json").read_text())
    with torch.no_grad():
        baseline_loss = F.cross_entropy(resnet20_cifar(images), labels).item()
    assert summary["baseline"]["samples"] == 128
    assert f32_close(summary["baseline"]["loss"], baseline_loss)
    top = expected[rows[0]["unit"]]
    assert f32_close(float(rows[0]["delta_loss"]), top - baseline_loss, scale=top)
    assert summary["units"] == 39 and summary["batches"] == 1 and summary["elapsed_s"] > 0
    assert -1.0 <= summary["split_half_spearman"] <= 1.0
    assert summary["levels"][0]["split_half"]["half_samples"] == [64, 64]
    assert summary["settings"]["method"] == "exact"


def test_bitflip_breaks_the_network_and_broken_units_rank_first(tmp_path, resnet20_cifar):
    """Flipping the top exponent bit turns weights into inf/NaN: those units are recorded and ranked first, in
    unit order, and the run does not crash."""
    log_dir = run_cli(
        tmp_path,
        "--trainer.callbacks.init_args.include", '["layer3.2.*weight", "linear.weight"]',
        "--trainer.callbacks.init_args.perturbation", "bitflip",
        "--trainer.callbacks.init_args.levels", "[30]",
        subset=64,
    )  # fmt: skip
    rows = read_csv(log_dir / "ranking.csv")
    images, labels = first_test_images(64, 64)[0]
    reference = {}
    with torch.no_grad():
        for name, param in resnet20_cifar.named_parameters():
            if "weight" in name and ("layer3.2" in name or "linear" in name):
                original = param.data.clone()
                param.data = (param.data.view(torch.int32) ^ (1 << 30)).view(torch.float32)
                reference[name] = F.cross_entropy(resnet20_cifar(images), labels).item()
                param.data = original
    broken = [name for name, loss in reference.items() if not math.isfinite(loss)]
    assert broken, "bit 30 should break at least one unit"
    assert [row["unit"] for row in rows[: len(broken)]] == sorted(
        broken, key=lambda n: (not math.isnan(reference[n]), list(reference).index(n))
    )
    for row in rows:
        expected = reference[row["unit"]]
        if math.isfinite(expected):
            assert f32_close(float(row["loss"]), expected), row["unit"]
        else:
            assert row["loss"] in ("nan", "inf")
    summary = json.loads((log_dir / "ranking.json").read_text())
    assert summary["levels"][0]["broken_units"] == len(broken)


def test_prune_sweep_against_an_independent_loop_and_tensorboard(tmp_path, resnet20_cifar):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    levels = [0.3, 0.7]
    log_dir = run_cli(
        tmp_path,
        "--trainer.callbacks.init_args.unit", "channel",
        "--trainer.callbacks.init_args.include", '["layer3.2.conv2.weight", "linear.weight"]',
        "--trainer.callbacks.init_args.perturbation", "prune",
        "--trainer.callbacks.init_args.levels", json.dumps(levels),
        "--trainer.callbacks.init_args.score", "delta_loss",
        "--trainer.callbacks.init_args.top_k", "5",
        presets=("rank_neurons.yaml",),
        subset=32,
    )  # fmt: skip
    rows = read_csv(log_dir / "ranking.csv")
    assert len(rows) == (64 + 10) * len(levels)

    images, labels = first_test_images(32, 32)[0]
    with torch.no_grad():
        baseline = F.cross_entropy(resnet20_cifar(images), labels).item()
    for level in levels:
        level_rows = [row for row in rows if float(row["level"]) == level]
        assert [int(row["rank"]) for row in level_rows] == list(range(1, 75))
        scores = [float(row["score"]) for row in level_rows]
        assert scores == sorted(scores, reverse=True)
        for row in level_rows[:3] + level_rows[-2:]:
            param = dict(resnet20_cifar.named_parameters())[row["unit"].split("[")[0]]
            channel = int(row["index"])
            with torch.no_grad():
                original = param.data.clone()
                flat = param.data[channel].flatten()
                count = int(level * flat.numel())
                flat[flat.abs().argsort(stable=True)[:count]] = 0.0
                param.data[channel] = flat.view_as(param.data[channel])
                loss = F.cross_entropy(resnet20_cifar(images), labels).item()
                param.data = original
            # the engine recomputes the pruned channel alone (another convolution kernel than the full layer's)
            delta = float(row["delta_loss"])
            assert f32_close(delta, loss - baseline, scale=max(loss, baseline), rel=KERNEL_REL), row["unit"]

    summary = json.loads((log_dir / "ranking.json").read_text())
    assert [level["perturbation"] for level in summary["levels"]] == ["prune(0.3)", "prune(0.7)"]

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for label in ("prune(0.3)", "prune(0.7)"):
        prefix = f"ranking/{label}"
        text_tag = f"{prefix}/top_k/text_summary"  # text summaries are stored as string tensors
        level_rows = [row for row in rows if row["perturbation"] == "prune" and float(row["level"]) == float(label[6:-1])]
        text = events.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
        assert all(row["unit"] in text for row in level_rows[:5])
        assert level_rows[5]["unit"] not in text.split("|")
        assert f"{prefix}/top_k_bar" in tags["images"]
        assert f"{prefix}/channel_heatmap" in tags["images"]
        assert f"{prefix}/scores/layer3.2.conv2" in tags["histograms"]
        assert f"{prefix}/scores/linear" in tags["histograms"]
        assert f32_close(events.Scalars(f"{prefix}/baseline/loss")[0].value, baseline)  # stored as float32
        for name in ("top1", "top5"):
            assert f"{prefix}/baseline/{name}" in tags["scalars"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("include", '["("]', "CriticalRanking: include: '(' is not a valid regular expression"),
        ("include", '["no_such_layer"]', "CriticalRanking: the selection is empty"),
        ("module_types", '["Conv9d"]', "CriticalRanking: module_types: 'Conv9d'"),
        ("levels", "[40]", "CriticalRanking: level: bitflip needs a bit index 0..31"),
    ],
)
def test_bad_settings_end_in_one_line_before_the_analysis(tmp_path, capsys, flag, value, message):
    extra = ["--trainer.callbacks.init_args.perturbation", "bitflip"] if flag == "levels" else []
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *extra, f"--trainer.callbacks.init_args.{flag}", value, subset=8)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " + message in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("ranking.csv"))


def test_a_damaged_partial_file_is_one_clear_line(tmp_path, capsys):
    run_cli(tmp_path, "--trainer.callbacks.init_args.resume", "true", subset=16)
    (partial,) = (tmp_path / "ranking_partial").glob("*.jsonl")
    partial.write_text(partial.read_text() + '{"phase": "exact"}\n')  # a complete line without an index
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--trainer.callbacks.init_args.resume", "true", subset=16)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: CriticalRanking: resume_dir:" in err and "is damaged" in err and "Traceback" not in err
