"""The architecture's contracts (pyproject.toml, ``[tool.importlinter]``) hold, and they fail on the imports they
are there to forbid: the upward imports and circles that once crept in behind lazy imports inside functions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: Each injected import (always inside a function, where a lazy import hides) and the line of lint-imports'
#: report that must name it.
VIOLATIONS = {
    # the old circle evaluation -> tallying -> scoring -> perturb -> evaluation, closed by a lazy import
    "perturb.py": ("from critnet.evaluation import evaluate", "critnet.perturb is not allowed to import critnet.evaluation"),
    # the evaluation loop reaching up into the engine
    "evaluation.py": ("from critnet.engine import evaluate_units",
                      "critnet.evaluation is not allowed to import critnet.engine"),
    # a model family and the registry importing each other
    "models/timm_models.py": ("from critnet.models.registry import get_model_spec",
                              "critnet.models.timm_models is not allowed to import critnet.models.registry"),
    # the fault machinery borrowing from an analysis (once: a progress bar)
    "faults/draw.py": ("from critnet.analyses.ranking import rank", "critnet.faults is not allowed to import critnet.analyses"),
    # a result reaching up into the analysis that makes it
    "results/ranking_result.py": ("from critnet.analyses.ranking import rank",
                                  "critnet.results is not allowed to import critnet.analyses"),
    # an analysis borrowing from a front end (once: analysis.common from reporting, results from reporting)
    "analyses/pruning.py": ("from critnet.callbacks.base import AnalysisCallback",
                            "critnet.analyses is not allowed to import critnet.callbacks"),
    # a circle inside one package
    "faults/stats.py": ("from critnet.faults.draw import plan_sample", "No cycles are allowed in critnet.faults"),
    # Lightning below the front ends
    "engine/certify.py": ("import lightning", "critnet.engine is not allowed to import lightning"),
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1", "COLUMNS": "400"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_the_package_keeps_its_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_the_contracts_catch_upward_imports_circles_and_lightning(tmp_path):
    shutil.copytree(ROOT / "critnet", tmp_path / "critnet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module, (statement, _) in VIOLATIONS.items():
        path = tmp_path / "critnet" / module
        path.write_text(path.read_text() + f"\n\ndef _injected():\n    {statement}  # noqa\n")
    result = lint_imports(tmp_path)
    report = " ".join(result.stdout.split())  # the report wraps long lines
    assert result.returncode != 0
    missed = [expected for _, expected in VIOLATIONS.values() if expected not in report]
    assert not missed, result.stdout[-4000:]
