"""Taylor estimates of every unit's Δloss from one forward and backward pass per batch.

For a unit with values ``v`` perturbed to ``v'`` the first-order estimate is ``Σ (v' − v) · ∂L/∂v`` with ``L`` the
mean cross-entropy over the evaluation set: for ``add δ`` that is ``δ · Σ ∂L/∂v``, for ``zero`` it is
``−Σ v · ∂L/∂v``. Activation units use the same formula on the module's output channel, summed over samples and
positions. The perturbed values come from the perturbation itself (``Perturbation.apply``), so every kind is
covered; the estimates are labelled ``exact=False``.

The second order adds ``½ Δvᵀ F Δv`` with ``F`` the empirical Fisher standing in for the Hessian:
``(1/N) Σᵢ ½ dᵢ²`` with ``dᵢ = Δv · ∂ℓᵢ/∂v`` the per-sample directional derivative. This is the Fisher along the
perturbation itself, so the unit's off-diagonal terms are included, and it needs no per-weight per-sample
gradients (the usual diagonal approximation would need them and drop those terms). It matters where the first-order term cancels: at a trained minimum the
gradient summed over a whole weight tensor is close to zero, so ``add δ`` on tensors has almost no first-order
signal. ``dᵢ`` comes from the owning module's output gradient and the change of its output along ``Δv`` (a
Jacobian-vector product of that module alone; one small convolution per layer for conv/linear channel units).

Head units are their column block of the attention's output-projection weight; their ``dᵢ`` are read at the
attention module's call. So are those of a parameter inside an attention module whose own module is not called
once per image (:func:`_owners`): ``nn.MultiheadAttention`` and Swin read their projections' weights
functionally and never call those modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from critnet.choices import TAYLOR_ORDERS, SettingError, check_choice
from critnet.engine.suffix import budget_bytes
from critnet.evaluation_set import EvaluationSet
from critnet.outputs import OutputSelector, logits_of
from critnet.perturb import Perturbation, Unit, activation_channel_dim, attention_heads, head_parameter_name, resolve_module, resolve_parameter, unit_values
from critnet.scoring import Tally, UnitOutcome

# A backward pass holds more than the values it saves (allocator rounding, convolution workspaces, the gradients of
# the module outputs the hooks record): each image's estimate is counted this many times.
TRAIN_MARGIN = 1.5
# The per-image derivatives (order 2, and the per-sample estimates) also hold each watched module's output change
# along the perturbation, about as large again as the pass's activations: counted as twice the pass.
DERIVATIVE_MARGIN = 2.0
# Kinds whose change of a value depends on that value alone, not on the unit it belongs to: a parameter's change is
# recomputed from the parameter at every pass instead of being held. The others (noise drawn per unit, pruning
# ranked within a unit) hold their perturbed values for the whole pass, counted against the budget.
_ELEMENTWISE = frozenset({"add", "scale", "zero", "sign_flip", "bitflip"})
# The most values of a parameter multiplied with its gradient in float64 at once: bounds what the per-unit sums add
# to a backward pass (_UnitSums.transient_bytes).
_CHUNK = 1 << 18


def taylor_estimates(
    model: nn.Module, units: Sequence[Unit], perturbation: Perturbation, data: EvaluationSet, order: int = 1,
    output: OutputSelector = None, memory_budget_mb: float | None = None,
) -> list[float]:
    """The estimated Δloss of every unit (mean loss over the evaluation set), in the order of ``units``.

    Args:
        order: 1 (first order) or 2 (first order plus the empirical-Fisher second-order term).
        output: where the logits are in what the model returns (:func:`critnet.outputs.logits_of`).
        memory_budget_mb: the most memory the pass may take beyond one plain forward (default
            ``DEFAULT_MEMORY_BUDGET_MB``): what the first-order terms hold (:class:`_UnitSums`) counts against it,
            and each batch runs in parts of as many images as the rest holds (:func:`micro_batches`).

    Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` attribute and no ``requires_grad`` flag of the
    model is left changed. Each parameter's gradient is reduced to its units' terms as soon as the backward pass
    has it and then dropped, so no pass holds the gradients of every parameter at once.
    """
    check_choice("taylor_order", order, TAYLOR_ORDERS)
    param_units = [u for u in units if u.kind != "activation"]
    act_units = [u for u in units if u.kind == "activation"]
    # a head lives in its attention's output-projection weight
    name_of = {u: head_parameter_name(model, u) if u.kind == "head" else u.name for u in param_units}
    params = {name_of[u]: resolve_parameter(model, u) for u in param_units}
    layers = _layers(model, act_units)

    # the units of a parameter that share a layout (rows, the whole tensor, heads' column blocks) are summed together
    layouts: dict[tuple[str, str], list[Unit]] = {}
    for u in dict.fromkeys(param_units):
        layout = "head" if u.kind == "head" else "whole" if u.index is None else "rows"
        layouts.setdefault((name_of[u], layout), []).append(u)
    sums = {key: _UnitSums(model, params[key[0]], group, perturbation) for key, group in layouts.items()}
    act_sums = {u: torch.zeros((), dtype=torch.float64) for u in act_units}

    # order 2: per-sample directional derivatives need each parameter owner's inputs and output gradients
    named_modules = dict(model.named_modules())
    owners = _owners(named_modules, param_units) if order == 2 else {}
    calls: dict[str, list[_Call]] = {}
    fisher = {u: torch.zeros((), dtype=torch.float64) for u in units}
    flags = {name: p.requires_grad for name, p in params.items()}
    handles = [named_modules[name].register_forward_hook(_call_recorder(name, calls), with_kwargs=True)
               for name in _watched(owners) | set(layers)]
    try:
        for p in params.values():
            p.requires_grad_(True)
        for name, p in params.items():
            handles.append(p.register_hook(_reduce_and_drop([s for key, s in sums.items() if key[0] == name])))
        # and the gradient of the largest parameter, which the backward pass holds until its hook has taken it
        fixed = (sum(s.held_bytes for s in sums.values()) + max((s.transient_bytes for s in sums.values()), default=0)
                 + max((p.numel() * p.element_size() for p in params.values()), default=0))
        with torch.enable_grad():
            for x, y, _ in micro_batches(model, data, memory_budget_mb, fixed, output, "taylor",
                                         DERIVATIVE_MARGIN if order == 2 else 1.0):
                calls.clear()
                if act_units:
                    x = x.detach().requires_grad_(True)  # so that every activation is part of the graph
                loss = F.cross_entropy(logits_of(model(x), output), y, reduction="sum")
                recorded = [(name, call) for name in calls for call in calls[name]]
                gradients = torch.autograd.grad(loss, list(params.values()) + [call.output for _, call in recorded],
                                                allow_unused=True)
                call_grads = gradients[len(params):]  # the parameters' own are zeros: their hooks took them
                for unit, d in _activation_terms(named_modules, layers, perturbation, recorded, call_grads).items():
                    act_sums[unit] += d.sum().cpu()
                    if order == 2:
                        fisher[unit] += 0.5 * d.square().sum().cpu()
                derivatives = _unit_derivatives(named_modules, owners, perturbation, recorded, call_grads, len(y))
                for unit, d in derivatives.items():
                    fisher[unit] += 0.5 * d.square().sum().cpu()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.requires_grad_(flags[name])

    samples = data.samples
    first = {u: value for s in sums.values() for u, value in zip(s.units, s.sums.tolist())}
    estimates = []
    for unit in units:
        second = fisher[unit].item() / samples if order == 2 else 0.0
        if unit.kind == "activation":
            estimates.append(act_sums[unit].item() / samples + second)
        else:
            estimates.append(first[unit] / samples + second)
    return estimates


class _UnitSums:
    """The first-order terms ``Σ ⟨Δv, ∂L/∂v⟩`` of some units of one parameter that share a layout (channel units:
    rows; a tensor unit: all of it; head units: column blocks), added up pass by pass in float64.

    One number per unit is held where the sum of the gradient over the passes would take eight bytes per weight: the
    estimate is linear in the gradient, so summing the terms of every pass is summing the gradient first. ``Δv``
    is recomputed from the parameter at every pass for the perturbations in ``_ELEMENTWISE``; for the others the
    perturbed values of the units are held (``held_bytes``)."""

    def __init__(self, model: nn.Module, param: torch.Tensor, units: list[Unit], perturbation: Perturbation) -> None:
        self.param, self.units, self.perturbation = param, units, perturbation
        values = param.detach()
        self.sums = torch.zeros(len(units), dtype=torch.float64, device=values.device)
        self.rows: torch.Tensor | None = None
        self.columns: list[slice] | None = None
        if units[0].kind == "head":
            width = attention_heads(model.get_submodule(units[0].name))[2]
            self.columns = [slice(u.index * width, (u.index + 1) * width) for u in units]
        elif units[0].index is not None:
            self.rows = torch.tensor([u.index for u in units], device=values.device)
        self.perturbed: torch.Tensor | None = None
        if perturbation.kind in _ELEMENTWISE:  # a perturbation the values cannot take fails here, not mid-pass
            perturbation.apply(_matrix(values)[:1].clone(), units[0])
        else:
            with torch.no_grad():
                changed = values.clone()
                for u in units:
                    unit_values(model, u, changed).copy_(perturbation.apply(unit_values(model, u, values).clone(), u))
                changed = _matrix(changed)
                self.perturbed = changed if self.rows is None else changed.index_select(0, self.rows)

    @property
    def held_bytes(self) -> int:
        return 0 if self.perturbed is None else self.perturbed.numel() * self.perturbed.element_size()

    @property
    def transient_bytes(self) -> int:
        """What :meth:`add` holds at once: a chunk's values, changed values, gradient and terms in float64, and the
        float32 rows they come from."""
        rows, columns = _matrix(self.param.detach()).shape
        return min(self._step(columns), rows if self.rows is None else len(self.rows)) * columns * (4 * 8 + 3 * 4)

    @staticmethod
    def _step(columns: int) -> int:
        return max(1, _CHUNK // max(1, columns))

    def add(self, grad: torch.Tensor) -> None:
        """Add the terms of one pass's gradient of the parameter."""
        values, grad = _matrix(self.param.detach()), _matrix(grad)
        step = self._step(values.shape[1])
        count = len(values) if self.rows is None else len(self.rows)
        for start in range(0, count, step):
            part = slice(start, start + step)
            if self.rows is None:
                v, g = values[part], grad[part]
            else:
                v, g = values.index_select(0, self.rows[part]), grad.index_select(0, self.rows[part])
            changed = self.perturbation.apply(v.clone(), self.units[0]) if self.perturbed is None \
                else self.perturbed[part]
            terms = (changed.double() - v.double()).mul_(g.double())
            if self.columns is not None:
                for k, columns in enumerate(self.columns):
                    self.sums[k] += terms[:, columns].sum()
            elif self.rows is not None:
                self.sums[part] += terms.sum(1)
            else:
                self.sums += terms.sum()


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` as rows (its first dimension) of its other values."""
    return t.reshape(len(t), -1) if t.dim() else t.reshape(1, 1)


def _reduce_and_drop(sums: list[_UnitSums]):
    """A gradient hook of a parameter: adds the gradient's terms to ``sums`` and hands autograd a zero that holds
    no memory in its place, so the gradient is freed before the backward pass goes on (``autograd.grad`` would
    otherwise keep the gradients of every parameter until it returns)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for s in sums:
                s.add(grad)
        return grad.new_zeros(()).expand(grad.shape)

    return hook


