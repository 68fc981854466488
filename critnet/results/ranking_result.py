"""The result of :func:`critnet.rank`: :class:`Ranking`, one :class:`LevelRanking` per perturbation level, with
its console table, the notes on how far its top can be trusted, and its TensorBoard items."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from critnet.perturb import Perturbation, Unit
from critnet.console import console, format_cell
from critnet.results.figures import channel_heatmap_figure, finite_values, top_k_figure
from critnet.results.protocol import AnalysisResult
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
    top_k_test: dict[str, Any] | None = None


@dataclass(repr=False)  # the repr of AnalysisResult: a table
class Ranking(AnalysisResult):
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
    #: The stem of its files (``<filename>.csv``, ``.json``) and the prefix of its TensorBoard tags.
    filename: str = "ranking"

    columns = RANKING_COLUMNS

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
                "top_k_test": level.top_k_test,
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

    def title(self, level: int = 0) -> str:
        """One line saying what was ranked: model, units, perturbation, images, score, split-half agreement."""
        entry = self.levels[level]
        return (f"{self.model_name} · {len(self.units)} {self.unit} units · {entry.perturbation.label} · "
                f"{self.samples} images · score={self.score} · "
                f"split-half Spearman {entry.split_half['spearman']:.3f}")

    def plot_top_k(self, k: int | None = None, level: int = 0):
        """A matplotlib figure: bars of the ``k`` most critical scores of one level."""
        entry = self.levels[level]
        return top_k_figure(entry.rows, self.top_k if k is None else k, self.score, self.title(level))

    def plot_heatmap(self, level: int = 0):
        """A matplotlib figure: channel scores by layer (rows) and channel (columns); None for tensor units."""
        entry = self.levels[level]
        return channel_heatmap_figure(entry.rows, self.score, self.title(level), self.layer_order)

    @property
    def layer_order(self) -> list[str]:
        return list(dict.fromkeys(unit.layer for unit in self.units))

    def print_table(self, k: int | None = None) -> None:
        """Print every level's top ``k`` as a rich table."""
        for index, entry in enumerate(self.levels):
            count = min(self.top_k if k is None else k, len(entry.rows))
            print_top_k(entry.rows, count, f"top {count} · {self.title(index)}")

    def log_tensorboard(self, writer: Any, step: int = 0) -> list[str]:
        """Write the TensorBoard items of every level (see :func:`log_level_tensorboard`) under ``filename``."""
        tags = []
        for index, entry in enumerate(self.levels):
            tag = self.filename if len(self.levels) == 1 else f"{self.filename}/{entry.perturbation.label}"
            tags += log_level_tensorboard(self, index, writer, tag, step)
        return tags

    def write_files(self, directory: Path) -> list[Path]:
        """``<filename>.csv`` and ``<filename>.json``."""
        return [self.to_csv(directory / f"{self.filename}.csv"), self.to_json(directory / f"{self.filename}.json")]

    def closing_lines(self, paths: Sequence[Path]) -> list[str]:
        """How far each level's top can be trusted (hybrid's depth, halving's test, the top-k boundary), then
        what ran and where its files went."""
        lines = []
        for entry in self.levels:
            if self.method == "hybrid" and entry.engine_agreement is not None:
                lines.append(hybrid_note(entry.engine_agreement))
            if entry.top_k_test is not None:
                lines.append(top_k_test_note(entry.top_k_test, entry.rows))
            boundary = boundary_overlap(entry.rows, self.score, self.top_k)
            if boundary is not None:
                lines.append(boundary_note(boundary))
        lines.append(f"ranking: {len(self.units)} units × {len(self.levels)} level(s) on {self.samples} images in "
                     f"{self.elapsed_s:.1f} s on {self.devices} device(s) → {', '.join(map(str, paths))}")
        return lines

    _COLUMNS = ("rank", "unit", "score", "delta_loss", "delta_loss_se", "top1", "top5")

    def preview_tables(self) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
        return [(self.title(index), self._COLUMNS, [[row[c] for c in self._COLUMNS] for row in entry.rows])
                for index, entry in enumerate(self.levels)]


