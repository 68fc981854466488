"""The result of :func:`critnet.prune_sweep` and :func:`critnet.compare_orders`: :class:`Sweep`, with its table
shaped like the original README (console, Markdown, TensorBoard) and its curves."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from critnet.console import format_cell, print_table
from critnet.results.figures import curves_figure, save_figure
from critnet.results.protocol import AnalysisResult
from critnet.results.ranking_result import Ranking
from critnet.writers import write_csv

SWEEP_COLUMNS = (
    "network", "method", "scope", "p_prune", "p_bern", "repeat", "seed", "nominal_ratio", "ratio", "param_fraction",
    "pruned_weights", "selected_weights", "units_pruned", "units", "threshold", "loss", "top1", "top5", "samples",
)
GUIDED_COLUMNS = (
    "network", "order", "channel_ratio", "repeat", "seed", "channels_pruned", "channels", "ratio", "param_fraction",
    "loss", "top1", "top5", "samples",
)
METRICS = ("loss", "top1", "top5")


def summarize(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per setting (rows grouped by ``keys``, first-seen order): mean and sample standard deviation of the
    measured ratio and the metrics over the repeats (std 0 for a single draw)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    summary = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, key))
        entry["repeats"] = len(members)
        entry["seeds"] = [m.get("seed") for m in members]
        for name in ("ratio", "param_fraction", *METRICS):
            values = [float(m[name]) for m in members]
            entry[name] = statistics.fmean(values) if all(map(math.isfinite, values)) else math.nan
            several = len(values) > 1 and all(map(math.isfinite, values))
            entry[f"{name}_std"] = statistics.stdev(values) if several else 0.0
        if "nominal_ratio" in members[0]:
            entry["nominal_ratio"] = members[0]["nominal_ratio"]
        for name in ("network", "samples"):
            entry[name] = members[0].get(name)
        summary.append(entry)
    return summary


def _with_std(entry: Mapping[str, Any], name: str, digits: int, scale: float = 1.0) -> str:
    mean = entry[name] * scale
    if entry["repeats"] > 1:
        return f"{format_cell(mean, digits)} ± {format_cell(entry[f'{name}_std'] * scale, digits)}"
    return format_cell(mean, digits)


SWEEP_TABLE_COLUMNS = ("network", "p_prune", "p_bern", "nominal ratio", "pruning ratio", "loss", "acc@1", "acc@5")


def sweep_table_rows(summary: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Cells of the original README table: ratios in percent, metrics with ± std over the repeats."""
    return [
        [str(e["network"]), format_cell(e["p_prune"], 2), format_cell(e["p_bern"], 2),
         f"{100 * e['nominal_ratio']:.1f}%", _with_std(e, "ratio", 2, 100.0) + "%",
         _with_std(e, "loss", 3), _with_std(e, "top1", 2), _with_std(e, "top5", 2)]
        for e in summary
    ]


GUIDED_TABLE_COLUMNS = ("channel ratio", "order", "pruning ratio", "loss", "acc@1", "acc@5")


def guided_table_rows(summary: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [f"{100 * e['channel_ratio']:.1f}%", str(e["order"]), _with_std(e, "ratio", 2, 100.0) + "%",
         _with_std(e, "loss", 3), _with_std(e, "top1", 2), _with_std(e, "top5", 2)]
        for e in summary
    ]


#: What each kind of sweep groups its rows by, its CSV columns, table columns and cells, the series and x axis of
#: its figure, and its hparams.
_SWEEP_SHAPES = {
    "prune_sweep": (("method", "scope", "p_prune", "p_bern"), SWEEP_COLUMNS, SWEEP_TABLE_COLUMNS, sweep_table_rows,
                    "p_bern", "ratio", "measured pruning ratio (% of selected weights)",
                    ("method", "scope", "p_prune", "p_bern", "nominal_ratio")),
    "prune_guided": (("order", "channel_ratio"), GUIDED_COLUMNS, GUIDED_TABLE_COLUMNS, guided_table_rows,
                     "order", "channel_ratio", "output channels pruned (%)", ("order", "channel_ratio")),
}


