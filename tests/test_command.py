"""The installed commands (``critnet``, ``critnet-train``) and the presets they take by name or by path."""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR_ROOT, PRESETS, REPO, RESNET20_WEIGHTS, requires_shared
from critnet import presets
from critnet.cli import _NoLightningTips, main, resolve_presets, train_main
from critnet.errors import CritnetError

PRESET_FILES = sorted(PRESETS.glob("*.yaml"))


def command(name: str) -> Path:
    """A console script of this environment (``pip install -e .`` and ``make install`` make them)."""
    path = Path(sys.executable).with_name(name)
    assert path.is_file(), f"{path} is missing: reinstall critnet (make install)"
    return path


def checkout_free_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def test_every_preset_has_a_name_and_a_summary():
    assert presets.names() == [p.stem for p in PRESET_FILES] and len(PRESET_FILES) >= 15
    for name in presets.names():
        assert presets.path(name) == presets.path(name + ".yaml") == presets.FOLDER / f"{name}.yaml"
        summary = presets.summary(name)
        assert summary and not summary.endswith((":", ",")), (name, summary)
        # the presets' own comments name the presets as the command takes them, not files of a checkout
        assert "configs/" not in presets.path(name).read_text(), name


def test_names_resolve_to_the_shipped_files_and_existing_files_win(tmp_path, monkeypatch):
    shipped = str(presets.path("rank_seed"))
    assert resolve_presets(["validate", "-c", "rank_seed", "--config", "rank_seed.yaml", "--config=rank_seed"]) == [
        "validate", "-c", shipped, "--config", shipped, f"--config={shipped}"]
    own = tmp_path / "rank_seed.yaml"
    own.write_text("trainer: {}\n")
    monkeypatch.chdir(tmp_path)
    # a file of the preset's name in the working folder, and any path, are taken as they are
    assert resolve_presets(["-c", "rank_seed.yaml", "-c", str(own)]) == ["-c", "rank_seed.yaml", "-c", str(own)]
    # so are values of other flags, and inline YAML for jsonargparse to read
    inline = "{trainer: {max_epochs: 1}}"
    assert resolve_presets(["--data.root", "rank_seed", "-c", inline]) == ["--data.root", "rank_seed", "-c", inline]
    with pytest.raises(CritnetError, match=r"^--config configs/rank_seed\.yaml: no such file, and no preset of that "
                                           r"name; the presets are convnext_tiny_imagenet, .*, vit_b_16_imagenet$"):
        resolve_presets(["--config", "configs/rank_seed.yaml"])


@pytest.mark.parametrize("args", [
    ["validate", "-c", "resnet_20", "--data.root", "x"],
    ["validate", "--config=resnet20_cifar10", "--config", "configs/rank_seed.yaml"],
    ["-c", "nope", "validate"],
])
def test_an_unknown_preset_is_one_line_listing_the_presets(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: -") and "no preset of that name" in err
    assert ", ".join(presets.names()) in err


def test_help_lists_every_preset_with_its_summary(capsys):
    for run, args, example in [(main, ["--help"], "validate -c resnet20_cifar10 -c rank_neurons"),
                               (main, ["validate", "--help"], "validate -c resnet20_cifar10 -c rank_neurons"),
                               (train_main, ["--help"], " -c resnet20_cifar10 -c finetune_resnet20_jpeg")]:
        with pytest.raises(SystemExit) as exit_info:
            run(args)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for name in presets.names():
            assert f"  {name}  " in out and presets.summary(name) in out, name
        assert example in out


def test_lightning_tips_are_dropped_and_nothing_else():
    def record(level, msg):
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", level, __file__, 1, msg, None, None)

    keep = _NoLightningTips().filter
    assert not keep(record(logging.INFO, "💡 Tip: For seamless cloud logging ... litlogger ..."))
    assert keep(record(logging.INFO, "GPU available: False, used: False"))
    assert keep(record(logging.WARNING, "💡 a warning that happens to start like a tip"))


@requires_shared
def test_the_critnet_command_runs_presets_by_name_from_any_folder_without_tips(tmp_path):
    """The console script, from a folder outside the checkout: a model preset and an analysis preset by name; the
    console has Lightning's own lines but not its advertising tips."""
    done = subprocess.run(
        [command("critnet"), "validate", "-c", "resnet20_cifar10", "--config", "rank_seed",
         "--data.root", str(CIFAR_ROOT), "--model.weights", str(RESNET20_WEIGHTS), "--data.subset_size", "32",
         "--data.subset_seed", "0", "--data.num_workers", "0", "--trainer.callbacks.init_args.progress", "false"],
        cwd=tmp_path, env=checkout_free_env(), capture_output=True, text=True, timeout=300)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "GPU available:" in console  # Lightning's other messages still print
    for tip in ("litlogger", "litmodels", "💡"):
        assert tip not in console, console
    assert "args parameter" not in console  # LightningCLI's warning when it gets both args and a command line
    log_dir = next(tmp_path.glob("runs/resnet20_cifar10/lightning_logs/version_0"))
    assert json.loads((log_dir / "metrics.json").read_text())["samples"] == 32
    ranking = json.loads((log_dir / "ranking.json").read_text())  # rank_seed: 39 weight tensors, one batch
    assert (ranking["units"], ranking["batches"], ranking["baseline"]["samples"]) == (39, 1, 32)


def test_train_py_takes_names_from_a_checkout(tmp_path, monkeypatch, capsys):
    """The ``train.py`` script (``critnet-train``'s twin in a checkout), run as ``__main__`` on its command line,
    composes presets by name into a ``fit`` config that keeps the best checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "-c", "resnet20_cifar10", "-c", "finetune_resnet20_jpeg",
                                      "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for line in ("max_epochs: 2", "default_root_dir: runs/finetune_resnet20_jpeg", "arch: resnet20",
                 "dirpath: checkpoints", "monitor: val/top1"):
        assert line in out, line
