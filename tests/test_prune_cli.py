"""PruneSweep end to end through the real entry point on a subset of the shared test images: the sweep against the
independent reference of test_prune, the exact restore, the guided comparison, the reports and bad configs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_prune import masked_copy, reference_evaluate, reference_masks

from conftest import (
    CIFAR_ROOT,
    KERNEL_REL,
    PRESETS,
    RESNET20_WEIGHTS,
    f32_close,
    requires_shared,
)
from critnet.cli import main

pytestmark = requires_shared
SUBSET = 128  # a seeded random subset: the first test images are all airplanes


def run_cli(tmp_path: Path, *extra: str, presets=("prune_connections.yaml",)):
    args = ["validate", "-c", str(PRESETS / "resnet20_cifar10.yaml")]
    for preset in presets:
        args += ["-c", str(PRESETS / preset)]
    args += [
        "--data.root", str(CIFAR_ROOT), "--model.weights", str(RESNET20_WEIGHTS),
        "--data.subset_size", str(SUBSET), "--data.subset_seed", "0", "--data.batch_size", "64",
        "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path), *extra,
    ]  # fmt: skip
    return main(args)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def subset_batches(batch_size: int = 64):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = datasets.ImageFolder(CIFAR_ROOT / "test", tf)
    indices = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:SUBSET].tolist())
    return list(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size))


def assert_zeroing_scores(model, rows, x, y):
    """Each row's score is the mean-loss increase on (x, y) when its output channel is zeroed, by a plain loop."""
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(x), y, reduction="none").double().mean().item()
        for row in rows:
            weight = model.get_submodule(row["layer"]).weight
            saved = weight[int(row["index"])].clone()
            weight[int(row["index"])] = 0
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none").double().mean().item()
            weight[int(row["index"])] = saved
            # The engine stacks perturbed copies of the batch into one larger suffix batch, and another batch size
            # may take another kernel: float32 rounding of the losses, relative to the losses, not to their difference.
            assert f32_close(float(row["score"]), loss - base, scale=loss, rel=KERNEL_REL), row["unit"]


CONNECTIONS = ("--trainer.callbacks.init_args.p_prune=[0.0, 0.4]", "--trainer.callbacks.init_args.p_bern=[1.0, 0.5]",
               "--trainer.callbacks.init_args.repeats=2")
RESUME = "--trainer.callbacks.init_args.resume=true"
# Rank on 8 held-out training images, resumably: one run serves the held-out test and the resumed-ranking test.
HELD_OUT_CRITICALITY = (
    "--trainer.callbacks.init_args.p_prune=[0.0]", "--trainer.callbacks.init_args.p_bern=[1.0]",
    "--trainer.callbacks.init_args.guided_orders=[criticality]", "--trainer.callbacks.init_args.guided_ratios=[0.05]",
    "--trainer.callbacks.init_args.criticality_split=train", "--trainer.callbacks.init_args.criticality_samples=8",
    RESUME,
)


@pytest.fixture(scope="module")
def connections_sweep(tmp_path_factory):
    """The connections sweep, uninterrupted: checked against the reference, and what a resumed sweep must give."""
    return run_cli(tmp_path_factory.mktemp("connections"), *CONNECTIONS)


@pytest.fixture(scope="module")
def resumable_sweep(tmp_path_factory):
    """(root, evaluations) of the same sweep run resumably: its partial file lies under root/prune_partial."""
    import critnet.analyses.pruning as pruning_module

    root = tmp_path_factory.mktemp("resumable")
    calls = []
    real_evaluate = pruning_module.batch_tallies

    def counting_evaluate(*positional, **keywords):
        calls.append(1)
        return real_evaluate(*positional, **keywords)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pruning_module, "batch_tallies", counting_evaluate)
        run_cli(root, *CONNECTIONS, RESUME)
    return root, len(calls)


@pytest.fixture(scope="module")
def held_out_criticality(tmp_path_factory):
    """(root, cli) of a guided sweep whose criticality ranking is computed on held-out training images."""
    root = tmp_path_factory.mktemp("held_out")
    return root, run_cli(root, *HELD_OUT_CRITICALITY)


