"""What critnet shows on the console (Lightning-free): the one progress mechanism of the long analyses (rankings,
pruning sweeps, fault campaigns: a rich bar that rank 0 draws, or a function told the counts) and rich tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from critnet.distributed import Distributed

#: The console every table and progress bar of critnet draws on.
console = Console()


class AnalysisProgress:
    """A progress bar of one analysis: steps done of total, elapsed and remaining time, the current step.

    Inert when ``enabled`` is false, so every rank can hold one and only rank 0 draws it. Rich allows one live
    display at a time; while Lightning's rich bar is live (it is during ``validate``), pass it as ``running`` and
    the task joins that display instead. If neither works the analysis runs without a bar.

    Args:
        label: what is running, e.g. ``"ranking · zero · exact"``.
        enabled: draw the bar (rank 0 and progress wanted).
        total: the number of steps, or None while unknown (set it with :meth:`update`).
        step_name: what a step is, shown after the count (``"units"``, ``"settings"``).
        running: Lightning's live ``rich.progress.Progress``, if any.
        callback: also called as ``callback(done, total)`` at every update, on every rank that has one.
    """

    def __init__(self, label: str, enabled: bool = True, total: int | None = None, step_name: str = "",
                 running: Any = None, callback: Callable[[int, int | None], None] | None = None) -> None:
        self.label = label
        self.callback = callback
        self.enabled = enabled
        self.total = total
        self.step_name = step_name
        self._running = running
        self._progress = None
        self._owned = False
        self._task = None

    def __enter__(self) -> AnalysisProgress:
        if not self.enabled:
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        live = getattr(self._running, "live", None)
        if live is not None and live.is_started:
            self._progress = self._running
        else:
            progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn(self.step_name),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            try:
                progress.start()
            except Exception:  # noqa: BLE001 - another live display we cannot join: go without a bar
                return self
            self._progress, self._owned = progress, True
        # Lightning's display needs a number (None = not yet known is rich's own convention); the first update
        # sets the real total.
        total = self.total if self.total is not None or self._owned else 0
        self._task = self._progress.add_task(self.label, total=total)
        return self

    def update(self, done: int, total: int | None = None, step: str | None = None) -> None:
        """Set the count of finished steps (and the total, once known); ``step`` describes what runs next, shown
        beside the label."""
        if total is not None:
            self.total = total
        if self.callback is not None:
            self.callback(done, self.total)
        if self._progress is not None:
            description = self.label if step is None else f"{self.label}: {step}"
            self._progress.update(self._task, completed=done, total=self.total, description=description)
            self._refresh()

    def _refresh(self) -> None:
        if not self._owned:  # Lightning's display does not refresh itself between its own steps
            self._progress.refresh()

    def __exit__(self, *exc_info: Any) -> None:
        if self._progress is None:
            return
        if self._owned:
            self._progress.stop()
        else:
            self._progress.remove_task(self._task)
        self._progress = None


def progress_bar(progress: Any, label: str, distributed: Distributed, *, total: int | None = None,
                 step_name: str = "") -> AnalysisProgress:
    """The analysis's progress, from the ``progress`` argument of the public functions: true draws a bar on the
    lead rank, a live ``rich.progress.Progress`` (e.g. Lightning's) is joined by that bar, and a function is called
    as ``progress(done, total)`` with this rank's counts, on every rank; false shows nothing.

    >>> with progress_bar(lambda done, total: print(done, total), "demo", Distributed.single(), total=2) as bar:
    ...     bar.update(1)
    1 2
    """
    running = progress if hasattr(progress, "add_task") else None
    callback = progress if callable(progress) and running is None else None
    return AnalysisProgress(label, bool(progress) and callback is None and distributed.is_lead, total=total,
                            step_name=step_name, running=running, callback=callback)


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals (nan and inf as words), None as nothing.

    >>> format_cell(0.123456), format_cell(float("nan")), format_cell(None), format_cell(3)
    ('0.1235', 'nan', '', '3')
    """
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
