"""What every result object shares: plain-text, HTML and DataFrame views of its rows."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from critnet.reporting.tables import format_cell

_PREVIEW_ROWS = 10


def _digits(column: str, default: int) -> int:
    return 2 if column in ("top1", "top5") else default  # accuracies are percentages


def _text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    cells = [[format_cell(v, _digits(c, digits)) for c, v in zip(columns, row)] for row in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str, digits: int = 4) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v, _digits(c, digits)))}</td>" for c, v in zip(columns, row))
        + "</tr>" for row in rows
    )
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def _dataframe(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
    try:
        import pandas as pd
    except ImportError:  # pandas is optional: the rows are plain dicts
        raise ImportError("to_dataframe() needs pandas (pip install pandas); .rows holds the same data") from None
    return pd.DataFrame(list(rows), columns=list(columns))
