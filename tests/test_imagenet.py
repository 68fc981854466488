"""The ImageNet path (torchvision ResNets, standard transform) on a small generated ImageFolder tree."""

import json

import pytest
from test_data import make_image_folder

from conftest import PRESETS
from critnet.cli import main


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_image_folder(root, "train", 3, 2, size=(80, 64))
    make_image_folder(root, "val", 3, 3, size=(64, 80))
    return root


def imagenet_args(root, out, config="resnet18_imagenet.yaml"):
    return ["-c", str(PRESETS / config), "--data.root", str(root), "--data.num_classes", "3",
            "--model.weights", "null", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out)]


@pytest.mark.parametrize("config", ["resnet18_imagenet.yaml", "resnet50_imagenet.yaml"])
def test_imagenet_configs_validate_on_a_generated_tree(tiny_imagenet, tmp_path, config):
    main(["validate", *imagenet_args(tiny_imagenet, tmp_path, config)])
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["samples"] == 9 and record["model"] == config.split("_")[0]
    assert record["top5"] == 100.0  # 3 classes: the true class is always among the top 5


def test_imagenet_fit_runs_a_step(tiny_imagenet, tmp_path):
    main(["fit", *imagenet_args(tiny_imagenet, tmp_path), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "1", "--data.batch_size", "2"])
    assert list(tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"))
