"""Ordering unit outcomes by criticality, and how far the order can be trusted (Lightning-free).

The engine (:mod:`critnet.engine`) produces one :class:`~critnet.scoring.UnitOutcome` per unit; this module turns
them into a ranking (one row per unit, most critical first), measures split-half agreement (the Spearman
correlation between the rankings computed on the two disjoint halves of the evaluation set) and, for the
approximate engine modes, the agreement between estimated and exact scores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from critnet.choices import LEVELLESS, SCORES, check_choice
from critnet.perturb import Perturbation
from critnet.scoring import (
    Z95,
    UnitOutcome,
    criticality_key,
    estimated_score,
    outcome_score,
    paired_error,
    ranking_key,
    reference_of,
    score_of,
)

RANKING_COLUMNS = (
    "rank",
    "unit",
    "kind",
    "layer",
    "index",
    "perturbation",
    "level",
    "score",
    "loss",
    "delta_loss",
    "top1",
    "top5",
    "top1_drop",
    "top5_drop",
    "delta_loss_se",
    "delta_loss_lo",
    "delta_loss_hi",
    "top1_drop_se",
    "top1_drop_lo",
    "top1_drop_hi",
    "samples",
    "exact",
    "estimate",
)


@dataclass(frozen=True)
class RankedOutcome:
    """One unit's place in a ranking."""

    rank: int  # 1 = most critical
    outcome: UnitOutcome
    score: float


def order_outcomes(outcomes: Sequence[UnitOutcome], baseline: UnitOutcome, score: str = "loss") -> list[RankedOutcome]:
    """The outcomes, most critical first.

    Larger scores are more critical (descending, as the original experiment sorted losses); a NaN or infinite loss
    ranks first; ties keep the order of ``outcomes`` (model order), so the ranking is deterministic. Outcomes that
    are not exact full-set evaluations (approximate engine modes) come after every exact one, ordered by their
    partial evaluation, or by their estimate when they were not evaluated at all.
    """
    check_choice("score", score, SCORES)
    for outcome in outcomes:
        if outcome.exact and outcome.total.samples != baseline.total.samples:
            raise ValueError(
                f"unit {outcome.unit.label if outcome.unit else '?'} was evaluated on {outcome.total.samples} samples, "
                f"the baseline on {baseline.total.samples}"
            )

    def key(i: int):
        outcome = outcomes[i]
        if outcome.total.samples == 0:
            return (not outcome.exact, (1, criticality_key(estimated_score(outcome, baseline, score))))
        return (not outcome.exact, ranking_key(outcome.total, reference_of(outcome, baseline), score))

    return [
        RankedOutcome(rank=position + 1, outcome=outcomes[i], score=outcome_score(outcomes[i], baseline, score))
        for position, i in enumerate(sorted(range(len(outcomes)), key=key))
    ]


def ranking_rows(
    ranked: Sequence[RankedOutcome], baseline: UnitOutcome, perturbation: Perturbation
) -> list[dict[str, Any]]:
    """One long-form row per unit (Distiller's sensitivity CSV shape), columns :data:`RANKING_COLUMNS`.

    ``delta_loss_se`` and ``top1_drop_se`` are the standard errors of Δloss and of the top-1 drop from the
    per-image paired differences (:func:`~critnet.scoring.paired_error`), ``_lo``/``_hi`` the 95 % normal
    intervals; NaN where the unit has no paired per-image results (estimates).
    """
    rows = []
    for item in ranked:
        tally, unit = item.outcome.total, item.outcome.unit
        base = reference_of(item.outcome, baseline)
        errors = {}
        for name in ("delta_loss", "top1_drop"):
            se = paired_error(tally, base, name)
            value = score_of(tally, base, name) if tally.samples else math.nan
            errors.update({f"{name}_se": se, f"{name}_lo": value - Z95 * se, f"{name}_hi": value + Z95 * se})
        rows.append(
            {
                "rank": item.rank,
                "unit": unit.label,
                "kind": unit.kind,
                "layer": unit.layer,
                "index": "" if unit.index is None else unit.index,
                "perturbation": perturbation.kind,
                "level": "" if perturbation.kind in LEVELLESS else perturbation.level,
                "score": item.score,
                "loss": tally.loss,
                "delta_loss": tally.loss - base.loss,
                "top1": tally.top1,
                "top5": tally.top5,
                "top1_drop": base.top1 - tally.top1,
                "top5_drop": base.top5 - tally.top5,
                **errors,
                "samples": tally.samples,
                "exact": item.outcome.exact,
                "estimate": "" if item.outcome.estimate is None else item.outcome.estimate,
            }
        )
    return rows


#: The interval columns of each score (``loss`` ranks by the same paired differences as ``delta_loss``).
INTERVAL_OF_SCORE = {"loss": "delta_loss", "delta_loss": "delta_loss", "top1_drop": "top1_drop"}