def test_connections_sweep_matches_the_reference_and_restores(connections_sweep, resnet20_cifar):
    cli = connections_sweep
    log_dir = Path(cli.trainer.log_dir)
    rows = read_csv(log_dir / "prune_sweep.csv")
    for column in ("method", "scope", "p_prune", "p_bern", "repeat", "seed", "ratio", "loss", "top1", "top5",
                   "samples", "nominal_ratio", "param_fraction"):  # fmt: skip
        assert column in rows[0]
    settings = [(float(r["p_prune"]), float(r["p_bern"]), int(r["repeat"]), int(r["seed"])) for r in rows]
    assert settings == [(0.0, 0.0, 0, 0), (0.0, 1.0, 0, 0), (0.0, 0.5, 0, 0), (0.4, 1.0, 0, 0), (0.4, 0.5, 0, 0),
                        (0.4, 0.5, 1, 1)]
    assert all(r["samples"] == str(SUBSET) and r["method"] == "connections" for r in rows)

    batches = subset_batches()
    base = reference_evaluate(resnet20_cifar, batches)
    for row in rows:
        if float(row["p_bern"]) == 1.0 or float(row["p_prune"]) == 0.0:  # deterministic: the reference decides
            masks = reference_masks(resnet20_cifar, "connections", "global", float(row["p_prune"]))
            zeroed = sum(int((~m).sum()) for m in masks.values())
            expected = reference_evaluate(masked_copy(resnet20_cifar, masks), batches) if zeroed else base
            # bit for bit: the same masked weights, the same batches of 64, the same kernels and float64 sums
            assert (float(row["loss"]), float(row["top1"]), float(row["top5"])) == expected
            assert float(row["ratio"]) == zeroed / sum(m.numel() for m in masks.values())
        else:  # Bernoulli halves: about half the p_bern = 1 ratio, different draws per seed
            full = next(r for r in rows if r["p_prune"] == row["p_prune"] and r["p_bern"] == "1.0")
            assert abs(float(row["ratio"]) - 0.5 * float(full["ratio"])) < 0.01
        assert float(row["nominal_ratio"]) == float(row["p_prune"]) * float(row["p_bern"])
    draws = [r for r in rows if r["p_prune"] == "0.4" and r["p_bern"] == "0.5"]
    assert draws[0]["ratio"] != draws[1]["ratio"]

    # the validated numbers and the sweep's unpruned baseline agree; the model is bit-identical afterwards
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["top1"] == float(rows[0]["top1"]) and metrics["top5"] == float(rows[0]["top5"])
    assert math.isclose(metrics["loss"], float(rows[0]["loss"]), rel_tol=1e-6)
    after = cli.model.model.state_dict()
    for key, value in resnet20_cifar.state_dict().items():
        assert after[key].numpy().tobytes() == value.numpy().tobytes(), key
    assert not any(k.endswith(("_orig", "_mask")) for k in after)

    summary = json.loads((log_dir / "prune_sweep.json").read_text())
    assert summary["samples"] == SUBSET and summary["baseline"]["top1"] == float(rows[0]["top1"])
    setting = next(s for s in summary["settings"] if s["p_prune"] == 0.4 and s["p_bern"] == 0.5)
    assert setting["repeats"] == 2 and setting["seeds"] == [0, 1]
    assert math.isclose(setting["top1"], (float(draws[0]["top1"]) + float(draws[1]["top1"])) / 2)
    assert (log_dir / "prune_sweep.png").stat().st_size > 10_000
    assert "| resnet20 | 0.40 | 0.50 |" in (log_dir / "prune_sweep.md").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    top1 = events.Scalars("prune_connections/p_bern=1.0/top1")
    assert [e.step for e in top1] == sorted(e.step for e in top1)
    assert top1[-1].value == pytest.approx(float(rows[3]["top1"]))
    assert top1[-1].step == round(10_000 * float(rows[3]["ratio"]))
    assert "prune_connections/curves" in events.Tags()["images"]
    assert (log_dir / "hparams").is_dir() and len(list((log_dir / "hparams").iterdir())) == 5


