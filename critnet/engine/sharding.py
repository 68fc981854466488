"""Sharing units among ranks, balanced by their cost, and gathering the outcomes back in unit order."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

from critnet.engine.resume import outcome_from_record, outcome_to_record
from critnet.perturb import Unit
from critnet.scoring import UnitOutcome


def assign(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Positions of ``costs`` per rank: longest job first onto the least-loaded rank (deterministic ties).

    Each rank's positions come back sorted, so every rank evaluates its units in model order.
    """
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [(0.0, r) for r in range(world_size)]
    heapq.heapify(loads)
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        load, r = heapq.heappop(loads)
        shards[r].append(position)
        heapq.heappush(loads, (load + costs[position], r))
    return [sorted(s) for s in shards]


def gather_outcomes(
    local: dict[int, UnitOutcome],
    units: Sequence[Unit],
    world_size: int,
    all_gather: Callable[[Any], list[Any]] | None,
    phase: str,
    encode: Callable = outcome_to_record,
    decode: Callable = outcome_from_record,
) -> dict[int, Any]:
    """Every rank's outcomes, on every rank (plain records travel, so any object gather works)."""
    if world_size == 1:
        return dict(local)
    records = [encode(phase, i, o) for i, o in sorted(local.items())]
    merged: dict[int, Any] = {}
    for part in all_gather(records):
        for record in part:
            merged[int(record["index"])] = decode(record, units[int(record["index"])])
    return merged