def per_sample_estimates(model: nn.Module, units: Sequence[Unit], perturbation: Perturbation, data: EvaluationSet,
                         sums: bool = False, keep: torch.Tensor | None = None, output: OutputSelector = None,
                         memory_budget_mb: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each image's first-order Taylor estimate of its own loss change, for every unit: ``dᵢ = ⟨Δyᵢ, ∂ℓᵢ/∂yᵢ⟩``
    with ``y`` the output of the unit's module (its activation for activation units) and ``Δy`` the change the
    perturbation makes to it (one forward and backward pass per batch).

    Args:
        sums: return the per-unit sums over the images instead of the ``(units, images)`` matrix (what a
            full-set mean needs, in memory proportional to the units alone).
        keep: with ``sums``, a boolean mask over the set's images whose per-image values to return as well (what
            halving's stages need, from the same pass that gives the full-set means).
        output: where the logits are in what the model returns (:func:`critnet.outputs.logits_of`).
        memory_budget_mb: as for :func:`taylor_estimates`: batches run in parts whose backward pass fits it.

    Returns:
        float64 on the CPU: ``(units, images)`` or, with ``sums``, ``(units,)``; with ``keep`` the pair of the sums
        and the ``(units, kept images)`` matrix, the images in set order.

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    >>> data = EvaluationSet.from_batches([(torch.randn(5, 4), torch.arange(5) % 3)])
    >>> per_sample_estimates(model, [Unit("channel", "1.weight", 0)], Perturbation("zero"), data).shape
    torch.Size([1, 5])
    """
    param_units = [u for u in units if u.kind != "activation"]
    act_units = [u for u in units if u.kind == "activation"]
    named_modules = dict(model.named_modules())
    for u in param_units:
        resolve_parameter(model, u)
    owners = _owners(named_modules, param_units)
    layers = _layers(model, act_units)
    if keep is not None and not sums:
        raise ValueError("keep: only with sums=True (without it every image's values are returned)")
    calls: dict[str, list[_Call]] = {}
    handles = [named_modules[name].register_forward_hook(_call_recorder(name, calls), with_kwargs=True)
               for name in _watched(owners) | set(layers)]
    parts: dict[Unit, list[torch.Tensor]] = {u: [] for u in units}
    kept: dict[Unit, list[torch.Tensor]] = {u: [] for u in units}
    try:
        with torch.enable_grad():
            # the per-image values returned take from the budget as well
            held = len(units) * 8 * (data.samples if not sums else int(keep.sum()) if keep is not None else 0)
            for x, y, offset in micro_batches(model, data, memory_budget_mb, held, output, "taylor",
                                              DERIVATIVE_MARGIN):
                calls.clear()
                x = x.detach().requires_grad_(True)  # every module output becomes part of the graph
                # the gradient of image i's own loss
                loss = F.cross_entropy(logits_of(model(x), output), y, reduction="sum")
                recorded = [(name, call) for name in calls for call in calls[name]]
                grads = torch.autograd.grad(loss, [call.output for _, call in recorded], allow_unused=True)
                batch = _unit_derivatives(named_modules, owners, perturbation, recorded, grads, len(y))
                batch.update(_activation_terms(named_modules, layers, perturbation, recorded, grads))
                for unit in units:
                    d = batch.get(unit, torch.zeros(len(y), dtype=torch.float64)).detach().cpu()
                    parts[unit].append(d.sum(0, keepdim=True) if sums else d)
                    if keep is not None:
                        kept[unit].append(d[keep[offset : offset + len(d)]])
    finally:
        for handle in handles:
            handle.remove()
    result = torch.stack([torch.cat(parts[u]) for u in units])
    if not sums:
        return result
    if keep is None:
        return result.sum(1)
    return result.sum(1), torch.stack([torch.cat(kept[u]) for u in units])


def micro_batches(model: nn.Module, data: EvaluationSet, memory_budget_mb: float | None, fixed: float,
                  output: OutputSelector, what: str,
                  factor: float = 1.0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The batches of ``data`` as ``(inputs, targets, offset)``, each cut into parts of as many images as one
    forward and backward pass may take within the budget once ``fixed`` bytes are set aside: a backward pass
    holds every activation of its forward pass, many times what a plain forward holds at once.

    One image's pass is estimated from the outputs of the model's leaf modules on one image (what autograd saves,
    and as much again for the gradients flowing back), times ``TRAIN_MARGIN`` and ``factor``. Where even one image does not fit,
    one line says so and the parts are single images."""
    budget = budget_bytes(memory_budget_mb)
    first = next(iter(data))[0][:1]
    per_image = 2 * _leaf_output_bytes(model, first, output) * TRAIN_MARGIN * factor
    size = int(max(0.0, budget - fixed) // per_image) if per_image > 0 else max(data.batch_sizes)
    if size < 1:
        warnings.warn(f"memory_budget_mb={memory_budget_mb}: the {what} pass needs about "
                      f"{(fixed + per_image) / 2**20:.0f} MB beyond a plain forward even one image at a time "
                      f"({fixed / 2**20:.0f} MB held beside it); its peak will exceed the budget", stacklevel=3)
        size = 1
    for (x, y), offset in zip(data, data.offsets()):
        if size >= len(y):
            yield x, y, offset
            continue
        for start in range(0, len(y), size):
            yield x[start : start + size], y[start : start + size], offset + start


def _leaf_output_bytes(model: nn.Module, x: torch.Tensor, output: OutputSelector) -> float:
    """Bytes of the outputs of every leaf module of ``model`` in one ``no_grad`` forward pass on ``x``, per image.

    An output in the memory of the module's input (an in-place ``ReLU``, a ``Flatten``) takes none of its own and is
    not counted."""
    total = [0.0]

    def hook(module, args, out) -> None:
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(args)}
        total[0] += sum(t.numel() * t.element_size() for t in _tensors(out)
                        if t.untyped_storage().data_ptr() not in inputs)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not next(m.children(), None)]
    try:
        with torch.no_grad():
            logits_of(model(x), output)
    finally:
        for handle in handles:
            handle.remove()
    return total[0] / max(1, len(x))


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Call(NamedTuple):
    """One call of a module during the pass: its arguments and its (first) output tensor."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


def _call_recorder(name: str, calls: dict[str, list[_Call]]):
    def hook(module, args, kwargs, output):
        primary = _primary(output)
        if primary is None:
            raise SettingError(f"method: module {name!r} ({type(module).__name__}) returns no tensor; Taylor "
                               "estimates need its output")
        calls.setdefault(name, []).append(_Call(args, kwargs, primary))

    return hook


def _primary(output) -> torch.Tensor | None:
    """The output tensor of a module call: the output itself, or the first item of a tuple (attention modules
    return the attention weights beside it)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def _layers(model: nn.Module, units: Sequence[Unit]) -> dict[str, list[Unit]]:
    """Activation units by the module whose output they are a channel of (each checked to exist)."""
    layers: dict[str, list[Unit]] = {}
    for u in units:
        resolve_module(model, u)
        layers.setdefault(u.name, []).append(u)
    return layers


