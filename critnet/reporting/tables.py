"""Rich tables on the console for what the command line reports besides the results' own tables (a run's metrics).

The results print their own tables (:meth:`critnet.results.protocol.AnalysisResult.print_table`): results never
import reporting; reporting reads results."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from critnet.progress import console
from critnet.results.protocol import format_cell


def print_table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4, justify_numbers: bool = True
) -> Table:
    """Print a rich table to the console and return it."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left")
    for row in rows:
        cells = [format_cell(v, digits) for v in row]
        table.add_row(*cells)
    if justify_numbers:
        for column in table.columns:
            cells = [c for c in column._cells if c]
            if cells and all(_is_number(c) for c in cells):
                column.justify = "right"
    console.print(table)
    return table


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
