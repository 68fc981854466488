"""The analysis progress bar: own display, joining Lightning's live display, and inert on other ranks."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from critnet.console import AnalysisProgress
import critnet.console as progress_module


def test_own_display_counts_and_stops(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress_module, "console", Console(file=out, force_terminal=False, width=120))
    with AnalysisProgress("ranking · zero · exact", step_name="units") as bar:
        assert bar._owned and bar._progress.live.is_started
        bar.update(3, 7)
        task = bar._progress.tasks[0]
        assert (task.completed, task.total) == (3, 7)
        owned = bar._progress
    assert not owned.live.is_started
    assert "3/7" in out.getvalue() and "units" in out.getvalue()


def test_joins_lightnings_display_before_the_total_is_known():
    from lightning.pytorch.callbacks.progress.rich_progress import CustomProgress

    running = CustomProgress(console=Console(file=io.StringIO()))  # refuses tasks without a total
    running.start()
    try:
        with AnalysisProgress("ranking", step_name="units", running=running) as bar:
            bar.update(2, 5)
            assert (running.tasks[-1].completed, running.tasks[-1].total) == (2, 5)
    finally:
        running.stop()


def test_joins_a_running_display_and_leaves_it_running():
    running = Progress(console=Console(file=io.StringIO()))
    running.start()
    try:
        running.add_task("validate", total=10)
        with AnalysisProgress("prune", total=2, step_name="settings", running=running) as bar:
            assert bar._progress is running and not bar._owned
            bar.update(1, step="p_prune=0.1")
            joined = running.tasks[-1]
            assert joined.completed == 1 and joined.description == "prune: p_prune=0.1"
        assert [t.description for t in running.tasks] == ["validate"]  # our task removed, theirs kept
        assert running.live.is_started
    finally:
        running.stop()


def test_goes_without_a_bar_when_another_live_display_cannot_be_joined(monkeypatch):
    console = Console(file=io.StringIO())
    monkeypatch.setattr(progress_module, "console", console)
    other = Progress(console=console)
    other.start()  # a live display that is not handed to us
    try:
        with AnalysisProgress("ranking") as bar:
            bar.update(1, 2)
            bar.update(2, step="next")
    finally:
        other.stop()


def test_disabled_is_inert():
    with AnalysisProgress("ranking", enabled=False, total=3) as bar:
        bar.update(1, 3)
        bar.update(2, step="x")
        assert bar._progress is None


def test_a_function_is_told_the_counts_on_every_rank_and_draws_nothing():
    from critnet.distributed import Distributed
    from critnet.console import progress_bar

    seen = []
    with progress_bar(lambda done, total: seen.append((done, total)), "faults", Distributed(1, 2, lambda x: [x, x]),
                      step_name="faults") as bar:
        bar.update(0, 3)
        bar.update(1)
        assert bar._progress is None
    assert seen == [(0, 3), (1, 3)]
