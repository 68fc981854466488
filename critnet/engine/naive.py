"""The reference method: perturb a unit, run the whole model over every batch, restore."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from critnet.evaluation import tally_pass
from critnet.evaluation_set import EvaluationSet
from critnet.outputs import OutputSelector
from critnet.perturb import Perturbation, Unit, perturbed
from critnet.scoring import UnitOutcome


def run_naive(
    model: nn.Module,
    work: Sequence[tuple[int, Unit]],
    perturbation: Perturbation,
    data: EvaluationSet,
    record: Callable[[int, UnitOutcome], None],
    reference: tuple[Tensor, Tensor, Tensor] | None = None,
    output: OutputSelector = None,
) -> None:
    """Evaluate each ``(index, unit)`` of ``work`` with a full forward pass per batch; ``record`` gets each outcome
    (with the paired sums when ``reference`` holds the unperturbed per-sample results). ``output`` says where the
    logits are in what the model returns (:func:`critnet.outputs.logits_of`)."""
    for index, unit in work:
        with perturbed(model, unit, perturbation):
            pair = tally_pass(model, data, reference=reference, output=output)
        record(index, UnitOutcome(unit=unit, total=pair.total, halves=pair.halves))
