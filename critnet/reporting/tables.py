"""Rich tables on the console, shared by every report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from critnet.progress import console


def format_cell(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


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
