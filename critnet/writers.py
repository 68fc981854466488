"""The one CSV writer and the one JSON writer of every result. Lightning-free; callers decide which rank writes."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


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
    """Write long-form rows, one line each with ``columns`` in order: floats at full precision (``repr``) so that
    readers recover the exact numbers, missing values and None as empty cells, other keys left out.

    >>> import tempfile
    >>> path = write_csv(Path(tempfile.mkdtemp()) / "rows.csv", [{"a": 0.1, "b": None, "c": 3}], ["a", "b"])
    >>> path.read_text().splitlines()
    ['a,b', '0.1,']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if (v := row.get(c)) is None else repr(v) if isinstance(v, float) else v
                             for c in columns])
    return path
