"""First-order (Taylor) estimates of every unit's Δloss from one forward and backward pass per batch.

For a unit with values ``v`` perturbed to ``v'`` the estimate is ``Σ (v' − v) · ∂L/∂v`` with ``L`` the mean
cross-entropy over the evaluation set: for ``add δ`` that is ``δ · Σ ∂L/∂v``, for ``zero`` it is ``−Σ v · ∂L/∂v``.
Activation units use the same formula on the module's output channel, summed over samples and positions. The
perturbed values come from the perturbation itself (``Perturbation.apply``), so every kind is covered; the
estimates are labelled ``exact=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from critnet.engine.data import EvaluationSet
from critnet.perturb import Perturbation, Unit, resolve_module, resolve_parameter
from critnet.tally import Tally, UnitOutcome


def taylor_estimates(
    model: nn.Module, units: Sequence[Unit], perturbation: Perturbation, data: EvaluationSet
) -> list[float]:
    """The estimated Δloss of every unit (mean loss over the evaluation set), in the order of ``units``.

    Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` attribute and no ``requires_grad`` flag of the
    model is left changed.
    """
    param_units = [u for u in units if u.kind != "activation"]
    act_units = [u for u in units if u.kind == "activation"]
    names = sorted({u.name for u in param_units})
    params = {name: resolve_parameter(model, Unit("tensor", name)) for name in names}
    layers = sorted({u.name for u in act_units})
    modules = {name: resolve_module(model, Unit("activation", name, 0)) for name in layers}

    grads = {name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for name, p in params.items()}
    act_sums = {u: torch.zeros((), dtype=torch.float64) for u in act_units}
    by_layer: dict[str, list[Unit]] = {}
    for u in act_units:
        by_layer.setdefault(u.name, []).append(u)

    outputs: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(_module, _inputs, output):
            outputs[name] = output

        return hook

    flags = {name: p.requires_grad for name, p in params.items()}
    handles = [modules[name].register_forward_hook(recorder(name)) for name in layers]
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for x, y in data:
                outputs.clear()
                if act_units:
                    x = x.detach().requires_grad_(True)  # so that every activation is part of the graph
                loss = F.cross_entropy(model(x), y, reduction="sum")
                acts = [outputs[name] for name in layers]
                wrt = list(params.values()) + acts
                gradients = torch.autograd.grad(loss, wrt, allow_unused=True)
                for name, g in zip(params, gradients[: len(params)]):
                    if g is not None:
                        grads[name] += g.double()
                for name, act, g in zip(layers, acts, gradients[len(params) :]):
                    if g is None:
                        continue
                    act = act.detach()
                    for unit in by_layer[name]:
                        values = act[:, unit.index]
                        delta = perturbation.apply(values, unit).double() - values.double()
                        act_sums[unit] += (delta * g[:, unit.index].double()).sum().cpu()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.requires_grad_(flags[name])

    samples = data.samples
    estimates = []
    with torch.no_grad():
        for unit in units:
            if unit.kind == "activation":
                estimates.append(act_sums[unit].item() / samples)
                continue
            values = params[unit.name].detach()
            grad = grads[unit.name]
            if unit.index is not None:
                values, grad = values[unit.index], grad[unit.index]
            delta = perturbation.apply(values.clone(), unit).double() - values.double()
            estimates.append((delta * grad).sum().item() / samples)
    return estimates


def estimate_outcome(unit: Unit, estimate: float) -> UnitOutcome:
    """An outcome holding only an estimate: no sample was evaluated with the unit perturbed."""
    return UnitOutcome(unit=unit, total=Tally(), halves=(Tally(), Tally()), exact=False, estimate=estimate)
