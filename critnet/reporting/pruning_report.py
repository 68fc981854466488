"""Reports of a pruning sweep: CSV/JSON/Markdown, the rich table shaped like the original README, figures, TensorBoard.

Lightning-free: functions take rows (dicts, one per evaluated setting and draw) and a ``SummaryWriter``; the callback
decides which rank calls them (rank 0 only).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from critnet.reporting.tables import format_cell, print_table
from critnet.writers import write_csv, write_json

SWEEP_COLUMNS = (
    "network", "method", "scope", "p_prune", "p_bern", "repeat", "seed", "nominal_ratio", "ratio", "param_fraction",
    "pruned_weights", "selected_weights", "units_pruned", "units", "threshold", "loss", "top1", "top5", "samples",
)
GUIDED_COLUMNS = (
    "network", "order", "channel_ratio", "repeat", "seed", "channels_pruned", "channels", "ratio", "param_fraction",
    "loss", "top1", "top5", "samples",
)
METRICS = ("loss", "top1", "top5")


def _full_precision(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value


def write_rows_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Long-form rows, floats at full precision so that readers recover the exact numbers."""
    return write_csv(path, [{k: _full_precision(row.get(k)) for k in columns} for row in rows], columns)


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


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + ":---:|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_sweep_table(title: str, summary: Sequence[Mapping[str, Any]]) -> None:
    print_table(title, SWEEP_TABLE_COLUMNS, sweep_table_rows(summary), justify_numbers=False)


def print_guided_table(title: str, summary: Sequence[Mapping[str, Any]]) -> None:
    print_table(title, GUIDED_TABLE_COLUMNS, guided_table_rows(summary), justify_numbers=False)


def write_json_report(path: str | Path, record: Mapping[str, Any]) -> Path:
    return write_json(path, record)


def curves_figure(summary: Sequence[Mapping[str, Any]], series_key: str, x_key: str, x_label: str, title: str):
    """top-1, top-5 and loss against ``x_key`` (a ratio, drawn in percent), one line per value of ``series_key``,
    with ± one standard deviation where there were several draws."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 3.8), dpi=100)
    axes = figure.subplots(1, 3)
    series: dict[Any, list[Mapping[str, Any]]] = {}
    for entry in summary:
        series.setdefault(entry[series_key], []).append(entry)
    for name, entries in series.items():
        entries = sorted(entries, key=lambda e: e[x_key])
        xs = [100 * e[x_key] for e in entries]
        for ax, metric in zip(axes, ("top1", "top5", "loss")):
            ys = [e[metric] for e in entries]
            errors = [e.get(f"{metric}_std", 0.0) for e in entries]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", ms=3, capsize=2,
                        label=f"{series_key} {name}")
    for ax, metric in zip(axes, ("top-1 %", "top-5 %", "loss")):
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def save_figure(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def log_tensorboard(writer, tag: str, summary: Sequence[Mapping[str, Any]], x_key: str, series_key: str,
                    figure=None, markdown: str | None = None, hparam_keys: Sequence[str] = ()) -> None:
    """Scalars ``{tag}/{series_key}={value}/{metric}`` with the measured ratio in basis points (1/10,000) as the
    step, the figure, the Markdown table as text, and one hparams entry per setting."""
    for entry in summary:
        step = int(round(10_000 * entry[x_key]))
        for metric in METRICS:
            if math.isfinite(entry[metric]):
                writer.add_scalar(f"{tag}/{series_key}={entry[series_key]}/{metric}", entry[metric], step)
    if figure is not None:
        writer.add_figure(f"{tag}/curves", figure)
    if markdown is not None:
        writer.add_text(f"{tag}/table", markdown)
    for index, entry in enumerate(summary):
        hparams = {k: entry[k] for k in hparam_keys}
        metrics = {f"hparam/{tag}/{m}": entry[m] for m in (*METRICS, "ratio") if math.isfinite(entry[m])}
        writer.add_hparams(hparams, metrics, run_name=f"hparams/{tag}_{index:03d}")
    writer.flush()
