"""The result of :func:`critnet.prune_sweep` and :func:`critnet.compare_orders`: :class:`Sweep`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from critnet.reporting import pruning_report as prune_report
from critnet.results.protocol import _dataframe, _html_table, _text_table
from critnet.results.ranking_result import Ranking

#: What each kind of sweep groups its rows by, its CSV columns, the series and x axis of its figure.
_SWEEP_SHAPES = {
    "prune_sweep": (("method", "scope", "p_prune", "p_bern"), prune_report.SWEEP_COLUMNS, "p_bern", "ratio",
                    "measured pruning ratio (% of selected weights)", ("method", "scope", "p_prune", "p_bern",
                                                                       "nominal_ratio")),
    "prune_guided": (("order", "channel_ratio"), prune_report.GUIDED_COLUMNS, "order", "channel_ratio",
                     "output channels pruned (%)", ("order", "channel_ratio")),
}


@dataclass
class Sweep:
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

    @property
    def settings(self) -> list[dict[str, Any]]:
        keys = _SWEEP_SHAPES[self.kind][0]
        summary = prune_report.summarize(self.rows, keys)
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

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows (floats at full precision)."""
        return prune_report.write_rows_csv(path, self.rows, _SWEEP_SHAPES[self.kind][1])

    def to_json(self, path: str | Path) -> Path:
        """Write the JSON record: parameters, baseline, per-setting mean ± std, timings."""
        return prune_report.write_json_report(path, self.summary)

    def to_markdown(self) -> str:
        """The table of the original README (one row per setting, mean ± std over draws)."""
        if self.kind == "prune_sweep":
            return prune_report.markdown_table(prune_report.SWEEP_TABLE_COLUMNS,
                                               prune_report.sweep_table_rows(self.settings))
        return prune_report.markdown_table(prune_report.GUIDED_TABLE_COLUMNS,
                                           prune_report.guided_table_rows(self.settings))

    def to_dataframe(self):
        """The rows as a pandas DataFrame (needs pandas, which critnet does not depend on)."""
        return _dataframe(self.rows, _SWEEP_SHAPES[self.kind][1])

    def plot(self):
        """A matplotlib figure: top-1 and loss against the pruning ratio, one curve per series."""
        _, _, series, x, label, _ = _SWEEP_SHAPES[self.kind]
        return prune_report.curves_figure(self.settings, series, x, label, self.title)

    def print_table(self) -> None:
        if self.kind == "prune_sweep":
            prune_report.print_sweep_table(self.title, self.settings)
        else:
            prune_report.print_guided_table(self.title, self.settings)

    def report(self, directory: str | Path, *, writer: Any = None, print_table: bool = True) -> list[Path]:
        """Everything the command line writes: ``<kind>.{csv,json,md,png}`` in ``directory`` (and
        ``prune_criticality.csv`` when the channel order was ranked here), the console table and TensorBoard
        items when ``writer`` is given. Returns the paths written."""
        directory = Path(directory)
        _, _, series, x, _, hparams = _SWEEP_SHAPES[self.kind]
        paths = []
        if self.criticality is not None:
            path = directory / "prune_criticality.csv"
            paths.append(write_criticality_csv(path, self.criticality))
            self.info["criticality_source"] = str(path)
        paths.append(self.to_csv(directory / f"{self.kind}.csv"))
        markdown = self.to_markdown()
        md_path = directory / f"{self.kind}.md"
        md_path.write_text(f"{self.title}\n\n{markdown}")
        paths.append(md_path)
        paths.append(self.to_json(directory / f"{self.kind}.json"))
        figure = self.plot()
        paths.append(prune_report.save_figure(figure, directory / f"{self.kind}.png"))
        if print_table:
            self.print_table()
        if writer is not None:
            tag = f"prune_{self.info['method']}" if self.kind == "prune_sweep" else self.kind
            prune_report.log_tensorboard(writer, tag, self.settings, x, series, figure, markdown, hparams)
        return paths

    def __repr__(self) -> str:
        columns = (prune_report.SWEEP_TABLE_COLUMNS if self.kind == "prune_sweep"
                   else prune_report.GUIDED_TABLE_COLUMNS)
        rows = (prune_report.sweep_table_rows(self.settings) if self.kind == "prune_sweep"
                else prune_report.guided_table_rows(self.settings))
        return f"Sweep: {self.title}\n" + _text_table(columns, rows)

    def _repr_html_(self) -> str:
        columns = (prune_report.SWEEP_TABLE_COLUMNS if self.kind == "prune_sweep"
                   else prune_report.GUIDED_TABLE_COLUMNS)
        rows = (prune_report.sweep_table_rows(self.settings) if self.kind == "prune_sweep"
                else prune_report.guided_table_rows(self.settings))
        return _html_table(columns, rows, self.title)


CRITICALITY_COLUMNS = ("unit", "layer", "index", "score", "loss", "top1", "top5", "samples")


def write_criticality_csv(path: str | Path, ranking: Ranking) -> Path:
    """The channel scores that ordered a guided comparison, one row per channel in model order."""
    position = {unit.label: i for i, unit in enumerate(ranking.units)}
    rows = sorted(ranking.levels[0].rows, key=lambda row: position[row["unit"]])
    return prune_report.write_rows_csv(path, rows, CRITICALITY_COLUMNS)
