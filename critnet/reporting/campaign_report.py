"""Reports of a fault campaign: figures (PNG and TensorBoard), the rich console table. Lightning-free; the caller
decides which rank calls them (rank 0 only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from critnet.progress import console


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
    axes.set_xlabel("bit (0 = lowest mantissa bit, 23–30 exponent, 31 sign); blank = no fault drawn")
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


def _context(campaign) -> str:
    s = campaign.settings
    return (f"{len(campaign.faults)} {s['fault_model']} faults in {s['target']} · {campaign.golden['images']} images · "
            f"critical = SDC-1 rate > {campaign.threshold:g}")


def heatmap_figure(campaign):
    """The layer × bit heatmap of critical-fault (SDC-1) rates; None for bit-error-rate campaigns."""
    from matplotlib.figure import Figure

    if not campaign.rates["layer_bit"]:
        return None
    figure = Figure(figsize=(10, 0.25 * len(campaign.rates["layer"]) + 2), dpi=100)
    axes = figure.add_subplot()
    figure.colorbar(_heatmap(axes, campaign), ax=axes, label="% of faults")
    figure.suptitle(_context(campaign), fontsize=8)
    figure.tight_layout()
    return figure


def layer_figure(campaign):
    """Per-layer critical-fault rates with 95 % error bars; None for bit-error-rate campaigns."""
    from matplotlib.figure import Figure

    if not campaign.rates["layer"]:
        return None
    figure = Figure(figsize=(7, 0.25 * len(campaign.rates["layer"]) + 2), dpi=100)
    _layer_bars(figure.add_subplot(), campaign)
    figure.suptitle(_context(campaign), fontsize=8)
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
    figure.suptitle(_context(campaign), fontsize=9)
    figure.tight_layout()
    return figure


def save_figures(campaign, directory: str | Path) -> list[Path]:
    """``fault_heatmap.png`` and ``fault_layers.png`` in ``directory`` (none for bit-error-rate campaigns)."""
    paths = []
    for name, figure in (("fault_heatmap.png", heatmap_figure(campaign)), ("fault_layers.png", layer_figure(campaign))):
        if figure is not None:
            path = Path(directory) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path)
            paths.append(path)
    return paths


def print_campaign_table(campaign) -> None:
    """The overall and per-layer rates as a rich table, then the most vulnerable bits."""
    from rich.table import Table

    table = Table(title=f"fault campaign · {_context(campaign)}", title_justify="left")
    for position, header in enumerate(campaign.TABLE_HEADER):
        table.add_column(header, justify="left" if position == 0 else "right", overflow="fold")
    for row in campaign.table_rows():
        table.add_row(*row)
    console.print(table)
    bits = [r for r in campaign.vulnerability_ranking() if r["kind"] == "bit"][:8]
    if bits:
        console.print("most vulnerable bits: " + ", ".join(
            f"bit {r['name']} {100 * r['critical']:.1f} % [{100 * r['critical_low']:.1f}, {100 * r['critical_high']:.1f}]"
            for r in bits))


def log_tensorboard(writer: Any, campaign, prefix: str = "faults", step: int = 0) -> list[str]:
    """``{prefix}/heatmap`` and ``{prefix}/layers`` (figures), ``{prefix}/critical`` and per-image SDC-1 (scalars)."""
    tags = []
    for name, figure in (("heatmap", heatmap_figure(campaign)), ("layers", layer_figure(campaign))):
        if figure is not None:
            writer.add_figure(f"{prefix}/{name}", figure, global_step=step, close=True)
            tags.append(f"{prefix}/{name}")
    overall = campaign.rates["overall"]
    for name in ("critical", "critical_correct", "sdc1_per_image"):
        value = overall[name]
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{name}", value, global_step=step)
            tags.append(f"{prefix}/{name}")
    writer.flush()
    return tags
