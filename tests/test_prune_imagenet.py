"""The pruning presets on the ImageNet models (torchvision ResNet18/50) through the real entry point, on a small
generated ImageFolder (tiny images, three classes): the sweep runs end to end, p_prune = 1 prunes every selected
weight, and the model is bit-identical afterwards."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import PRESETS
from critnet.cli import main
from critnet.models import build_model

CLASSES = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    generator = torch.Generator().manual_seed(0)
    for label, wnid in enumerate(CLASSES):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for n in range(2):
            pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
            pixels[..., label] = 255 - 40 * n  # a class-coloured channel, so the classes differ
            Image.fromarray(pixels.numpy()).save(folder / f"ILSVRC2012_val_{label * 2 + n:08d}.JPEG")
    return root


def imagenet_args(arch: str, root: Path, weights: Path, log_root: Path, preset: str, batch_size: int) -> list[str]:
    config = PRESETS / f"{arch}_imagenet.yaml"
    base = ["-c", str(config)] if config.is_file() else [
        "--model.arch", arch, "--data.class_path", "critnet.data.ImageNetDataModule"]
    return ["validate", *base, "-c", str(PRESETS / preset),
            "--data.root", str(root), "--data.num_classes", "3", "--data.resize_size", "36", "--data.crop_size", "32",
            "--data.batch_size", str(batch_size), "--data.num_workers", "0",
            "--model.weights", str(weights), "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(log_root)]  # fmt: skip


@pytest.mark.parametrize("arch,preset,extra,batch_size", [
    ("resnet18", "prune_connections.yaml",
     ["--trainer.callbacks.init_args.p_prune=[0.0, 0.3, 1.0]", "--trainer.callbacks.init_args.p_bern=[1.0]"], 4),
    ("resnet50", "prune_neurons.yaml", ["--trainer.callbacks.init_args.p_prune=[0.05, 1.0]"], 6),
])
def test_imagenet_sweep_runs_and_restores(tmp_path, tiny_imagenet, arch, preset, extra, batch_size):
    torch.manual_seed(1)
    model = build_model(arch, num_classes=3)
    weights = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), weights)
    cli = main(imagenet_args(arch, tiny_imagenet, weights, tmp_path / "runs", preset, batch_size) + extra)
    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "prune_sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["p_prune"] == "0.0" and float(rows[0]["ratio"]) == 0.0
    assert all(r["network"] == arch and r["samples"] == "6" for r in rows)
    everything = [r for r in rows if r["p_prune"] == "1.0" and r["p_bern"] == "1.0"]
    assert everything and float(everything[0]["ratio"]) == 1.0
    ratios = [float(r["ratio"]) for r in rows if r["p_bern"] == "1.0"]
    assert ratios == sorted(ratios)
    expected_units = sum(m.weight.shape[0] * (m.weight.shape[1] if "connections" in preset else 1)
                         for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert int(rows[0]["units"]) == expected_units
    # the sweep runs in the precision of validate (the configs use bf16-mixed): its baseline is the validated model
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert (metrics["top1"], metrics["top5"]) == (float(rows[0]["top1"]), float(rows[0]["top5"]))
    assert math.isclose(metrics["loss"], float(rows[0]["loss"]), rel_tol=1e-6)
    after = cli.model.model.state_dict()
    for key, value in model.state_dict().items():
        assert after[key].numpy().tobytes() == value.numpy().tobytes(), key
