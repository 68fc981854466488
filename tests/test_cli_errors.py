"""Bad settings of the analysis callbacks end in one line naming the flag (exit 2), and a ranking stopped by SIGTERM
exits at once, says how to continue, and resumes to the numbers of an uninterrupted run — all through the real
entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CIFAR_ROOT, PRESETS, REPO, RESNET20_WEIGHTS, requires_shared
from critnet.cli import main

pytestmark = requires_shared


def cli_args(tmp_path: Path, preset: str, *extra: str, subset: int = 8) -> list[str]:
    return ["validate", "-c", str(PRESETS / "resnet20_cifar10.yaml"), "-c", str(PRESETS / preset),
            "--data.root", str(CIFAR_ROOT), "--model.weights", str(RESNET20_WEIGHTS),
            "--data.subset_size", str(subset), "--data.subset_seed", "0", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", *extra]


RANKING = "--trainer.callbacks.init_args."


@pytest.mark.parametrize("preset, flag, value, expected", [
    ("rank_neurons.yaml", "unit", "neuron", "unit (CriticalRanking): 'neuron' is not one of tensor, channel, activation"),
    ("rank_neurons.yaml", "perturbation", "shake", "perturbation (CriticalRanking): 'shake' is not one of add,"),
    ("rank_neurons.yaml", "score", "accuracy", "score (CriticalRanking): 'accuracy' is not one of loss,"),
    ("rank_neurons.yaml", "method", "fast", "method (CriticalRanking): 'fast' is not one of exact, naive,"),
    ("rank_neurons.yaml", "taylor_order", "3", "taylor_order (CriticalRanking): '3' is not one of 1, 2"),
    ("rank_neurons.yaml", "levels", "[nan]", "levels (CriticalRanking): 'nan' is not a finite number"),
    ("rank_neurons.yaml", "levels", "[inf]", "levels (CriticalRanking): 'inf' is not a finite number"),
    ("rank_neurons.yaml", "top_k", "0", "CriticalRanking: top_k: 0 is not an integer >= 1"),
    ("rank_neurons.yaml", "top_k_confidence", "1.0",
     "CriticalRanking: top_k_confidence: 1.0 is not allowed; expected a probability strictly between 0 and 1"),
    ("prune_connections.yaml", "p_prune", "[1.5]", "PruneSweep: p_prune[0]: 1.5 is outside [0, 1]"),
    ("prune_connections.yaml", "p_bern", "[0.5, -0.1]", "PruneSweep: p_bern[1]: -0.1 is outside [0, 1]"),
    ("prune_connections.yaml", "method", "filters", "method (PruneSweep): 'filters' is not one of connections,"),
    ("prune_guided.yaml", "guided_orders", "[size]", "guided_orders (PruneSweep): 'size' is not one of criticality,"),
    ("prune_guided.yaml", "guided_ratios", "[2]", "PruneSweep: guided_ratios[0]: 2.0 is outside [0, 1]"),
    ("prune_guided.yaml", "criticality_method", "taylor", "criticality_method (PruneSweep): 'taylor' is not one of"),
])
def test_a_bad_callback_setting_is_one_line_naming_it(tmp_path, capsys, preset, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tmp_path, preset, f"{RANKING}{flag}={value}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err[-2000:]
    assert "Traceback" not in err and "usage:" not in err
    assert not list(tmp_path.rglob("*.csv"))


# the 128 output channels of the last block, each with a full forward pass: long enough to be stopped midway
UNITS = (f"{RANKING}include=[layer3.2]", f"{RANKING}method=naive")
IMAGES = 16  # each of the three runs makes up to 128 full passes over them


def interrupted_run(args: list[str], partial_dir: Path, records: int = 5) -> tuple[int, str]:
    """Run the command line in a process and SIGTERM it once the partial-results file holds ``records`` lines;
    its exit status and stderr."""
    process = subprocess.Popen([sys.executable, "analyze.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    done = 0
    while done < records and process.poll() is None and time.monotonic() < deadline:
        files = list(partial_dir.glob("*.jsonl"))
        done = len(files[0].read_text().splitlines()) if files else 0
        time.sleep(0.01)
    assert process.poll() is None, "the analysis ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    return process.returncode, err


def test_sigterm_mid_ranking_stops_at_once_and_the_rerun_resumes(tmp_path):
    args = cli_args(tmp_path / "stopped", "rank_neurons.yaml", *UNITS, f"{RANKING}resume=true", subset=IMAGES)
    partial_dir = tmp_path / "stopped" / "ranking_partial"
    returncode, err = interrupted_run(args, partial_dir)
    assert returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: CriticalRanking was interrupted; its finished work is kept in")
    assert last.endswith("run the same command again to continue where it stopped") and "Traceback" not in err
    (partial,) = partial_dir.glob("*.jsonl")
    kept = [json.loads(line) for line in partial.read_text().splitlines()]  # only whole records
    assert 5 <= len(kept) < 128
    assert not list((tmp_path / "stopped").rglob("ranking.csv"))

    resumed = Path(main(args).trainer.log_dir) / "ranking.csv"
    whole = Path(main(cli_args(tmp_path / "whole", "rank_neurons.yaml", *UNITS, subset=IMAGES)).trainer.log_dir)
    whole = whole / "ranking.csv"
    assert resumed.read_bytes() == whole.read_bytes()


def test_sigterm_mid_campaign_stops_at_once_and_the_rerun_resumes(tmp_path):
    """The fault preset (340 faults) on 16 images, stopped after a few faults, then the same command again."""
    args = cli_args(tmp_path / "stopped", "faults_resnet20.yaml", f"{RANKING}resume=true", subset=IMAGES)
    partial_dir = tmp_path / "stopped" / "faults_partial"
    returncode, err = interrupted_run(args, partial_dir)
    assert returncode == 130 and "Traceback" not in err
    (last,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert last == err.strip().splitlines()[-1]
    assert last.startswith("interrupted: FaultCampaign was interrupted; its finished work is kept in")
    (partial,) = partial_dir.glob("*.jsonl")
    kept = [json.loads(line) for line in partial.read_text().splitlines()]  # only whole records
    assert 5 <= len(kept) < 340
    assert not list((tmp_path / "stopped").rglob("faults.csv"))

    resumed = Path(main(args).trainer.log_dir)
    assert json.loads((resumed / "campaign.json").read_text())["resumed_faults"] == len(kept)
    whole = Path(main(cli_args(tmp_path / "whole", "faults_resnet20.yaml", subset=IMAGES)).trainer.log_dir)
    for name in ("faults.csv", "fault_rates.csv", "fault_vulnerability.csv"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


def test_trainer_flags_keep_their_types_after_critnet_is_imported(ddp_runs):
    """A `typing` cache collision turns Lightning's `Optional[Union[int, float]]` into `Union[float, int]` when rich
    is imported before Lightning; then `--trainer.limit_val_batches 1` means 100 % instead of one batch. The fresh
    interpreter is the one tests/ddp_runs.py starts: `import critnet, critnet.cli` first, then
    CritnetArgumentParser().add_class_arguments(Trainer, 'trainer') parses ['--trainer.limit_val_batches', '1']."""
    import inspect

    import ddp_runs as script

    source = inspect.getsource(script)
    assert source.index("import critnet  #") < source.index("import critnet.cli  #") < source.index("import torch")
    assert (ddp_runs / "trainer_flag_type.txt").read_text() == "1"
