"""The figures of every result (matplotlib ``Figure`` objects, no pyplot state): a ranking's top-k bars and channel
heatmap, a sweep's curves, a campaign's layer × bit heatmap and per-layer rates."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from critnet.formats import FORMATS
from critnet.results.ranking_rows import INTERVAL_OF_SCORE
from critnet.scoring import Z95


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (the folder is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path



def finite_values(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def top_k_figure(rows: Sequence[Mapping[str, Any]], k: int, score: str, title: str):
    """A horizontal bar chart of the top K scores, most critical at the top; broken units (NaN/inf) are drawn as
    red bars at the largest finite score and labelled with their value."""
    from matplotlib.figure import Figure

    top = list(rows[:k])
    scores = [float(row["score"]) for row in top]
    finite = finite_values(scores)
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


def curves_figure(summary: Sequence[Mapping[str, Any]], series_key: str, x_key: str, x_label: str, title: str):
    """top-1, top-5 and loss against ``x_key`` (a ratio, drawn in percent), one line per value of ``series_key``,
    with ± one standard deviation where there were several draws."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 3.8), dpi=100)
    axes = figure.subplots(1, 3)
    series: dict[Any, list[Mapping[str, Any]]] = {}
    for entry in summary:
        series.setdefault(entry[series_key], []).append(entry)
    for name, entries in series.items():
        entries = sorted(entries, key=lambda e: e[x_key])
        xs = [100 * e[x_key] for e in entries]
        for ax, metric in zip(axes, ("top1", "top5", "loss")):
            ys = [e[metric] for e in entries]
            errors = [e.get(f"{metric}_std", 0.0) for e in entries]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", ms=3, capsize=2,
                        label=f"{series_key} {name}")
    for ax, metric in zip(axes, ("top-1 %", "top-5 %", "loss")):
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _heatmap(axes, campaign) -> Any:
    layers = [r["layer"] for r in campaign.rates["layer"]]
    bits = [r["bit"] for r in campaign.rates["bit"]]
    grid = np.full((len(layers), len(bits)), np.nan)
    for row in campaign.rates["layer_bit"]:
        if row["faults"]:
            grid[layers.index(row["layer"]), bits.index(row["bit"])] = 100 * row["critical"]
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="magma_r",
                        vmin=0, vmax=max(1e-9, float(np.nanmax(grid))) if np.isfinite(grid).any() else 1)
    axes.set_yticks(np.arange(len(layers)), layers, fontsize=6)
    axes.set_xticks(np.arange(len(bits)), [str(b) for b in bits], fontsize=6)
    formats = sorted(set((campaign.settings.get("formats") or {"": "float32"}).values()))
    layouts = "; ".join(f"{name} {FORMATS[name].layout()}" for name in formats)
    axes.set_xlabel(f"lowest bit struck ({layouts}); blank = no fault drawn", fontsize=7)
    axes.set_title("critical faults (SDC-1 rate > threshold), % of faults", fontsize=9)
    return image


def _layer_bars(axes, campaign) -> None:
    rows = [r for r in campaign.rates["layer"] if r["faults"]]
    rates = np.array([100 * r["critical"] for r in rows])
    low = np.clip(rates - np.array([100 * r["critical_low"] for r in rows]), 0, None)
    high = np.clip(np.array([100 * r["critical_high"] for r in rows]) - rates, 0, None)
    positions = np.arange(len(rows))
    axes.barh(positions, rates, xerr=[low, high], color="tab:red", ecolor="black", capsize=2)
    axes.set_yticks(positions, [f"{r['layer']} (n={r['faults']})" for r in rows], fontsize=6)
    axes.invert_yaxis()
    axes.set_xlabel("critical faults, % (95 % interval, faults as sampling units)")
    axes.set_title("per layer", fontsize=9)


def heatmap_figure(campaign):
    """The layer × bit heatmap of critical-fault (SDC-1) rates; None for bit-error-rate campaigns."""
    from matplotlib.figure import Figure

    if not campaign.rates["layer_bit"]:
        return None
    figure = Figure(figsize=(10, 0.25 * len(campaign.rates["layer"]) + 2), dpi=100)
    axes = figure.add_subplot()
    figure.colorbar(_heatmap(axes, campaign), ax=axes, label="% of faults")
    figure.suptitle(campaign.caption(), fontsize=8)
    figure.tight_layout()
    return figure


def layer_figure(campaign):
    """Per-layer critical-fault rates with 95 % error bars; None for bit-error-rate campaigns."""
    from matplotlib.figure import Figure

    if not campaign.rates["layer"]:
        return None
    figure = Figure(figsize=(7, 0.25 * len(campaign.rates["layer"]) + 2), dpi=100)
    _layer_bars(figure.add_subplot(), campaign)
    figure.suptitle(campaign.caption(), fontsize=8)
    figure.tight_layout()
    return figure


def campaign_figure(campaign):
    """Both panels side by side (``Campaign.plot``)."""
    from matplotlib.figure import Figure

    height = 0.25 * max(1, len(campaign.rates["layer"])) + 2.5
    figure = Figure(figsize=(15, height), dpi=100)
    if campaign.rates["layer_bit"]:
        left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        figure.colorbar(_heatmap(left, campaign), ax=left, label="% of faults")
        _layer_bars(right, campaign)
    else:
        axes = figure.add_subplot()
        overall = campaign.rates["overall"]
        axes.bar([0], [100 * overall["critical"]], yerr=[[100 * (overall["critical"] - overall["critical_low"])],
                                                         [100 * (overall["critical_high"] - overall["critical"])]])
        axes.set_xticks([0], ["all faults"])
        axes.set_ylabel("critical faults, %")
    figure.suptitle(campaign.caption(), fontsize=9)
    figure.tight_layout()
    return figure