def test_guided_orders_from_a_ranking_csv(tmp_path, resnet20_cifar):
    from critnet.engine.pruning_masks import channel_l1

    channels = list(channel_l1(resnet20_cifar))
    ranking = tmp_path / "ranking.csv"
    generator = torch.Generator().manual_seed(5)
    scores = torch.rand(len(channels), generator=generator).tolist()
    with ranking.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "unit", "layer", "index", "score"])
        for n, (channel, score) in enumerate(zip(channels, scores)):
            layer, index = channel.layer, channel.index
            writer.writerow([n + 1, f"{layer}.weight[{index}]", layer, index, score])
    cli = run_cli(tmp_path, "--trainer.callbacks.init_args.p_prune=[0.0]", "--trainer.callbacks.init_args.p_bern=[1.0]",
                  "--trainer.callbacks.init_args.guided_orders=[criticality, l1, random]",
                  "--trainer.callbacks.init_args.guided_ratios=[0.0, 0.1]", "--trainer.callbacks.init_args.repeats=2",
                  f"--trainer.callbacks.init_args.criticality_csv={ranking}")
    log_dir = Path(cli.trainer.log_dir)
    rows = read_csv(log_dir / "prune_guided.csv")
    assert [(r["order"], r["channel_ratio"], r["repeat"]) for r in rows] == [
        ("criticality", "0.0", "0"), ("l1", "0.0", "0"), ("random", "0.0", "0"), ("random", "0.0", "1"),
        ("criticality", "0.1", "0"), ("l1", "0.1", "0"), ("random", "0.1", "0"), ("random", "0.1", "1")]
    assert all(r["channels_pruned"] == ("69" if r["channel_ratio"] == "0.1" else "0") for r in rows)

    batches = subset_batches()
    by_score = [c for _, c in sorted(zip(scores, channels), key=lambda pair: pair[0])][:69]
    norms = channel_l1(resnet20_cifar)
    by_l1 = sorted(channels, key=lambda c: norms[c])[:69]
    for order, chosen in (("criticality", by_score), ("l1", by_l1)):
        masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in resnet20_cifar.named_modules()
                 if isinstance(m, torch.nn.Conv2d)}
        for channel in chosen:
            masks[channel.layer][channel.index] = False
        expected = reference_evaluate(masked_copy(resnet20_cifar, masks), batches)
        row = next(r for r in rows if r["order"] == order and r["channel_ratio"] == "0.1")
        assert (float(row["loss"]), float(row["top1"]), float(row["top5"])) == expected
    random_rows = [r for r in rows if r["order"] == "random" and r["channel_ratio"] == "0.1"]
    assert random_rows[0]["seed"] == "0" and random_rows[1]["seed"] == "1"
    assert random_rows[0]["loss"] != random_rows[1]["loss"]
    summary = json.loads((log_dir / "prune_guided.json").read_text())
    assert summary["criticality_source"] == str(ranking) and len(summary["settings"]) == 6
    assert (log_dir / "prune_guided.png").is_file() and (log_dir / "prune_guided.md").is_file()


@pytest.mark.parametrize("flag,value,message", [
    ("p_prune", "[0.0, 1.5]", "p_prune"),
    ("p_bern", "[-0.5]", "p_bern"),
    ("guided_ratios", "[2]", "guided_ratios"),
    ("guided_orders", "[magnitude]", "guided_orders"),
    ("criticality_csv", "/nonexistent/ranking.csv", "criticality_csv"),
    ("method", "filters", "method"),
])
def test_bad_values_are_rejected_when_the_config_is_parsed(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, f"--trainer.callbacks.init_args.{flag}={value}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("prune_sweep.csv"))


def test_a_ranking_without_the_pruned_channels_is_one_clear_line(tmp_path, capsys):
    ranking = tmp_path / "ranking.csv"
    ranking.write_text("unit,layer,index,score\nconv1.weight[0],conv1,0,0.5\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--trainer.callbacks.init_args.p_prune=[0.0]", "--trainer.callbacks.init_args.p_bern=[1.0]",
                "--trainer.callbacks.init_args.guided_orders=[criticality]",
                f"--trainer.callbacks.init_args.criticality_csv={ranking}")
    assert exit_info.value.code == 2
    assert "lacks 687 channel(s)" in capsys.readouterr().err


def test_criticality_computed_with_the_engine(tmp_path, resnet20_cifar):
    cli = run_cli(tmp_path, "--trainer.callbacks.init_args.p_prune=[0.0]", "--trainer.callbacks.init_args.p_bern=[1.0]",
                  "--trainer.callbacks.init_args.guided_orders=[criticality]",
                  "--trainer.callbacks.init_args.guided_ratios=[0.05]",
                  "--trainer.callbacks.init_args.criticality_samples=8")
    log_dir = Path(cli.trainer.log_dir)
    ranking = read_csv(log_dir / "prune_criticality.csv")
    assert len(ranking) == 688 and all(r["samples"] == "8" for r in ranking)

    # the ranking subset: 8 of the 128 evaluation images drawn with the sweep's seed, in dataset order
    images = torch.cat([x for x, _ in subset_batches()])
    labels = torch.cat([y for _, y in subset_batches()])
    picked = sorted(torch.randperm(SUBSET, generator=torch.Generator().manual_seed(0))[:8].tolist())
    x, y = images[picked], labels[picked]
    assert_zeroing_scores(resnet20_cifar, ranking[::97], x, y)  # a spread of channels across the layers

    scores = {(r["layer"], int(r["index"])): float(r["score"]) for r in ranking}
    least = sorted(scores, key=lambda c: scores[c])[:34]  # 5 % of 688 channels, least critical first
    masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in resnet20_cifar.named_modules()
             if isinstance(m, torch.nn.Conv2d)}
    for layer, index in least:
        masks[layer][index] = False
    (row,) = [r for r in read_csv(log_dir / "prune_guided.csv") if r["channel_ratio"] == "0.05"]
    assert row["channels_pruned"] == "34"
    expected = reference_evaluate(masked_copy(resnet20_cifar, masks), subset_batches())
    assert (float(row["loss"]), float(row["top1"]), float(row["top5"])) == expected


