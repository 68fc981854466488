"""The result of a fault campaign: per-fault outcome counts, rate tables with intervals, files, figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from critnet.faults.draw import Stratum
from critnet.faults.evaluator import FaultCounts
from critnet.faults.injection import FAULT_LIST_COLUMNS, Fault
from critnet.formats import FORMATS
from critnet.faults.stats import domain_estimate
from critnet.console import console
from critnet.results.figures import (
    campaign_figure,
    heatmap_figure,
    layer_figure,
    save_figure,
)
from critnet.results.protocol import AnalysisResult
from critnet.writers import write_csv

#: One row per fault: the fault list, then counts over the evaluated images (see :class:`FaultCounts`).
FAULT_COLUMNS = (*FAULT_LIST_COLUMNS, "images", "masked", "noncritical", "sdc1", "sdc5", "nonfinite", "delta_loss",
                 "accuracy_drop", "correct_images", "sdc1_correct", "sdc5_correct", "critical", "critical_correct",
                 "delta_loss_excluded")
#: Fault-level outcomes (a fault counts once), reported as rates over faults with 95 % intervals.
FAULT_METRICS = {
    "critical": "SDC-1 rate over all images above the threshold",
    "critical_correct": "SDC-1 rate over the golden-correct images above the threshold",
    "sdc5": "SDC-5 rate over all images above the threshold",
    "nonfinite": "a NaN/inf logit on at least one image",
    "masked": "bit-identical logits on every image",
}
#: Image-level means over (fault, image) pairs of the population: per fault ``(numerator, denominator)``.
IMAGE_METRICS = {
    "sdc1_per_image": lambda c: (c.sdc1, c.images),
    "sdc1_per_image_correct": lambda c: (c.sdc1_correct, c.correct_images),
    "sdc5_per_image": lambda c: (c.sdc5, c.images),
    "delta_loss": lambda c: (c.delta_loss_sum, c.loss_images),  # the (fault, image) pairs with a finite loss
    "accuracy_drop": lambda c: (100.0 * (c.correct_images - c.faulty_correct), c.images),
}
#: The image-level rates in [0, 1], which carry an interval (a mean change of loss or accuracy has none).
BOUNDED_IMAGE_METRICS = ("sdc1_per_image", "sdc1_per_image_correct", "sdc5_per_image")
RATE_COLUMNS = ("group", "layer", "bit", "field", "faults", "population",
                *[f"{m}{s}" for m in FAULT_METRICS for s in ("", "_low", "_high")], *IMAGE_METRICS,
                *[f"{m}{s}" for m in BOUNDED_IMAGE_METRICS for s in ("_low", "_high")], "effective_n", "unsampled",
                "delta_loss_excluded")
RANKING_COLUMNS = ("rank", "kind", "name", "faults", "critical", "critical_low", "critical_high", "sdc1_per_image",
                   "sdc1_per_image_low", "sdc1_per_image_high")


class Campaign(AnalysisResult):
    """The outcome of :func:`critnet.fault_campaign`.

    Attributes:
        faults: one dict per fault (``FAULT_COLUMNS``): where it struck, its original and faulty values, and counts
            over the evaluated images — ``masked`` (bit-identical logits), ``noncritical`` (logits differ, same
            top-1), ``sdc1`` (top-1 changed; NaN/inf logits included), ``sdc5`` (the golden top-1 left the faulty
            top-5), ``nonfinite``; ``delta_loss`` is the mean change of cross-entropy over the images whose loss
            stays finite (``delta_loss_excluded`` counts the others; nan when there is none), ``accuracy_drop`` the
            change of top-1 accuracy in points; ``*_correct`` count only images the golden model classifies
            correctly.
        rates: ``{"overall": row, "layer": rows, "bit": rows, "field": rows, "layer_bit": rows, "layer_field": rows}``
            (``RATE_COLUMNS``; a field is a bit field of the values' format, :mod:`critnet.formats`): every rate
            estimated as the faults were sampled (:func:`critnet.faults.stats.domain_estimate`: each fault weighted
            by its stratum's population over its faults drawn, bits as domains of the layer strata), the
            fault-level rates and the per-image SDC rates with 95 % intervals that count faults as the sampling
            units; ``effective_n`` is what the row's faults are worth as equally weighted draws, ``unsampled`` the
            row's possible faults in strata with no fault drawn (then the rates are nan and the intervals span
            every value those faults could take). A layer × bit cell without a fault is reported with 0 faults,
            its population and nan rates.
        sizing: per stratum the population, Leveugle's sample size, the faults drawn and the margin reached.
        settings, golden, info: what ran, the fault-free accuracy on the images, checksums and timings.

    >>> campaign = fault_campaign(model, loader, faults=1000)  # doctest: +SKIP
    >>> rate = campaign.rates["overall"]["critical"]  # doctest: +SKIP
    >>> paths = campaign.report("out"); figure = campaign.plot()  # doctest: +SKIP
    """

    columns = FAULT_COLUMNS

    def __init__(self, *, fault_list: Sequence[Fault], counts: Sequence[FaultCounts], strata: Sequence[Stratum],
                 sizing: list[dict], settings: dict, golden: dict, info: dict) -> None:
        self.fault_list = list(fault_list)
        self.counts = list(counts)
        self.strata = list(strata)
        self.sizing = sizing
        self.settings = settings
        self.golden = golden
        self.info = info
        self.threshold = float(settings.get("critical_threshold", 0.0))
        self.faults = [self._row(f, c) for f, c in zip(self.fault_list, self.counts)]
        self.rates = self._rates(0.95)

    # ----------------------------------------------------------------- rows

    def _row(self, fault: Fault, c: FaultCounts) -> dict[str, Any]:
        row: dict[str, Any] = fault.list_row()
        if len(fault.sites) == 1:
            row["index"], row["bit"] = fault.sites[0].index, fault.sites[0].bit
            if fault.original_bits is not None:
                row["original"] = FORMATS[fault.format].value(fault.original_bits[0])
                row["faulty"] = FORMATS[fault.format].value(fault.faulty_bits[0])
        images = max(c.images, 1)
        row.update({
            "images": c.images, "masked": c.masked, "noncritical": c.noncritical, "sdc1": c.sdc1, "sdc5": c.sdc5,
            "nonfinite": c.nonfinite,
            "delta_loss": c.delta_loss_sum / c.loss_images if c.loss_images else math.nan,
            "accuracy_drop": 100.0 * (c.correct_images - c.faulty_correct) / images,
            "correct_images": c.correct_images, "sdc1_correct": c.sdc1_correct, "sdc5_correct": c.sdc5_correct,
            "critical": c.sdc1 / images > self.threshold,
            "critical_correct": c.correct_images > 0 and c.sdc1_correct / c.correct_images > self.threshold,
            "delta_loss_excluded": c.loss_excluded,
        })
        return row

    def _outcome(self, row: dict[str, Any], metric: str) -> bool:
        if metric == "sdc5":
            return row["sdc5"] / max(row["images"], 1) > self.threshold
        if metric == "nonfinite":
            return row["nonfinite"] > 0
        if metric == "masked":
            return row["masked"] == row["images"]
        return bool(row[metric])

    # ----------------------------------------------------------------- rates

    def _rates(self, confidence: float) -> dict[str, Any]:
        ber = len(self.strata) == 1 and math.isinf(self.strata[0].population)
        stratum_of = {(s.layer, b): s for s in self.strata for b in s.bits}
        # the faults drawn from each stratum, by bit: a row selects whole strata or one bit of them
        members: dict[str, dict[int | None, list[int]]] = {s.label: {} for s in self.strata}
        for position, fault in enumerate(self.fault_list):
            if ber:
                members[self.strata[0].label].setdefault(None, []).append(position)
            elif len(fault.sites) == 1 and (fault.sites[0].parameter, fault.sites[0].bit) in stratum_of:
                label = stratum_of[(fault.sites[0].parameter, fault.sites[0].bit)].label
                members[label].setdefault(fault.sites[0].bit, []).append(position)
        layers = [] if ber else list(dict.fromkeys(s.layer for s in self.strata))
        bits = [] if ber else sorted({b for s in self.strata for b in s.bits})
        width = int(self.settings.get("upset_width") or 1)
        # the bit fields of the formats present (an upset spanning two fields is its own field: mantissa+exponent)
        fields = [] if ber else list(dict.fromkeys(FORMATS[s.format].fields_struck(b, width)
                                                   for s in self.strata for b in sorted(s.bits)))

        def field_bits(name: str):
            return lambda s: {b for b in s.bits if FORMATS[s.format].fields_struck(b, width) == name}

        def one_bit(bit: int):
            return lambda s: {bit} & set(s.bits)

        def field_of(bit: int) -> str:
            names = {FORMATS[s.format].fields_struck(bit, width) for s in self.strata if bit in s.bits}
            return names.pop() if len(names) == 1 else ""

        tables: dict[str, Any] = {"overall": self._group_row("overall", None, None, members, confidence)}
        tables["layer"] = [self._group_row("layer", layer, None, members, confidence) for layer in layers]
        tables["bit"] = [self._group_row("bit", None, one_bit(bit), members, confidence, bit, field_of(bit))
                         for bit in bits]
        tables["field"] = [self._group_row("field", None, field_bits(name), members, confidence, field=name)
                           for name in fields]
        tables["layer_bit"] = [self._group_row("layer_bit", layer, one_bit(bit), members, confidence, bit,
                                               field_of(bit)) for layer in layers for bit in bits]
        tables["layer_field"] = [self._group_row("layer_field", layer, field_bits(name), members, confidence,
                                                 field=name) for layer in layers for name in fields]
        return tables

    def _group_row(self, group: str, layer: str | None, bits_of, members: dict[str, dict[int | None, list[int]]],
                   confidence: float, bit: int | None = None, field: str = "") -> dict[str, Any]:
        """The rates over the faults of ``layer`` (None: every layer) whose bit is in ``bits_of(stratum)`` (None:
        every bit)."""
        cells = []  # per stratum the row touches: the stratum, its faults drawn, those in the row, its possible ones
        for s in self.strata:
            chosen = None if bits_of is None else bits_of(s)
            if (layer is not None and s.layer != layer) or chosen == set():
                continue
            drawn = sum(len(p) for p in members[s.label].values())
            inside = [p for b, ps in members[s.label].items() if chosen is None or b in chosen for p in ps]
            domain = s.population if chosen is None or len(s.bits) == 1 else s.elements * len(chosen)
            cells.append((s, drawn, inside, domain))
        population = sum(domain for *_, domain in cells)
        out: dict[str, Any] = {"group": group, "layer": layer if layer is not None else "",
                               "bit": bit if bit is not None else "", "field": field,
                               "faults": sum(len(i) for _, _, i, _ in cells), "population": population}

        def estimate(values, bounded: bool) -> dict[str, float]:
            strata = []
            for s, drawn, inside, domain in cells:
                pairs = [values(p) for p in inside]
                strata.append({"population": s.population, "drawn": drawn, "domain": domain,
                               "y": [y for y, _ in pairs], "x": [x for _, x in pairs]})
            return domain_estimate(strata, confidence, bounded)

        for metric in FAULT_METRICS:
            row = estimate(lambda p, m=metric: (float(self._outcome(self.faults[p], m)), 1.0), True)
            out[metric], out[f"{metric}_low"], out[f"{metric}_high"] = row["rate"], row["low"], row["high"]
        out["effective_n"], out["unsampled"] = row["kish_n"], row["unsampled"]  # the same for every metric
        for metric, values in IMAGE_METRICS.items():
            bounded = metric in BOUNDED_IMAGE_METRICS
            row = estimate(lambda p, v=values: v(self.counts[p]), bounded)
            out[metric] = row["rate"]
            if bounded:
                out[f"{metric}_low"], out[f"{metric}_high"] = row["low"], row["high"]
        out["delta_loss_excluded"] = sum(self.counts[p].loss_excluded for _, _, inside, _ in cells for p in inside)
        for key in ("population", "unsampled"):
            if isinstance(out[key], float) and math.isfinite(out[key]):
                out[key] = int(out[key])
        return out

    def vulnerability_ranking(self) -> list[dict[str, Any]]:
        """Layers and bits, most vulnerable first (critical-fault rate, then SDC-1 per image)."""
        entries = [("layer", r["layer"], r) for r in self.rates["layer"]] + [("bit", r["bit"], r) for r in self.rates["bit"]]
        entries = [e for e in entries if e[2]["faults"] > 0]
        entries.sort(key=lambda e: (-_or_zero(e[2]["critical"]), -_or_zero(e[2]["sdc1_per_image"]), e[0], str(e[1])))
        return [{"rank": i + 1, "kind": kind, "name": name, **{c: r[c] for c in RANKING_COLUMNS[3:]}}
                for i, (kind, name, r) in enumerate(entries)]

    # ----------------------------------------------------------------- files and views

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per fault (``faults.csv``): the same as :attr:`faults`."""
        return self.faults

    @property
    def summary(self) -> dict[str, Any]:
        """What ``campaign.json`` holds: settings, sizing, margins reached, golden accuracy, rates, checksums."""
        return {"settings": self.settings, "golden": self.golden, "faults": len(self.faults),
                "outcomes": FAULT_METRICS, "sizing": {
                    "formula": "n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))), p = 0.5 (Leveugle et al., DATE 2009)",
                    "strata": self.sizing},
                "rates": self.rates, "vulnerability": self.vulnerability_ranking(), **self.info}

    def csv_rows(self) -> list[dict[str, Any]]:
        return [{k: int(v) if isinstance(v, bool) else v for k, v in row.items()} for row in self.faults]

    def write_files(self, directory: Path) -> list[Path]:
        """``faults.csv`` (one row per fault), ``fault_rates.csv`` (every group), ``fault_vulnerability.csv``
        (layers and bits ranked), ``campaign.json`` and the two PNG figures (none for bit-error-rate campaigns)."""
        rates = [self.rates["overall"], *self.rates["layer"], *self.rates["bit"], *self.rates["field"],
                 *self.rates["layer_bit"], *self.rates["layer_field"]]
        paths = [self.to_csv(directory / "faults.csv"), write_csv(directory / "fault_rates.csv", rates, RATE_COLUMNS),
                 write_csv(directory / "fault_vulnerability.csv", self.vulnerability_ranking(), RANKING_COLUMNS),
                 self.to_json(directory / "campaign.json")]
        for name, figure in (("fault_heatmap.png", heatmap_figure(self)), ("fault_layers.png", layer_figure(self))):
            if figure is not None:
                paths.append(save_figure(figure, directory / name))
        return paths

    def plot(self):
        """A matplotlib figure: the layer × bit heatmap of critical-fault (SDC-1) rates and the per-layer rates
        with their 95 % intervals."""
        return campaign_figure(self)

    def caption(self) -> str:
        """One line saying what ran: faults, where, images, what counts as critical."""
        s = self.settings
        return (f"{len(self.faults)} {s['fault_model']} faults in {s['target']} · {self.golden['images']} images · "
                f"critical = SDC-1 rate > {self.threshold:g}")

    def table_rows(self) -> list[list[str]]:
        rows = [self.rates["overall"], *self.rates["layer"]]
        return [[r["layer"] or "overall", str(r["faults"]), _percent(r, "critical"), _percent(r, "critical_correct"),
                 _percent(r, "sdc5"), _percent(r, "nonfinite"), _percent(r, "sdc1_per_image")] for r in rows]

    TABLE_HEADER = ("layer", "faults", "critical % (all images)", "critical % (correct images)", "SDC-5 %",
                    "non-finite %", "SDC-1 % per image")

    def preview_tables(self) -> list[tuple[str, Sequence[str], list[list[Any]]]]:
        return [(repr(self).splitlines()[0], self.TABLE_HEADER, self.table_rows())]

    preview_rows = None  # the overall row and one per layer

    def __repr__(self) -> str:
        rows = [list(self.TABLE_HEADER), *self.table_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"Campaign({len(self.faults)} faults, {self.settings['fault_model']} in {self.settings['target']}, "
                 f"{self.golden['images']} images, critical = SDC-1 rate > {self.threshold:g})"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        return "\n".join(lines)

    def print_table(self) -> None:
        """The overall and per-layer rates as a rich table, then the most vulnerable bits."""
        table = Table(title=f"fault campaign · {self.caption()}", title_justify="left")
        for position, header in enumerate(self.TABLE_HEADER):
            table.add_column(header, justify="left" if position == 0 else "right", overflow="fold")
        for row in self.table_rows():
            table.add_row(*row)
        console.print(table)
        bits = [r for r in self.vulnerability_ranking() if r["kind"] == "bit"][:8]
        if bits:
            console.print("most vulnerable bits: " + ", ".join(
                f"bit {r['name']} {100 * r['critical']:.1f} % [{100 * r['critical_low']:.1f}, "
                f"{100 * r['critical_high']:.1f}]" for r in bits))

    def log_tensorboard(self, writer: Any, step: int = 0, prefix: str = "faults") -> list[str]:
        """``{prefix}/heatmap`` and ``{prefix}/layers`` (figures), ``{prefix}/critical`` and per-image SDC-1
        (scalars)."""
        tags = []
        for name, figure in (("heatmap", heatmap_figure(self)), ("layers", layer_figure(self))):
            if figure is not None:
                writer.add_figure(f"{prefix}/{name}", figure, global_step=step, close=True)
                tags.append(f"{prefix}/{name}")
        overall = self.rates["overall"]
        for name in ("critical", "critical_correct", "sdc1_per_image"):
            value = overall[name]
            if isinstance(value, float) and math.isfinite(value):
                writer.add_scalar(f"{prefix}/{name}", value, global_step=step)
                tags.append(f"{prefix}/{name}")
        writer.flush()
        return tags

    def closing_lines(self, paths: Sequence[Path]) -> list[str]:
        return [f"faults: {len(self.faults)} faults on {self.golden['images']} images in "
                f"{self.info['elapsed_s']:.1f} s on {self.info['devices']} device(s) → {paths[0]}, {paths[3]}"]


def _or_zero(value: float) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _percent(row: dict[str, Any], metric: str) -> str:
    rate, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
    if math.isnan(low):
        return "–"
    # a row with unsampled strata has no point estimate, only the span its interval allows
    shown = "–" if math.isnan(rate) else f"{100 * rate:.2f}"
    return f"{shown} [{100 * low:.2f}, {100 * high:.2f}]"


__all__ = ["Campaign", "FAULT_COLUMNS", "FAULT_METRICS", "IMAGE_METRICS", "RANKING_COLUMNS", "RATE_COLUMNS"]
