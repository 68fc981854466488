"""Partial results of long rankings: finished units are appended to a file and picked up again by a re-run.

A results file belongs to one fingerprint of (model weights, units, perturbation, evaluation data, method and the
settings the method's results depend on), so a changed model or setting never resumes from stale scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from critnet.digests import state_digest
from critnet.errors import CritnetError
from critnet.perturb import Perturbation, Unit
from critnet.scoring import Tally, UnitOutcome

#: Bumped when the records change shape, so files written by another version are never read back.
RECORD_VERSION = 2


class ResumeError(CritnetError):
    """A partial-results directory that cannot be created or a file in it that cannot be read back."""


def fingerprint(model: nn.Module, units: list[Unit], perturbation: Perturbation, data_checksum: str,
                settings: dict[str, Any]) -> str:
    """A short stable identifier of an analysis (never uses ``hash()``)."""
    payload = {
        "records": RECORD_VERSION,
        "model": state_digest(model),
        "units": [[u.kind, u.name, u.index] for u in units],
        "perturbation": repr(perturbation),
        "data": data_checksum,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def outcome_to_record(phase: str, index: int, outcome: UnitOutcome) -> dict[str, Any]:
    first, second = outcome.halves
    return {
        "phase": phase,
        "index": index,
        "halves": [[t.loss_sum, t.top1_correct, t.top5_correct, t.samples, t.delta_sq_sum, t.top1_changed,
                    t.top5_changed, t.paired] for t in (first, second)],
        "exact": outcome.exact,
        "estimate": outcome.estimate,
    }


def outcome_from_record(record: dict[str, Any], unit: Unit) -> UnitOutcome:
    first, second = (Tally(float(h[0]), int(h[1]), int(h[2]), int(h[3]), float(h[4]), int(h[5]), int(h[6]), int(h[7]))
                     for h in record["halves"])
    estimate = record.get("estimate")
    return UnitOutcome(unit=unit, total=first + second, halves=(first, second), exact=bool(record["exact"]),
                       estimate=None if estimate is None else float(estimate))


def samples_to_record(phase: str, index: int, samples: tuple) -> dict[str, Any]:
    losses, top1, top5 = samples
    return {"phase": phase, "index": index, "losses": losses.tolist(), "top1": top1.int().tolist(),
            "top5": top5.int().tolist()}


def samples_from_record(record: dict[str, Any], unit: Unit) -> tuple:
    return (
        torch.tensor(record["losses"], dtype=torch.float64),
        torch.tensor(record["top1"], dtype=torch.bool),
        torch.tensor(record["top5"], dtype=torch.bool),
    )


class ResultStore:
    """Append-only JSON-lines files ``<fingerprint>.rank<r>.jsonl`` under ``directory``.

    Every rank appends to its own file and reads all files of the fingerprint, so a re-run with another number of
    processes still resumes.
    """

    def __init__(self, directory: str | Path, key: str, rank: int) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResumeError(f"resume_dir: cannot create {str(self.directory)!r} ({err})") from None
        self.key = key
        self.path = self.directory / f"{key}.rank{rank}.jsonl"
        self._handle = None

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Every complete record of this fingerprint, by (phase, unit index); a torn last line is ignored."""
        records: dict[tuple[str, int], dict[str, Any]] = {}
        for path in sorted(self.directory.glob(f"{self.key}.rank*.jsonl")):
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.endswith("\n"):
                        break  # the writer was killed mid-line
                    try:
                        record = json.loads(line)
                        records[(record["phase"], int(record["index"]))] = record
                    except (ValueError, KeyError, TypeError) as err:
                        raise ResumeError(f"resume_dir: {path}, line {number}, is damaged ({err!r}); remove the file "
                                          "to start afresh") from None
        return records

    def append(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        # json writes NaN/Infinity for non-finite sums and reads them back, so broken units resume too.
        self._handle.write(json.dumps(record, allow_nan=True) + "\n")
        self._handle.flush()  # a killed process loses at most the unit it was working on

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