def _activation_terms(modules: dict[str, nn.Module], layers: dict[str, list[Unit]], perturbation: Perturbation,
                      recorded: list[tuple[str, _Call]], grads: Sequence[torch.Tensor | None]
                      ) -> dict[Unit, torch.Tensor]:
    """Every activation unit's per-sample ``dᵢ = ⟨Δaᵢ, ∂L/∂aᵢ⟩`` in one batch, summed over the calls of its module
    (a module called more than once, like torchvision's ResNet ReLU, is perturbed at every call)."""
    result: dict[Unit, torch.Tensor] = {}
    for (name, call), g in zip(recorded, grads):
        if g is None or name not in layers:
            continue
        act = call.output.detach()
        dim = activation_channel_dim(modules[name], act)
        for unit in layers[name]:
            values = act.select(dim, unit.index)
            delta = perturbation.apply(values, unit).double() - values.double()
            d = (delta * g.select(dim, unit.index).double()).reshape(len(delta), -1).sum(1)
            result[unit] = result[unit] + d if unit in result else d
    return result


class _Route(NamedTuple):
    """Where the per-image terms of one module's parameter units are read."""

    units: list[Unit]
    enclosing: str | None  # the nearest attention module around the owner: read there if the owner is not
    # called once per image (MHA's out_proj and Swin's qkv/proj are never called, Swin V2's cpb_mlp runs on a
    # table shared by all images)


