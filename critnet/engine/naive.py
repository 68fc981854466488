"""The reference method: perturb a unit, run the whole model over every batch, restore."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from critnet.engine.data import EvaluationSet
from critnet.engine.tallying import TallyPair, tally_variants
from critnet.perturb import Perturbation, Unit, perturbed
from critnet.tally import UnitOutcome


def full_pass(model: nn.Module, data: EvaluationSet) -> TallyPair:
    """Tallies of one forward pass of ``model`` over the whole evaluation set."""
    pair = TallyPair()
    for (x, y), offset in zip(data, data.offsets()):
        pair.add(tally_variants(model(x), y, offset)[0])
    return pair


def run_naive(
    model: nn.Module,
    work: Sequence[tuple[int, Unit]],
    perturbation: Perturbation,
    data: EvaluationSet,
    record: Callable[[int, UnitOutcome], None],
) -> None:
    """Evaluate each ``(index, unit)`` of ``work`` with a full forward pass per batch; ``record`` gets each outcome."""
    for index, unit in work:
        with perturbed(model, unit, perturbation):
            pair = full_pass(model, data)
        record(index, UnitOutcome(unit=unit, total=pair.total, halves=pair.halves))
