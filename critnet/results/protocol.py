"""What every result object shares (:class:`AnalysisResult`): its rows as CSV, JSON, DataFrame, text and HTML,
and ``report``, which writes every file the command line writes and shows the console table and TensorBoard items."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from critnet.console import console, format_cell
from critnet.writers import write_csv, write_json

#: Rows a ``repr`` or a notebook shows of each table.
PREVIEW_ROWS = 10


def _digits(column: str, default: int) -> int:
    return 2 if column in ("top1", "top5") else default  # accuracies are percentages


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """Right-aligned plain-text columns.

    >>> print(text_table(["unit", "loss"], [["fc", 0.5]]))
    unit    loss
      fc  0.5000
    """
    cells = [[format_cell(v, _digits(c, digits)) for c, v in zip(columns, row)] for row in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str, digits: int = 4) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v, _digits(c, digits)))}</td>" for c, v in zip(columns, row))
        + "</tr>" for row in rows
    )
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


class AnalysisResult:
    """The members of :class:`~critnet.results.Ranking`, :class:`~critnet.results.Sweep` and
    :class:`~critnet.results.Campaign`: ``rows`` (one dict per CSV line, ``columns``), ``summary`` (the JSON
    record), ``to_csv``, ``to_json``, ``to_dataframe``, ``report`` (every file the command line writes, the
    console table and TensorBoard items), ``print_table``, ``log_tensorboard``, ``repr`` and a notebook table.

    A subclass gives ``rows``, ``columns``, ``summary``, ``preview_tables`` and ``write_files``, and the console
    and TensorBoard views.

    >>> class Squares(AnalysisResult):
    ...     columns = ("n", "square")
    ...     rows = [{"n": n, "square": n * n} for n in range(3)]
    ...     summary = {"largest": 4}
    ...     def preview_tables(self):
    ...         return [("squares", self.columns, [[r["n"], r["square"]] for r in self.rows])]
    >>> print(repr(Squares()))
    Squares: squares
    n  square
    0       0
    1       1
    2       4
    """

    columns: Sequence[str] = ()
    #: Rows of each table ``repr`` and a notebook show (None: all).
    preview_rows: int | None = PREVIEW_ROWS
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows (``columns``, floats at full precision)."""
        return write_csv(path, self.csv_rows(), self.columns)

    def csv_rows(self) -> list[Mapping[str, Any]]:
        return self.rows

    def to_json(self, path: str | Path) -> Path:
        """Write the ``summary`` record as strict JSON."""
        return write_json(path, self.summary)

    def to_dataframe(self):
        """The rows as a pandas DataFrame (needs pandas, which critnet does not depend on)."""
        try:
            import pandas as pd
        except ImportError:  # pandas is optional: the rows are plain dicts
            raise ImportError("to_dataframe() needs pandas (pip install pandas); .rows holds the same data") from None
        return pd.DataFrame(list(self.rows), columns=list(self.columns))

    def preview_tables(self) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
        """``(caption, columns, rows)`` of each table that ``repr`` and a notebook show."""
        raise NotImplementedError

    def write_files(self, directory: Path) -> list[Path]:
        """Every file of the command line in ``directory``."""
        raise NotImplementedError

    def print_table(self) -> None:
        """Print the result's table on the console."""
        raise NotImplementedError

    def log_tensorboard(self, writer: Any, step: int = 0) -> list[str]:
        """Write the TensorBoard items with a ``SummaryWriter``; returns their tags."""
        raise NotImplementedError

    def closing_lines(self, paths: Sequence[Path]) -> list[str]:
        """What the console says after the table (notes on how far the result can be trusted, where it went)."""
        return []

    def report(self, directory: str | Path, *, writer: Any = None, step: int = 0,
               print_table: bool = True) -> list[Path]:
        """Everything the command line reports: its files in ``directory``, the console table (``print_table``),
        TensorBoard items when ``writer`` (a ``SummaryWriter``) is given. Returns the paths written."""
        paths = self.write_files(Path(directory))
        if print_table:
            self.print_table()
        if writer is not None:
            self.log_tensorboard(writer, step)
        for line in self.closing_lines(paths):
            console.print(line)
        return paths

    def __repr__(self) -> str:
        parts = []
        for caption, columns, rows in self.preview_tables():
            more = len(rows) - len(rows[:self.preview_rows])
            parts.append(f"{caption}\n{text_table(columns, rows[:self.preview_rows])}"
                         + (f"\n… {more} more rows" if more > 0 else ""))
        return f"{type(self).__name__}: " + "\n\n".join(parts)

    def _repr_html_(self) -> str:
        return "".join(html_table(columns, rows[:self.preview_rows], f"{caption} ({len(rows)} rows)")
                       for caption, columns, rows in self.preview_tables())