def _owners(modules: dict[str, nn.Module], units: Sequence[Unit]) -> dict[str, _Route]:
    """Parameter units by the module whose call their change is read at: the parameter's owner, or for head units
    the attention module itself."""
    owners: dict[str, _Route] = {}
    for u in units:
        owner = u.name if u.kind == "head" else u.name.rpartition(".")[0]
        enclosing = None
        if u.kind != "head":
            parts = owner.split(".") if owner else []
            for k in range(len(parts) - 1, -1, -1):
                name = ".".join(parts[:k])
                if name in modules and attention_heads(modules[name]) is not None:
                    enclosing = name
                    break
        owners.setdefault(owner, _Route([], enclosing)).units.append(u)
    return owners


def _watched(owners: dict[str, _Route]) -> set[str]:
    """The modules whose calls a pass records for ``owners``."""
    return set(owners) | {route.enclosing for route in owners.values() if route.enclosing is not None}


def _unit_derivatives(modules: dict[str, nn.Module], owners: dict[str, _Route], perturbation: Perturbation,
                      recorded: list[tuple[str, _Call]], grads: Sequence[torch.Tensor | None],
                      samples: int) -> dict[Unit, torch.Tensor]:
    """Every parameter unit's per-sample ``dᵢ`` in one batch, summed over the calls of the module it is read at
    (units whose module took no part in the loss get none)."""
    by_name: dict[str, list[tuple[_Call, torch.Tensor | None]]] = {}
    for (name, call), g in zip(recorded, grads):
        by_name.setdefault(name, []).append((call, g))
    result: dict[Unit, torch.Tensor] = {}

    def per_image(module_name: str) -> bool:
        calls = by_name.get(module_name, [])
        return bool(calls) and all(c.output.dim() > 0 and _batch_major(modules[module_name], c.output).shape[0]
                                   == samples for c, _ in calls)

    for owner, route in owners.items():
        name = owner
        if not per_image(owner) and route.enclosing is not None and by_name.get(route.enclosing):
            name = route.enclosing
        # an attention called on windows of images (Hugging Face's Swin) is no better than its Linear layers
        if by_name.get(name) and not per_image(name):
            raise SettingError(f"method: module {name!r} is not called once per image (its output's first "
                               "dimension is not the batch); per-image Taylor terms of its units are not defined")
        for call, g in by_name.get(name, []):
            if g is None:
                continue
            for unit, d in _directional(modules[name], name, route.units, perturbation, call, g).items():
                result[unit] = result[unit] + d if unit in result else d
    return result


