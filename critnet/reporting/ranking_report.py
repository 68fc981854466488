"""Reports of a ranking: ranking.csv / ranking.json, the rich top-K table and progress bar, TensorBoard items.

Lightning-free: functions take rows (:func:`critnet.results.ranking_rows.ranking_rows`) and a ``SummaryWriter``; the callback
decides which rank calls them (rank 0 only).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from critnet.progress import console
from critnet.reporting.tables import format_cell
from critnet.results.ranking_rows import INTERVAL_OF_SCORE, RANKING_COLUMNS
from critnet.scoring import Z95
from critnet.writers import write_csv, write_json

TOP_K_COLUMNS = ("rank", "unit", "perturbation", "level", "score", "loss", "delta_loss", "delta_loss_se", "top1",
                 "top5", "top1_drop_se")


def write_ranking_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Long-form rows, floats at full precision (``repr``) so that readers recover the exact scores."""
    return write_csv(path, [{k: _full_precision(v) for k, v in row.items()} for row in rows], RANKING_COLUMNS)


def _full_precision(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value


def write_ranking_json(path: str | Path, summary: Mapping[str, Any]) -> Path:
    return write_json(path, summary)


# loss is left out: it is the score (score=loss) or baseline + Δloss
CONSOLE_COLUMNS = (("rank", "rank"), ("unit", "unit"), ("score", "score"), ("delta_loss", "Δloss ± se"),
                   ("top1", "top-1 %"), ("top5", "top-5 %"))


def print_top_k(rows: Sequence[Mapping[str, Any]], k: int, title: str) -> Table:
    """The top ``k`` rows as a rich table; unit names are never truncated (they fold)."""
    table = Table(title=title, title_justify="left")
    for key, header in CONSOLE_COLUMNS:
        if key == "unit":
            table.add_column(header, overflow="fold", ratio=3)
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for row in rows[:k]:
        cells = [format_cell(row[key], 2 if key in ("top1", "top5") else 4) for key, _ in CONSOLE_COLUMNS]
        se = row.get("delta_loss_se", math.nan)
        if isinstance(se, float) and math.isfinite(se):
            cells[3] += f" ± {format_cell(se, 4)}"  # one standard error over the images
        if not row["exact"]:
            cells[1] += " (estimate)" if not row["samples"] else f" (eliminated after {row['samples']} images)"
        table.add_row(*cells)
    console.print(table)
    return table


def top_k_markdown(rows: Sequence[Mapping[str, Any]], k: int) -> str:
    """The top-K table in Markdown (TensorBoard renders text summaries as Markdown)."""
    lines = ["| " + " | ".join(TOP_K_COLUMNS) + " |", "|" + "---|" * len(TOP_K_COLUMNS)]
    for row in rows[:k]:
        lines.append("| " + " | ".join(format_cell(row[c], 5) for c in TOP_K_COLUMNS) + " |")
    return "\n".join(lines)


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def top_k_figure(rows: Sequence[Mapping[str, Any]], k: int, score: str, title: str):
    """A horizontal bar chart of the top K scores, most critical at the top; broken units (NaN/inf) are drawn as
    red bars at the largest finite score and labelled with their value."""
    from matplotlib.figure import Figure

    top = list(rows[:k])
    scores = [float(row["score"]) for row in top]
    finite = _finite(scores)
    cap = float(finite.max()) if finite.size else 1.0
    heights = [s if math.isfinite(s) else cap for s in scores]
    colors = ["tab:blue" if math.isfinite(s) else "tab:red" for s in scores]
    figure = Figure(figsize=(8, 0.3 * len(top) + 1.2), dpi=100)
    axes = figure.add_subplot()
    positions = np.arange(len(top))
    # 95 % intervals where the score has them; units without one (estimates) get no bar rather than a made-up one
    interval = INTERVAL_OF_SCORE.get(score)
    errors = [Z95 * float(row.get(f"{interval}_se", math.nan)) if interval else math.nan for row in top]
    errors = [e if math.isfinite(e) and math.isfinite(s) else 0.0 for e, s in zip(errors, scores)]
    axes.barh(positions, heights, color=colors, xerr=errors if any(errors) else None, ecolor="black", capsize=2)
    axes.set_yticks(positions, [str(row["unit"]) for row in top], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel(score)
    axes.set_title(f"top {len(top)}\n{title}", fontsize=9)
    for position, value in zip(positions, scores):
        if not math.isfinite(value):
            axes.text(cap, position, f" {value}", va="center", fontsize=7)
    if score == "loss" and finite.size and finite.min() > 0:
        # perturbed losses cluster far from 0: start the axis near them so that their differences stay visible
        low = float(min(h - e for h, e in zip(heights, errors)))
        high = float(max(h + e for h, e in zip(heights, errors)))
        margin = 0.05 * (high - low) or 0.05 * high
        axes.set_xlim(max(0.0, low - margin), high + margin)
    figure.tight_layout()
    return figure


def channel_heatmap_figure(
    rows: Sequence[Mapping[str, Any]], score: str, title: str, layer_order: Sequence[str] | None = None
):
    """Per-layer heatmap of channel scores: one row per layer, one column per channel index; units whose score is
    not finite (a broken network) are marked with a red x. ``layer_order`` = the layers in model order (default:
    natural sort of the names). None when the rows hold no channel or activation units."""
    from matplotlib.figure import Figure

    by_layer: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row["index"] == "" or row["index"] is None:
            continue
        by_layer[row["layer"]][int(row["index"])] = float(row["score"])
    if not by_layer:
        return None
    layers = [layer for layer in (layer_order or sorted(by_layer, key=_natural_key)) if layer in by_layer]
    width = max(max(channels) for channels in by_layer.values()) + 1
    grid = np.full((len(layers), width), np.nan)
    for i, layer in enumerate(layers):
        for index, value in by_layer[layer].items():
            grid[i, index] = value
    finite = grid[np.isfinite(grid)]
    figure = Figure(figsize=(min(16, max(6, width * 0.12 + 3)), 0.28 * len(layers) + 1.5), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=float(finite.min()) if finite.size else None,
        vmax=float(finite.max()) if finite.size else None,
    )
    for i, layer in enumerate(layers):
        for index, value in by_layer[layer].items():
            if not math.isfinite(value):
                axes.text(index, i, "x", ha="center", va="center", color="red", fontsize=6)
    axes.set_yticks(np.arange(len(layers)), layers, fontsize=7)
    axes.set_xlabel("output channel")
    axes.set_title(f"{sum(len(c) for c in by_layer.values())} units by layer and channel\n{title}", fontsize=9)
    figure.colorbar(image, ax=axes, label=score)
    figure.tight_layout()
    return figure


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in name.replace("[", ".").split(".")]


def log_tensorboard(
    writer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Mapping[str, float],
    agreement: Mapping[str, Any],
    score: str,
    top_k: int,
    prefix: str = "ranking",
    step: int = 0,
    title: str = "",
    layer_order: Sequence[str] | None = None,
) -> list[str]:
    """Write the ranking's TensorBoard items and return their tags.

    ``{prefix}/top_k`` (text), ``{prefix}/top_k_bar`` (figure), ``{prefix}/scores/<layer>`` (histograms),
    ``{prefix}/channel_heatmap`` (figure, channel/activation units), ``{prefix}/baseline/{loss,top1,top5}`` and
    ``{prefix}/split_half_spearman`` (scalars). ``title`` describes the analysis (model, perturbation, images);
    ``layer_order`` lists the layers in model order (histograms and heatmap rows follow it).
    """
    tags = []
    writer.add_text(f"{prefix}/top_k", top_k_markdown(rows, top_k), global_step=step)
    tags.append(f"{prefix}/top_k")
    writer.add_figure(f"{prefix}/top_k_bar", top_k_figure(rows, top_k, score, title), global_step=step, close=True)
    tags.append(f"{prefix}/top_k_bar")

    by_layer: dict[str, list[float]] = {layer or "(model)": [] for layer in layer_order or []}
    for row in rows:
        by_layer.setdefault(row["layer"] or "(model)", []).append(float(row["score"]))
    for layer, values in by_layer.items():
        finite = _finite(values)
        if finite.size:
            _add_histogram(writer, f"{prefix}/scores/{layer}", finite, step)
            tags.append(f"{prefix}/scores/{layer}")

    heatmap = channel_heatmap_figure(rows, score, title, layer_order)
    if heatmap is not None:
        writer.add_figure(f"{prefix}/channel_heatmap", heatmap, global_step=step, close=True)
        tags.append(f"{prefix}/channel_heatmap")

    for name in ("loss", "top1", "top5"):
        writer.add_scalar(f"{prefix}/baseline/{name}", float(baseline[name]), global_step=step)
        tags.append(f"{prefix}/baseline/{name}")
    spearman = agreement.get("spearman", math.nan)
    if isinstance(spearman, float) and math.isfinite(spearman):
        writer.add_scalar(f"{prefix}/split_half_spearman", spearman, global_step=step)
        tags.append(f"{prefix}/split_half_spearman")
    writer.flush()
    return tags


def _add_histogram(writer: Any, tag: str, values: np.ndarray, step: int) -> None:
    # TensorBoard's own binning (exponential buckets) drops values beyond ~1e20, which a broken unit easily
    # reaches, and then refuses the "empty" histogram; linear bins over the actual range keep every value.
    try:
        counts, edges = np.histogram(values, bins=min(30, max(1, values.size)))
    except ValueError:  # a range wider than float64 can hold (e.g. -3e38 .. 3e38): bins at quantiles instead
        edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, min(31, values.size + 1))))
        counts, edges = np.histogram(values, bins=edges)
    writer.add_histogram_raw(
        tag,
        min=float(values.min()),
        max=float(values.max()),
        num=int(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.square(values).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


# Hybrid's exact top k is in doubt when its members come from the second half of the units it checked in estimate
# order: the estimates then order poorly, and the unchecked units beyond may hold more top units (on ResNet20
# channels, zeroed, 256 images: the deepest was 67th of 100 checked, and 11 true top-20 units were never checked).
HYBRID_DEPTH_WARNING = 0.5


def hybrid_note(agreement: dict[str, Any]) -> str:
    """One console line on how far hybrid's exact top k can be trusted, with a warning when its top units were
    found deep in the estimate order."""
    checked, deepest = agreement["units"], agreement["deepest_top_k"]
    line = (f"hybrid: {checked} units checked exactly in estimate order; the deepest of the exact top k was "
            f"{deepest}th by estimate; estimated vs exact Δloss on the checked units: Spearman "
            f"{agreement['spearman']:.3f}, Kendall {agreement['kendall']:.3f}")
    if deepest > HYBRID_DEPTH_WARNING * checked:
        line += ("\n[yellow]warning: top units came from the second half of the checked list, so unchecked units "
                 "may belong in the top k; method: halving or exact give a dependable top k[/]")
    return line


def test_note(test: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """One console line on halving's sequential test: its guarantee (finite-sample, nominal, or void), what each
    stage decided, and how many units reached the whole set (their scores are the exact full-set scores; the others
    were eliminated early)."""
    stages = "; ".join(f"{s['units']} units on {s['images']} images, {s['eliminated']} eliminated" for s in test["stages"])
    exact = sum(1 for row in rows if row["exact"])
    k, confidence = test["top_k"], test["top_k_confidence"]
    if test.get("bound") == "normal":
        claim = (f"the top {k} is the exact full-set top {k} at a nominal {confidence} (normal bounds at "
                 f"{test['z']:.2f} standard errors, {test['correction']}: {len(rows)} units × {test['tests']} tests; "
                 f"not a finite-sample guarantee)")
    else:
        seen = test.get("largest_value")
        what = "loss" if test.get("loss_clip") is not None else "miss"
        claim = (f"the top {k} is the exact full-set top {k} with probability ≥ {confidence} (finite-sample betting "
                 f"bounds, {test['correction']}, a perturbed network's per-image {what} declared in "
                 f"[0, {test['range_width']:g}]" + (f", largest seen {seen:.4g}" if seen is not None else "") + ")")
        if test["guarantee"].startswith("void"):
            claim = f"NO GUARANTEE ({test['guarantee']}); without it, {claim}"
    return (f"halving: {claim}; {stages}; {exact} units have exact full-set scores, "
            f"{len(rows) - exact} were eliminated early (their scores are over the images they saw)"
            + (f"; {test['ties_at_boundary']} units tie with the {k}th" if test.get("ties_at_boundary") else ""))


def boundary_note(boundary: Mapping[str, Any]) -> str:
    """One console line on how settled the top-k boundary is across images (95 % intervals of the k-th unit)."""
    low, high = boundary["interval"]
    above, below = boundary["overlapping"]["above"], boundary["overlapping"]["below"]
    return (f"top-{boundary['k']} boundary: {boundary['unit']} has the 95 % interval [{format_cell(low, 4)}, "
            f"{format_cell(high, 4)}]; {above} units above and {below} below it have overlapping intervals")