@dataclass(repr=False)  # the repr of AnalysisResult: a table
class Sweep(AnalysisResult):
    """Evaluations of a model under a series of pruning settings: a DWP sweep (``kind="prune_sweep"``) or a
    comparison of channel pruning orders (``kind="prune_guided"``).

    Attributes:
        rows: one dict per evaluated setting and draw (the CSV columns).
        settings: rows grouped by setting, with mean and standard deviation over the draws.
        info: the JSON record besides the settings (network, parameters, baseline, timings, …).
        criticality: the ranking that ordered the channels (compare_orders computing one), else None.

    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    >>> sweep = critnet.prune_sweep(model, (torch.randn(8, 1, 4, 4), torch.arange(8) % 3), p_prune=[0.25, 0.5])
    >>> [(row["p_prune"], row["pruned_weights"]) for row in sweep.rows]  # the conv's 4 kernels have 9 weights each
    [(0.0, 0), (0.25, 9), (0.5, 18)]
    >>> len(sweep.plot().axes)  # top-1, top-5 and loss
    3
    """

    kind: str
    title: str
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    criticality: Ranking | None = None
    #: Order of the series in tables and figures (the guided orders as given).
    series_order: list[str] = field(default_factory=list)

    preview_rows = None  # every setting: a sweep has a handful

    @property
    def columns(self) -> Sequence[str]:
        return _SWEEP_SHAPES[self.kind][1]

    @property
    def settings(self) -> list[dict[str, Any]]:
        keys = _SWEEP_SHAPES[self.kind][0]
        summary = summarize(self.rows, keys)
        if self.series_order:
            summary = sorted(summary, key=lambda e: (e["channel_ratio"], self.series_order.index(e["order"])))
        return summary

    @property
    def summary(self) -> dict[str, Any]:
        record = dict(self.info)
        # the JSON keeps its historical key order: settings go before the trailing timing/restore fields
        tail = {k: record.pop(k) for k in ("seconds", "weights_restored_bit_identical") if k in record}
        record["settings"] = self.settings
        record.update(tail)
        return record

    def table(self) -> tuple[Sequence[str], list[list[str]]]:
        """The columns and cells of the original README's table (one row per setting, mean ± std over draws)."""
        _, _, columns, cells, *_ = _SWEEP_SHAPES[self.kind]
        return columns, cells(self.settings)

    def to_markdown(self) -> str:
        """The table of the original README as Markdown."""
        columns, rows = self.table()
        lines = ["| " + " | ".join(columns) + " |", "|" + ":---:|" * len(columns)]
        return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"

    def plot(self):
        """A matplotlib figure: top-1, top-5 and loss against the pruning ratio, one curve per series."""
        *_, series, x, label, _ = _SWEEP_SHAPES[self.kind]
        return curves_figure(self.settings, series, x, label, self.title)

    def print_table(self) -> None:
        columns, rows = self.table()
        print_table(self.title, columns, rows, justify_numbers=False)

    def write_files(self, directory: Path) -> list[Path]:
        """``<kind>.{csv,md,json,png}`` (and ``prune_criticality.csv`` when the channel order was ranked here)."""
        paths = []
        if self.criticality is not None:
            path = directory / "prune_criticality.csv"
            paths.append(write_criticality_csv(path, self.criticality))
            self.info["criticality_source"] = str(path)
        paths.append(self.to_csv(directory / f"{self.kind}.csv"))
        md_path = directory / f"{self.kind}.md"
        md_path.write_text(f"{self.title}\n\n{self.to_markdown()}")
        paths += [md_path, self.to_json(directory / f"{self.kind}.json")]
        paths.append(save_figure(self.plot(), directory / f"{self.kind}.png"))
        return paths

    def log_tensorboard(self, writer: Any, step: int = 0) -> list[str]:
        """Scalars ``{tag}/{series}={value}/{metric}`` with the measured ratio in basis points (1/10,000) as the
        step, the curves, the Markdown table as text, and one hparams entry per setting (``step`` is unused: the
        ratio is the step)."""
        *_, series_key, x_key, _, hparam_keys = _SWEEP_SHAPES[self.kind]
        tag = f"prune_{self.info['method']}" if self.kind == "prune_sweep" else self.kind
        summary = self.settings
        for entry in summary:
            for metric in METRICS:
                if math.isfinite(entry[metric]):
                    writer.add_scalar(f"{tag}/{series_key}={entry[series_key]}/{metric}", entry[metric],
                                      round(10_000 * entry[x_key]))
        writer.add_figure(f"{tag}/curves", self.plot())
        writer.add_text(f"{tag}/table", self.to_markdown())
        for index, entry in enumerate(summary):
            hparams = {k: entry[k] for k in hparam_keys}
            metrics = {f"hparam/{tag}/{m}": entry[m] for m in (*METRICS, "ratio") if math.isfinite(entry[m])}
            writer.add_hparams(hparams, metrics, run_name=f"hparams/{tag}_{index:03d}")
        writer.flush()
        return [f"{tag}/curves", f"{tag}/table"]

    def preview_tables(self) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
        return [(self.title, *self.table())]


CRITICALITY_COLUMNS = ("unit", "layer", "index", "score", "loss", "top1", "top5", "samples")


def write_criticality_csv(path: str | Path, ranking: Ranking) -> Path:
    """The channel scores that ordered a guided comparison, one row per channel in model order."""
    position = {unit.label: i for i, unit in enumerate(ranking.units)}
    return write_csv(path, sorted(ranking.levels[0].rows, key=lambda row: position[row["unit"]]), CRITICALITY_COLUMNS)