def _batch_major(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like the module's output) with the samples along dimension 0."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first and t.dim() == 3:
        return t.transpose(0, 1)
    return t


def _per_sample(module: nn.Module, change: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``⟨Δyᵢ, ∂L/∂yᵢ⟩`` for every sample i, in float64."""
    change, grad_out = _batch_major(module, change), _batch_major(module, grad_out)
    return (change.double() * grad_out.double()).reshape(len(grad_out), -1).sum(1)


def _directional(module: nn.Module, name: str, units: list[Unit], perturbation: Perturbation, call: _Call,
                 grad_out: torch.Tensor) -> dict[Unit, torch.Tensor]:
    """Per-sample ``dᵢ = ⟨Δyᵢ, ∂L/∂yᵢ⟩`` (float64, one value per sample) over one call of ``module`` for each of
    its units, with ``Δy`` the change of the module's output along the unit's perturbation (samples are
    independent in eval mode, so ``∂L/∂yᵢ`` is sample i's own gradient)."""
    result: dict[Unit, torch.Tensor] = {}
    inputs = tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in call.args)
    kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in call.kwargs.items()}
    g = grad_out.detach()
    # a unit read at an enclosing attention module's call (_owners): the path of its parameter below that module
    relative = {u: u.name[len(name) + 1:] if name else u.name for u in units if u.kind != "head"}
    found = attention_heads(module)
    projected = [u for u in units if u.kind == "head" or (found and relative[u].startswith(f"{found[0]}."))]
    if projected:
        result.update(_projection_directional(module, name, projected, perturbation,
                                              _Call(inputs, kwargs, call.output), g))
    by_param: dict[str, list[Unit]] = {}
    for unit in units:
        if unit not in projected:
            by_param.setdefault(relative[unit], []).append(unit)
    for attr, group in by_param.items():
        p = module.get_parameter(attr).detach()
        sliced = [u for u in group if u.index is not None]
        if sliced and attr == "weight" and _linear_in_weight(module):
            # Conv/linear output channel c changes only in channel c: all units of the layer in one small call.
            deltas = torch.stack([perturbation.apply(p[u.index].clone(), u) - p[u.index] for u in sliced])
            change = _weight_forward(module, inputs[0], deltas)  # the units along the channel dimension
            index = torch.tensor([u.index for u in sliced], device=g.device)
            dim = -1 if isinstance(module, nn.Linear) else 1  # a Linear's features are last: (batch, tokens, C)
            terms = change.double() * g.index_select(dim, index).double()
            d = terms.movedim(dim, -1).reshape(len(g), -1, len(sliced)).sum(1)
            for k, u in enumerate(sliced):
                result[u] = d[:, k]
            group = [u for u in group if u.index is None]
        for u in group:
            delta = torch.zeros_like(p)
            if u.index is None:
                delta = perturbation.apply(p.clone(), u) - p
            else:
                delta[u.index] = perturbation.apply(p[u.index].clone(), u) - p[u.index]
            if attr == "weight" and _linear_in_weight(module):  # the output is linear in the weight: no JVP needed
                result[u] = _per_sample(module, _weight_forward(module, inputs[0], delta), g)
                continue

            def output(q: torch.Tensor, name: str = attr) -> torch.Tensor:
                return _primary(torch.func.functional_call(module, {name: q}, inputs, kwargs))

            # the math kernel of scaled_dot_product_attention has forward-mode derivatives; the fused ones do not
            with sdpa_kernel(SDPBackend.MATH):
                _, change = torch.func.jvp(output, (p,), (delta,))
            result[u] = _per_sample(module, change, g)
    return result


def _projection_directional(module: nn.Module, name: str, units: list[Unit], perturbation: Perturbation,
                            call: _Call, g: torch.Tensor) -> dict[Unit, torch.Tensor]:
    """``dᵢ`` of the units in the output projection of the attention module ``name``: its heads and its weight and
    bias.

    The heads' concatenated outputs ``z`` come from calling the attention with an identity projection and no
    bias: its output is then ``z`` laid out as the module's output, wherever the module calls the projection
    (``nn.MultiheadAttention`` and Swin use its weight functionally, so no hook on the projection would fire).
    Head h changes the output by ``z[..., h] · ΔW[:, h]ᵀ`` position by position; the weight's and bias's own
    units are those of the projection called on ``z``."""
    child, _, width = attention_heads(module)
    projection = module.get_submodule(child)  # transformers 4.x: output.dense
    weight = projection.weight.detach()
    bias = None if projection.bias is None else projection.bias.detach()
    identity = {f"{child}.weight": torch.eye(projection.in_features, dtype=weight.dtype, device=weight.device)}
    if bias is not None:
        identity[f"{child}.bias"] = torch.zeros(projection.in_features, dtype=weight.dtype, device=weight.device)
    output = call.output.detach()
    result: dict[Unit, torch.Tensor] = {}
    with torch.no_grad():
        z = _primary(torch.func.functional_call(module, identity, call.args, call.kwargs))
        # The identity call only gives z if the projection is the module's last step (up to moving positions):
        # the real projection of z must be the module's output. Where that output is zero (a zero-initialised
        # projection) the comparison proves nothing, so a random projection is compared as well.
        probes = [(weight, bias, output)]
        if not output.abs().max() > 0:
            generator = torch.Generator().manual_seed(0)
            random = torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(weight)
            substitute = {f"{child}.weight": random}
            random_bias = None
            if bias is not None:
                random_bias = torch.randn(bias.shape, generator=generator, dtype=torch.float64).to(bias)
                substitute[f"{child}.bias"] = random_bias
            probes.append((random, random_bias, _primary(torch.func.functional_call(module, substitute, call.args,
                                                                                     call.kwargs))))
        for w, b, expected in probes:
            if z is None or expected is None or z.shape[:-1] != expected.shape[:-1] or z.shape[-1] != w.shape[1] or \
                    not (F.linear(z, w, b) - expected).abs().max() <= 1e-3 * expected.abs().max():
                raise SettingError(f"method: the output of {type(module).__name__} is not its {child!r} "
                                   "projection's output; Taylor estimates of the units in that projection are not "
                                   "defined")
        for u in units:
            if u.kind == "head":
                columns = slice(u.index * width, (u.index + 1) * width)
                delta = perturbation.apply(weight[:, columns].clone(), u) - weight[:, columns]
                result[u] = _per_sample(module, F.linear(z[..., columns], delta), g)
    own = [u for u in units if u.kind != "head"]
    if own:  # the projection's own weight and bias units: the Linear module's rule, on z with the samples first
        z, output, g = (_batch_major(module, t) for t in (z, output, g))
        result.update(_directional(projection, f"{name}.{child}" if name else child, own, perturbation,
                                   _Call((z,), {}, output), g))
    return result


def _linear_in_weight(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1
                                             and not module.transposed)


def _weight_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's output with ``weight`` (some output channels' filters) and no bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


def estimate_outcome(unit: Unit, estimate: float) -> UnitOutcome:
    """An outcome holding only an estimate: no sample was evaluated with the unit perturbed."""
    return UnitOutcome(unit=unit, total=Tally(), halves=(Tally(), Tally()), exact=False, estimate=estimate)