TOP_K_COLUMNS = ("rank", "unit", "perturbation", "level", "score", "loss", "delta_loss", "delta_loss_se", "top1",
                 "top5", "top1_drop_se")
# loss is left out: it is the score (score=loss) or baseline + Δloss
CONSOLE_COLUMNS = (("rank", "rank"), ("unit", "unit"), ("score", "score"), ("delta_loss", "Δloss ± se"),
                   ("top1", "top-1 %"), ("top5", "top-5 %"))


def print_top_k(rows: Sequence[Mapping[str, Any]], k: int, title: str) -> Table:
    """The top ``k`` rows as a rich table; unit names are never truncated (they fold)."""
    table = Table(title=title, title_justify="left")
    for key, header in CONSOLE_COLUMNS:
        if key == "unit":
            table.add_column(header, overflow="fold", ratio=3)
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for row in rows[:k]:
        cells = [format_cell(row[key], 2 if key in ("top1", "top5") else 4) for key, _ in CONSOLE_COLUMNS]
        se = row.get("delta_loss_se", math.nan)
        if isinstance(se, float) and math.isfinite(se):
            cells[3] += f" ± {format_cell(se, 4)}"  # one standard error over the images
        if not row["exact"]:
            cells[1] += " (estimate)" if not row["samples"] else f" (eliminated after {row['samples']} images)"
        table.add_row(*cells)
    console.print(table)
    return table


def top_k_markdown(rows: Sequence[Mapping[str, Any]], k: int) -> str:
    """The top-K table in Markdown (TensorBoard renders text summaries as Markdown)."""
    lines = ["| " + " | ".join(TOP_K_COLUMNS) + " |", "|" + "---|" * len(TOP_K_COLUMNS)]
    for row in rows[:k]:
        lines.append("| " + " | ".join(format_cell(row[c], 5) for c in TOP_K_COLUMNS) + " |")
    return "\n".join(lines)


def log_level_tensorboard(ranking: Ranking, level: int, writer: Any, prefix: str, step: int = 0) -> list[str]:
    """Write one level's TensorBoard items and return their tags.

    ``{prefix}/top_k`` (text), ``{prefix}/top_k_bar`` (figure), ``{prefix}/scores/<layer>`` (histograms, layers in
    model order), ``{prefix}/channel_heatmap`` (figure, channel/activation units), ``{prefix}/baseline/{loss,top1,
    top5}`` and ``{prefix}/split_half_spearman`` (scalars).
    """
    rows, title, top_k, score = ranking.levels[level].rows, ranking.title(level), ranking.top_k, ranking.score
    baseline, agreement, layer_order = ranking.baseline, ranking.levels[level].split_half, ranking.layer_order
    tags = []
    writer.add_text(f"{prefix}/top_k", top_k_markdown(rows, top_k), global_step=step)
    tags.append(f"{prefix}/top_k")
    writer.add_figure(f"{prefix}/top_k_bar", top_k_figure(rows, top_k, score, title), global_step=step, close=True)
    tags.append(f"{prefix}/top_k_bar")

    by_layer: dict[str, list[float]] = {layer or "(model)": [] for layer in layer_order or []}
    for row in rows:
        by_layer.setdefault(row["layer"] or "(model)", []).append(float(row["score"]))
    for layer, values in by_layer.items():
        finite = finite_values(values)
        if finite.size:
            _add_histogram(writer, f"{prefix}/scores/{layer}", finite, step)
            tags.append(f"{prefix}/scores/{layer}")

    heatmap = channel_heatmap_figure(rows, score, title, layer_order)
    if heatmap is not None:
        writer.add_figure(f"{prefix}/channel_heatmap", heatmap, global_step=step, close=True)
        tags.append(f"{prefix}/channel_heatmap")

    for name in ("loss", "top1", "top5"):
        writer.add_scalar(f"{prefix}/baseline/{name}", float(baseline[name]), global_step=step)
        tags.append(f"{prefix}/baseline/{name}")
    spearman = agreement.get("spearman", math.nan)
    if isinstance(spearman, float) and math.isfinite(spearman):
        writer.add_scalar(f"{prefix}/split_half_spearman", spearman, global_step=step)
        tags.append(f"{prefix}/split_half_spearman")
    writer.flush()
    return tags


