"""The result of :func:`critnet.rank`: :class:`Ranking`, one :class:`LevelRanking` per perturbation level."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critnet.perturb import Perturbation, Unit
from critnet.progress import console
from critnet.reporting import ranking_report
from critnet.results.protocol import _PREVIEW_ROWS, _dataframe, _html_table, _text_table
from critnet.results.ranking_rows import RANKING_COLUMNS, boundary_overlap


@dataclass
class LevelRanking:
    """The ranking of one perturbation level: rows most critical first, and how far they can be trusted."""

    perturbation: Perturbation
    rows: list[dict[str, Any]]
    split_half: dict[str, Any]
    engine_agreement: dict[str, Any] | None
    elapsed_s: float
    #: ``halving``: how its sequential test went (settings, per-stage eliminations, units at the full set).
    test: dict[str, Any] | None = None


@dataclass
class Ranking:
    """The units of a model ranked by criticality, one ranking per perturbation level.

    Attributes:
        rows: one dict per (unit, level), the ``ranking.csv`` columns, most critical first within each level.
        baseline: loss, top-1, top-5 and samples of the unperturbed model (and of the two halves).
        split_half: the agreement of the rankings on the even and the odd samples (first level).
        engine_agreement: estimated vs exact scores (taylor and hybrid; first level), else None.
        levels: every level's :class:`LevelRanking`.
        summary: the ``ranking.json`` record.

    >>> model = nn.Linear(2, 2, bias=False)
    >>> _ = nn.init.eye_(model.weight)  # logit c is input feature c
    >>> images, labels = torch.tensor([[5.0, 0.0]] * 4), torch.zeros(4, dtype=torch.long)
    >>> ranking = critnet.rank(model, (images, labels), unit="channel", perturbation="zero")
    >>> [(row["unit"], round(row["loss"], 4)) for row in ranking.top(2)]  # without channel 0, a coin toss: ln 2
    [('weight[0]', 0.6931), ('weight[1]', 0.0067)]
    """

    model_name: str
    unit: str
    score: str
    method: str
    top_k: int
    settings: dict[str, Any]
    units: list[Unit]
    baseline: dict[str, Any]
    levels: list[LevelRanking]
    samples: int
    batches: int
    devices: int
    read_s: float
    elapsed_s: float
    checkpoint_sha256: str | None = None
    #: What ran the analysis (``validate`` or ``fit`` from the callback; None from Python).
    stage: str | None = None
    #: Image files the data source left out as unreadable (recorded when the source can tell, e.g. a critnet
    #: datamodule with ``skip_unreadable``); None when unknown.
    skipped_paths: list[str] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row for level in self.levels for row in level.rows]

    @property
    def split_half(self) -> dict[str, Any]:
        return self.levels[0].split_half

    @property
    def engine_agreement(self) -> dict[str, Any] | None:
        return self.levels[0].engine_agreement

    def top(self, k: int | None = None, level: int = 0) -> list[dict[str, Any]]:
        """The ``k`` most critical rows (default ``top_k``) of one level."""
        return self.levels[level].rows[: self.top_k if k is None else k]

    @property
    def summary(self) -> dict[str, Any]:
        levels = []
        for level in self.levels:
            p, rows = level.perturbation, level.rows
            levels.append({
                "perturbation": p.label,
                "kind": p.kind,
                "level": p.level,
                "split_half": level.split_half,
                "engine_agreement": level.engine_agreement,
                "broken_units": sum(1 for row in rows if not math.isfinite(row["loss"])),
                "exact_units": sum(1 for row in rows if row["exact"]),
                "boundary": boundary_overlap(rows, self.score, self.top_k),
                "top_k_test": level.test,
                "elapsed_s": round(level.elapsed_s, 3),
                "top": [{k: row[k] for k in ("rank", "unit", "score", "loss", "delta_loss", "delta_loss_se", "top1",
                                             "top5", "top1_drop_se", "samples", "exact")}
                        for row in rows[: self.top_k]],
            })
        record = {
            "stage": self.stage,
            "model": self.model_name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "settings": self.settings,
            "units": len(self.units),
            "batches": self.batches,
            "samples": self.samples,
            "devices": self.devices,
            "baseline": self.baseline,
            "split_half_spearman": levels[0]["split_half"]["spearman"],
            "levels": levels,
            "read_s": round(self.read_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
        }
        if self.skipped_paths is not None:
            record.update(skipped_images=len(self.skipped_paths), skipped_paths=list(self.skipped_paths))
        return record

    def to_csv(self, path: str | Path) -> Path:
        """Write ``ranking.csv`` (floats at full precision)."""
        return ranking_report.write_ranking_csv(path, self.rows)

    def to_json(self, path: str | Path) -> Path:
        """Write ``ranking.json`` (settings, baseline, agreement, top rows, timings)."""
        return ranking_report.write_ranking_json(path, self.summary)

    def to_dataframe(self):
        """The rows as a pandas DataFrame (needs pandas, which critnet does not depend on)."""
        return _dataframe(self.rows, RANKING_COLUMNS)

    def title(self, level: int = 0) -> str:
        """One line saying what was ranked: model, units, perturbation, images, score, split-half agreement."""
        entry = self.levels[level]
        return (f"{self.model_name} · {len(self.units)} {self.unit} units · {entry.perturbation.label} · "
                f"{self.samples} images · score={self.score} · "
                f"split-half Spearman {entry.split_half['spearman']:.3f}")

    def plot_top_k(self, k: int | None = None, level: int = 0):
        """A matplotlib figure: bars of the ``k`` most critical scores of one level."""
        entry = self.levels[level]
        return ranking_report.top_k_figure(entry.rows, self.top_k if k is None else k, self.score, self.title(level))

    def plot_heatmap(self, level: int = 0):
        """A matplotlib figure: channel scores by layer (rows) and channel (columns); None for tensor units."""
        entry = self.levels[level]
        return ranking_report.channel_heatmap_figure(entry.rows, self.score, self.title(level), self.layer_order)

    @property
    def layer_order(self) -> list[str]:
        return list(dict.fromkeys(unit.layer for unit in self.units))

    def print_table(self, k: int | None = None) -> None:
        """Print every level's top ``k`` as a rich table."""
        for index, entry in enumerate(self.levels):
            count = min(self.top_k if k is None else k, len(entry.rows))
            ranking_report.print_top_k(entry.rows, count, f"top {count} · {self.title(index)}")

    def log_tensorboard(self, writer: Any, step: int = 0, prefix: str = "ranking") -> list[str]:
        """Write the TensorBoard items of every level (see :func:`critnet.reporting.ranking_report.log_tensorboard`)."""
        tags = []
        for index, entry in enumerate(self.levels):
            tag = prefix if len(self.levels) == 1 else f"{prefix}/{entry.perturbation.label}"
            tags += ranking_report.log_tensorboard(
                writer, entry.rows, baseline=self.baseline, agreement=entry.split_half, score=self.score,
                top_k=self.top_k, prefix=tag, step=step, title=self.title(index), layer_order=self.layer_order)
        return tags

    def report(self, directory: str | Path, *, filename: str = "ranking", writer: Any = None, step: int = 0,
               print_table: bool = True) -> tuple[Path, Path]:
        """Everything the command line reports: ``<filename>.csv`` and ``.json`` in ``directory``, the console
        tables, TensorBoard items when ``writer`` is given, and a closing line. Returns the two paths."""
        directory = Path(directory)
        csv_path = self.to_csv(directory / f"{filename}.csv")
        json_path = self.to_json(directory / f"{filename}.json")
        if print_table:
            self.print_table()
        for entry in self.levels:
            if self.method == "hybrid" and entry.engine_agreement is not None:
                console.print(ranking_report.hybrid_note(entry.engine_agreement))  # how far its top can be trusted
            if entry.test is not None:
                console.print(ranking_report.test_note(entry.test, entry.rows))
            boundary = boundary_overlap(entry.rows, self.score, self.top_k)
            if boundary is not None:
                console.print(ranking_report.boundary_note(boundary))
        if writer is not None:
            self.log_tensorboard(writer, step, filename)
        console.print(
            f"ranking: {len(self.units)} units × {len(self.levels)} level(s) on {self.samples} images in "
            f"{self.elapsed_s:.1f} s on {self.devices} device(s) → {csv_path}, {json_path}"
        )
        return csv_path, json_path

    _COLUMNS = ("rank", "unit", "score", "delta_loss", "delta_loss_se", "top1", "top5")

    def __repr__(self) -> str:
        parts = []
        for index, entry in enumerate(self.levels):
            rows = [[row[c] for c in self._COLUMNS] for row in entry.rows[:_PREVIEW_ROWS]]
            more = len(entry.rows) - len(rows)
            parts.append(self.title(index) + "\n" + _text_table(self._COLUMNS, rows)
                         + (f"\n… {more} more rows" if more > 0 else ""))
        return "Ranking: " + "\n\n".join(parts)

    def _repr_html_(self) -> str:
        return "".join(
            _html_table(self._COLUMNS, [[row[c] for c in self._COLUMNS] for row in entry.rows[:_PREVIEW_ROWS]],
                        f"{self.title(index)} ({len(entry.rows)} rows)")
            for index, entry in enumerate(self.levels)
        )


