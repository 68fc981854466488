"""The CLI end to end, through its real entry points, against an independent plain-PyTorch loop."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

from conftest import (
    CIFAR_ROOT,
    KERNEL_REL,
    PRESETS,
    RESNET20_WEIGHTS,
    f32_close,
    requires_shared,
)
from critnet.cli import main, train_main

pytestmark = requires_shared

SUBSET = ["--data.subset_size", "600", "--data.subset_seed", "0"]


def cli_args(tmp_path, *extra):
    return ["validate", "-c", str(PRESETS / "resnet20_cifar10.yaml"), "--data.root", str(CIFAR_ROOT),
            "--model.weights", str(RESNET20_WEIGHTS), "--trainer.default_root_dir", str(tmp_path),
            "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", *extra]


def read_metrics(root: Path) -> dict:
    (path,) = root.glob("lightning_logs/version_*/metrics.json")
    return json.loads(path.read_text())


def plain_loop(indices):
    """Evaluate the public ResNet20 with nothing but torch/torchvision over the same files, in batches of 128 like
    the resnet20_cifar10 preset: the same batches give the same kernels, so the same float32 per-sample losses."""
    from critnet.models.cifar_resnet import (
        CifarResNet,  # the architecture only; weights loaded by hand
    )

    model = CifarResNet(3)
    state = torch.load(RESNET20_WEIGHTS, map_location="cpu")["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torch.utils.data.Subset(datasets.ImageFolder(CIFAR_ROOT / "test", tf), indices)
    top1 = top5 = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=128):
            logits = model(x)
            top1 += (logits.argmax(1) == y).sum().item()
            top5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum().item()
            loss += F.cross_entropy(logits, y, reduction="none").double().sum().item()
    return top1, top5, loss / len(ds), len(ds)


def seeded_subset(size, seed):
    return sorted(torch.randperm(10000, generator=torch.Generator().manual_seed(seed))[:size].tolist())


def test_validate_agrees_with_a_plain_loop(tmp_path):
    main(cli_args(tmp_path, *SUBSET))
    m = read_metrics(tmp_path)
    top1, top5, loss, n = plain_loop(seeded_subset(600, 0))
    assert m["samples"] == n == 600
    assert (m["top1_correct"], m["top5_correct"]) == (top1, top5)
    assert m["top1"] == pytest.approx(100 * top1 / n, abs=1e-9)
    assert m["loss"] == pytest.approx(loss, abs=1e-4)
    # float64 sums of the same float32 per-sample losses: only the order of the additions may differ
    assert m["loss"] == pytest.approx(loss, rel=1e-12)
    assert m["checkpoint_sha256"].startswith("12fca82f") and m["model"] == "resnet20"
    assert m["data_root"] == str(CIFAR_ROOT)


def test_one_summary_table_unless_lightnings_is_asked_for(tmp_path, capsys):
    subset = ["--data.subset_size", "40"]
    main(cli_args(tmp_path / "default", *subset))
    out = capsys.readouterr().out
    assert "Validate metric" not in out and "top-1" in out.lower()  # our exact summary only
    main(cli_args(tmp_path / "verbose", *subset, "--verbose", "true"))
    assert "Validate metric" in capsys.readouterr().out


def test_predict_writes_one_row_per_image(tmp_path):
    args = cli_args(tmp_path, "--data.subset_size", "70", "--data.batch_size", "32")
    main(["predict", *args[1:]])
    (path,) = tmp_path.glob("lightning_logs/version_*/predictions.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "sample,target,prediction,top5,loss" and len(lines) == 71
    top1, _, _, _ = plain_loop(range(70))
    assert sum(int(r.split(",")[1]) == int(r.split(",")[2]) for r in lines[1:]) == top1


DDP_SUBSET = ["--data.subset_size", "301", "--data.subset_seed", "1"]


def test_ddp_two_processes_count_every_image_once(tmp_path, ddp_runs):
    """301 images over 2 ranks: the default sampler would repeat one; metrics must equal one device. The two-process
    run (--trainer.devices 2 --trainer.strategy ddp) is the first of tests/ddp_runs.py (fixture ddp_runs)."""
    main(cli_args(tmp_path / "single", *DDP_SUBSET))
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(ddp_runs / "cli" / "ddp")
    assert ddp["devices"] == 2 and ddp["samples"] == single["samples"] == 301
    for key in ("top1", "top5", "top1_correct", "top5_correct"):
        assert ddp[key] == single[key], key
    # Each rank evaluates other batches (its shard, its own last partial batch) than the single process, and another
    # batch may take another kernel: per-sample losses, and so the mean, agree to float32 rounding.
    assert f32_close(ddp["loss"], single["loss"], rel=KERNEL_REL)


def test_short_fit_leaves_a_checkpoint_that_validate_loads(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    train_main(["-c", str(PRESETS / "resnet20_cifar10.yaml"), "--data.root", str(CIFAR_ROOT),
                "--model.weights", str(RESNET20_WEIGHTS), "--model.lr", "0.01", "--data.num_workers", "0",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--data.batch_size", "32", *SUBSET, "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path / "fit"), "--checkpoint.dirpath", str(ckpt_dir)])
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    fit_top1 = read_metrics(tmp_path / "fit")["top1"]
    main(cli_args(tmp_path / "val", *SUBSET, "--model.weights", str(ckpt), "--data.batch_size", "32",
                  "--trainer.limit_val_batches", "1"))
    again = read_metrics(tmp_path / "val")
    assert again["samples"] == 32 and again["top1"] == fit_top1
    assert f"top1={fit_top1:.2f}" in ckpt.name


@pytest.mark.parametrize("flag, value, message", [
    ("--data.root", "/nonexistent/cifar", "--data.root: /nonexistent/cifar does not exist"),
    ("--model.weights", "/nonexistent/w.th", "--model.weights: no such file: /nonexistent/w.th"),
    ("--model.arch", "resnet21", "unknown model 'resnet21' (--model.arch)"),
    ("--model.weights", str(RESNET20_WEIGHTS.with_name("resnet56-4bfd9763.th")), "unexpected keys: layer1.3"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tmp_path, flag, value))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
