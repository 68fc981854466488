"""Artifact writers shared by every report. Lightning-free; callers decide which rank writes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

console = Console()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": strict JSON has no such literals
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy/torch scalars
        return _jsonable(value.item())
    return value


def write_json(path: str | Path, obj: Mapping[str, Any]) -> Path:
    """Write ``obj`` as indented, strict JSON (non-finite floats as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write long-form rows; missing values become empty cells, extra keys are an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


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


def tensorboard_experiment(trainer: Any):
    """The ``SummaryWriter`` of the trainer's TensorBoardLogger, or ``None`` if it has none."""
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar") and hasattr(experiment, "add_figure"):
            return experiment
    return None
