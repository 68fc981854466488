"""Interrupted rankings resume from their partial results file and end with the same outcomes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_engine import Boom, raise_after, state_checksum

from critnet.evaluation_set import EvaluationSet
from critnet.engine import evaluate_units
from critnet.perturb import Perturbation
from critnet.selection import select_units

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REPO = Path(__file__).resolve().parents[1]
SELECTION = [r"layer1\.1\.conv2", r"layer3\.0\.conv1"]


def units_of(model):
    return select_units(model, "channel", include=SELECTION)[::8]


def summary(outcomes):
    return [(o.unit, o.total, o.halves, o.exact) for o in outcomes]


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for path in directory.glob("*.jsonl") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cifar_test_256):
    """summary() of the uninterrupted evaluation of units_of(the public ResNet20) on the first 256 test images, what
    both resumed evaluations below must give."""
    from conftest import RESNET20_WEIGHTS
    from critnet.models import build_model
    from critnet.models.checkpoints import load_weights

    if not RESNET20_WEIGHTS.is_file():
        pytest.skip("../shared is not beside the repo")
    model = build_model("resnet20")
    load_weights(model, str(RESNET20_WEIGHTS), "resnet20")
    model.eval()
    return summary(evaluate_units(model, units_of(model), Perturbation("zero"), EvaluationSet.from_batches(cifar_test_256)))


def test_exception_midway_then_rerun_resumes(resnet20_cifar, cifar_test_256, tmp_path, uninterrupted):
    data = EvaluationSet.from_batches(cifar_test_256)
    units = units_of(resnet20_cifar)
    before = state_checksum(resnet20_cifar)
    with pytest.raises(Boom):
        evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, resume_dir=tmp_path, progress=raise_after(3))
    assert state_checksum(resnet20_cifar) == before
    assert len(records(tmp_path)) == 3
    totals = []
    resumed = evaluate_units(
        resnet20_cifar, units, Perturbation("zero"), data, resume_dir=tmp_path, progress=lambda d, t: totals.append(t)
    )
    assert totals[-1] == len(units) - 3  # only the rest was evaluated
    assert summary(resumed) == uninterrupted
    # another perturbation is another analysis: nothing is resumed from these records
    totals.clear()
    evaluate_units(resnet20_cifar, units[:2], Perturbation("add", 0.1), data, resume_dir=tmp_path,
                   progress=lambda d, t: totals.append(t))
    assert totals[-1] == 2


def test_killed_process_resumes(resnet20_cifar, cifar_test_256, tmp_path, uninterrupted):
    from conftest import RESNET20_WEIGHTS

    # the same first 256 test images, handed over in a file: the process imports neither conftest nor Lightning
    images = tmp_path.parent / f"{tmp_path.name}_images.pt"
    torch.save(cifar_test_256, images)
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        torch.set_num_threads(1)
        RESNET20_WEIGHTS = {str(RESNET20_WEIGHTS)!r}
        batches = torch.load({str(images)!r})  # first_test_images(256)
        from critnet.models.checkpoints import load_weights
        from critnet.evaluation_set import EvaluationSet
        from critnet.engine import evaluate_units
        from critnet.models import build_model
        from critnet.perturb import Perturbation
        from critnet.selection import select_units
        model = build_model("resnet20"); load_weights(model, str(RESNET20_WEIGHTS), "resnet20"); model.eval()
        units = select_units(model, "channel", include={SELECTION!r})[::8]
        def progress(done, total):
            if done == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        evaluate_units(model, units, Perturbation("zero"), EvaluationSet.from_batches(batches),
                       resume_dir={str(tmp_path)!r}, progress=progress)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(records(tmp_path)) == 4
    data = EvaluationSet.from_batches(cifar_test_256)
    units = units_of(resnet20_cifar)
    totals = []
    resumed = evaluate_units(
        resnet20_cifar, units, Perturbation("zero"), data, resume_dir=tmp_path, progress=lambda d, t: totals.append(t)
    )
    assert totals[-1] == len(units) - 4
    assert summary(resumed) == uninterrupted
    assert os.listdir(tmp_path)