def boundary_overlap(rows: Sequence[dict[str, Any]], score: str, top_k: int) -> dict[str, Any] | None:
    """How settled the top-``top_k`` boundary is: the 95 % interval of the ``top_k``-th unit and how many other
    units' intervals overlap it (ranked above it, and below it: those could enter the top k on other images).

    Only exact rows with an interval take part; None for ``top5_drop`` (no interval columns) or when the ``top_k``-th
    row has no interval.

    >>> rows = [{"unit": f"conv.weight[{i}]", "exact": True, "delta_loss_lo": lo, "delta_loss_hi": lo + 1.0}
    ...         for i, lo in enumerate((5.0, 3.5, 3.0, 0.0))]
    >>> boundary_overlap(rows, "delta_loss", 2)["overlapping"]
    {'above': 0, 'below': 1}
    """
    name = INTERVAL_OF_SCORE.get(score)
    rows = [r for r in rows if r["exact"] and math.isfinite(r.get(f"{name}_lo", math.nan))] if name else []
    if len(rows) < top_k:
        return None
    edge = rows[top_k - 1]
    low, high = edge[f"{name}_lo"], edge[f"{name}_hi"]

    def overlaps(row: dict[str, Any]) -> bool:
        return row[f"{name}_lo"] <= high and row[f"{name}_hi"] >= low

    return {
        "k": top_k,
        "unit": edge["unit"],
        "interval": [low, high],
        "overlapping": {"above": sum(map(overlaps, rows[: top_k - 1])), "below": sum(map(overlaps, rows[top_k:]))},
    }


def _criticality_positions(keys: Sequence[Any]) -> list[float]:
    """Ranks (1 = most critical) with ties averaged, for keys where smaller = more critical."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    positions = [0.0] * len(keys)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and keys[order[stop + 1]] == keys[order[start]]:
            stop += 1
        for j in range(start, stop + 1):
            positions[order[j]] = (start + stop) / 2 + 1
        start = stop + 1
    return positions


def _correlations(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Spearman and Kendall (tau-b) correlation; NaN when undefined (fewer than 2 units or a constant ranking)."""
    from scipy.stats import kendalltau, spearmanr

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic), float(kendalltau(a, b).statistic)


def split_half_agreement(
    outcomes: Sequence[UnitOutcome], baseline: UnitOutcome, score: str = "loss", top_k: int = 20
) -> dict[str, Any]:
    """How well the rankings from the two disjoint halves of the evaluation set agree.

    Each unit is ranked on each of the two halves the engine tallies (the even- and the odd-indexed samples of the
    evaluation set, so that class-sorted data gives class-balanced halves), with the same score and criticality
    order as the full ranking (ties averaged); the Spearman and Kendall correlations of the two rankings and the overlap of their
    top ``top_k`` sets say whether the evaluation set is large enough for the ranking to be trusted. Only units
    evaluated exactly on both halves take part.
    """
    check_choice("score", score, SCORES)
    used = [o for o in outcomes if o.exact and o.halves[0].samples > 0 and o.halves[1].samples > 0]
    result: dict[str, Any] = {
        "units": len(used),
        "half_samples": [baseline.halves[0].samples, baseline.halves[1].samples],
        "spearman": math.nan,
        "kendall": math.nan,
        "top_k": min(top_k, len(used)),
        "top_k_overlap": math.nan,
    }
    if len(used) < 2 or baseline.halves[0].samples == 0 or baseline.halves[1].samples == 0:
        return result
    keys = [[ranking_key(o.halves[h], baseline.halves[h], score) for o in used] for h in (0, 1)]
    first, second = (_criticality_positions(k) for k in keys)
    result["spearman"], result["kendall"] = _correlations(first, second)
    k = result["top_k"]
    tops = [set(sorted(range(len(used)), key=lambda i: (keys[h][i], i))[:k]) for h in (0, 1)]
    result["top_k_overlap"] = len(tops[0] & tops[1]) / k if k else math.nan
    return result


def estimate_agreement(
    outcomes: Sequence[UnitOutcome], baseline: UnitOutcome, score: str = "loss", top_k: int | None = None
) -> dict[str, Any]:
    """Agreement between the engine's estimated Δloss and the exact Δloss, over the units that have both
    (``hybrid`` evaluates the estimated top units exactly).

    With ``top_k``, ``deepest_top_k`` is the lowest position (1 = most critical) in the estimate order of any unit
    in the exact top ``top_k`` by ``score``: top units found near the end of the checked list mean the estimates
    order poorly and unchecked units may belong in the top.
    """
    pairs = [
        (o.estimate, o.total.loss - baseline.total.loss)
        for o in outcomes
        if o.exact and o.estimate is not None and math.isfinite(o.estimate) and math.isfinite(o.total.loss)
    ]
    estimated, exact = [p[0] for p in pairs], [p[1] for p in pairs]
    spearman, kendall = _correlations(estimated, exact)
    result = {
        "units": len(pairs),
        "spearman": spearman,
        "kendall": kendall,
        "max_abs_error": max((abs(e - x) for e, x in pairs), default=math.nan),
    }
    if top_k is not None:
        with_estimate = [i for i, o in enumerate(outcomes) if o.estimate is not None]
        by_estimate = sorted(with_estimate, key=lambda i: (criticality_key(outcomes[i].estimate), i))
        position = {i: p + 1 for p, i in enumerate(by_estimate)}
        checked = [i for i in with_estimate if outcomes[i].exact]
        top = sorted(checked, key=lambda i: (ranking_key(outcomes[i].total, baseline.total, score), i))[:top_k]
        result["deepest_top_k"] = max((position[i] for i in top), default=0)
    return result