def _add_histogram(writer: Any, tag: str, values: np.ndarray, step: int) -> None:
    # TensorBoard's own binning (exponential buckets) drops values beyond ~1e20, which a broken unit easily
    # reaches, and then refuses the "empty" histogram; linear bins over the actual range keep every value.
    try:
        counts, edges = np.histogram(values, bins=min(30, max(1, values.size)))
    except ValueError:  # a range wider than float64 can hold (e.g. -3e38 .. 3e38): bins at quantiles instead
        edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, min(31, values.size + 1))))
        counts, edges = np.histogram(values, bins=edges)
    writer.add_histogram_raw(
        tag,
        min=float(values.min()),
        max=float(values.max()),
        num=int(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.square(values).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


# Hybrid's exact top k is in doubt when its members come from the second half of the units it checked in estimate
# order: the estimates then order poorly, and the unchecked units beyond may hold more top units (on ResNet20
# channels, zeroed, 256 images: the deepest was 67th of 100 checked, and 11 true top-20 units were never checked).
HYBRID_DEPTH_WARNING = 0.5


def hybrid_note(agreement: dict[str, Any]) -> str:
    """One console line on how far hybrid's exact top k can be trusted, with a warning when its top units were
    found deep in the estimate order."""
    checked, deepest = agreement["units"], agreement["deepest_top_k"]
    line = (f"hybrid: {checked} units checked exactly in estimate order; the deepest of the exact top k was "
            f"{deepest}th by estimate; estimated vs exact Δloss on the checked units: Spearman "
            f"{agreement['spearman']:.3f}, Kendall {agreement['kendall']:.3f}")
    if deepest > HYBRID_DEPTH_WARNING * checked:
        line += ("\n[yellow]warning: top units came from the second half of the checked list, so unchecked units "
                 "may belong in the top k; method: halving or exact give a dependable top k[/]")
    return line


def top_k_test_note(test: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """One console line on halving's sequential test: its guarantee (finite-sample, nominal, or void), what each
    stage decided, and how many units reached the whole set (their scores are the exact full-set scores; the others
    were eliminated early)."""
    stages = "; ".join(f"{s['units']} units on {s['images']} images, {s['eliminated']} eliminated" for s in test["stages"])
    exact = sum(1 for row in rows if row["exact"])
    k, confidence = test["top_k"], test["top_k_confidence"]
    if test.get("bound") == "normal":
        claim = (f"the top {k} is the exact full-set top {k} at a nominal {confidence} (normal bounds at "
                 f"{test['z']:.2f} standard errors, {test['correction']}: {len(rows)} units × {test['tests']} tests; "
                 f"not a finite-sample guarantee)")
    else:
        seen = test.get("largest_value")
        what = "loss" if test.get("loss_clip") is not None else "miss"
        claim = (f"the top {k} is the exact full-set top {k} with probability ≥ {confidence} (finite-sample betting "
                 f"bounds, {test['correction']}, a perturbed network's per-image {what} declared in "
                 f"[0, {test['range_width']:g}]" + (f", largest seen {seen:.4g}" if seen is not None else "") + ")")
        if test["guarantee"].startswith("void"):
            claim = f"NO GUARANTEE ({test['guarantee']}); without it, {claim}"
    return (f"halving: {claim}; {stages}; {exact} units have exact full-set scores, "
            f"{len(rows) - exact} were eliminated early (their scores are over the images they saw)"
            + (f"; {test['ties_at_boundary']} units tie with the {k}th" if test.get("ties_at_boundary") else ""))


def boundary_note(boundary: Mapping[str, Any]) -> str:
    """One console line on how settled the top-k boundary is across images (95 % intervals of the k-th unit)."""
    low, high = boundary["interval"]
    above, below = boundary["overlapping"]["above"], boundary["overlapping"]["below"]
    return (f"top-{boundary['k']} boundary: {boundary['unit']} has the 95 % interval [{format_cell(low, 4)}, "
            f"{format_cell(high, 4)}]; {above} units above and {below} below it have overlapping intervals")


__all__ = ["LevelRanking", "Ranking", "boundary_note", "hybrid_note", "top_k_test_note"]