def test_criticality_on_held_out_training_images(held_out_criticality, resnet20_cifar):
    from torchvision import datasets, transforms

    _, cli = held_out_criticality
    log_dir = Path(cli.trainer.log_dir)
    ranking = read_csv(log_dir / "prune_criticality.csv")
    assert all(r["samples"] == "8" for r in ranking)
    info = json.loads((log_dir / "prune_guided.json").read_text())
    assert info["criticality_split"] == "train" and info["criticality_samples"] == 8

    # 8 training images drawn with the sweep's seed, evaluation transforms (no crop or flip)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    train = datasets.ImageFolder(CIFAR_ROOT / "train", tf)
    picked = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:8].tolist())
    x = torch.stack([train[i][0] for i in picked])
    y = torch.tensor([train[i][1] for i in picked])
    assert_zeroing_scores(resnet20_cifar, ranking[::150], x, y)


def test_held_out_criticality_needs_a_sample_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--trainer.callbacks.init_args.guided_orders=[criticality]",
                "--trainer.callbacks.init_args.criticality_split=train")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "criticality_split: train needs criticality_samples" in err and "Traceback" not in err


def test_an_interrupted_sweep_resumes_with_the_same_numbers(connections_sweep, resumable_sweep, monkeypatch):
    import critnet.analyses.pruning as pruning_module

    whole = read_csv(Path(connections_sweep.trainer.log_dir) / "prune_sweep.csv")
    root, evaluations = resumable_sweep
    (partial,) = (root / "prune_partial").glob("*.jsonl")
    lines = partial.read_text().splitlines(keepends=True)
    # the baseline (p_prune 0 prunes nothing at any p_bern), 0.4 at p_bern 1 and two draws at 0.5
    assert len(lines) == evaluations == 4
    partial.write_text("".join(lines[:3]) + lines[3][:25])  # killed while writing the fourth record

    calls = []
    real_evaluate = pruning_module.batch_tallies

    def counting_evaluate(*positional, **keywords):
        calls.append(1)
        return real_evaluate(*positional, **keywords)

    monkeypatch.setattr(pruning_module, "batch_tallies", counting_evaluate)
    again = run_cli(root, *CONNECTIONS, RESUME)
    assert len(calls) == evaluations - 3
    assert read_csv(Path(again.trainer.log_dir) / "prune_sweep.csv") == whole


def test_the_criticality_ranking_of_a_resumed_sweep_is_not_recomputed(held_out_criticality, monkeypatch):
    from critnet.engine.suffix import SuffixEvaluator

    root, cli = held_out_criticality
    first = read_csv(Path(cli.trainer.log_dir) / "prune_guided.csv")

    def no_evaluation(_evaluator, work, _record, per_sample=False):
        assert not list(work), "a resumed ranking evaluated a unit again"

    monkeypatch.setattr(SuffixEvaluator, "run", no_evaluation)
    assert read_csv(Path(run_cli(root, *HELD_OUT_CRITICALITY).trainer.log_dir) / "prune_guided.csv") == first


def test_a_damaged_partial_file_is_one_clear_line(tmp_path, capsys, resumable_sweep):
    root, _ = resumable_sweep
    shutil.copytree(root / "prune_partial", tmp_path / "prune_partial")  # a copy: the resume test uses the file
    (partial,) = (tmp_path / "prune_partial").glob("*.jsonl")
    partial.write_text("{not json\n" + partial.read_text())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *CONNECTIONS, RESUME)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: PruneSweep: resume_dir" in err and "line 1, is damaged" in err and "Traceback" not in err
