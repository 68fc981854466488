"""Suffix-only exact evaluation: run the unperturbed network once, evaluate only what comes after each unit.

The model is traced with ``torch.fx``. A unit's *cut* is the position (in the graph's topological order) of the
first node that uses it: the perturbed module call, or the ``get_attr`` of a parameter used functionally. Every
value computed before the cut and used after it *crosses the cut* (with residual connections, more than the
layer's input). One unperturbed walk over the graph, stopping at each cut in turn, yields the crossing values;
for each unit only the suffix graph (the nodes from the cut on) runs, on the very same modules, so the scores
equal the full forward pass bit for bit on the same device and batch sizes.

Channel units of a plain ``Conv2d`` go one step further: the perturbed layer's output is the cached unperturbed
output with one channel recomputed from the perturbed filter (the other channels do not depend on it), so the cut
moves behind the convolution. In a grouped (or depthwise) convolution output channel ``c`` reads only the input
channels of its group ``c // (out_channels / groups)``, so the recompute convolves that slice of the input.

A parameter used inside a module that ``torch.fx`` keeps whole (``nn.MultiheadAttention`` reads its ``out_proj``
weight functionally) is cut at the call of that enclosing module. Units that no traced node uses, and every unit of
a model that does not trace, are evaluated with full forward passes, announced by one warning with their count.

The evaluation set is processed in *segments* of whole batches whose crossing values fit the memory budget;
scores are sums, so segmenting stays exact.
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from critnet.evaluation import tally_pass
from critnet.evaluation_set import EvaluationSet
from critnet.outputs import OutputSelector, logits_of
from critnet.perturb import Perturbation, Unit, head_parameter_name, perturbed
from critnet.scoring import TallyPair, UnitOutcome, sum_halves
from critnet.scoring import per_sample as sample_stats

# Without a budget the engine takes up to 1 GiB beyond one plain forward: beside an ImageNet model and a batch
# of a few dozen images it fits an 8 GB GPU, the smallest common one, and it stacks enough variants that larger
# budgets run little faster.
DEFAULT_MEMORY_BUDGET_MB = 1024.0


def budget_bytes(memory_budget_mb: float | None) -> float:
    """``memory_budget_mb`` in bytes, the default where it is None."""
    return (memory_budget_mb if memory_budget_mb is not None else DEFAULT_MEMORY_BUDGET_MB) * 2**20


_TRACE_LOCK = threading.Lock()
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul"}
# Perturbed variants are stacked along the batch up to about this many samples per suffix pass, by the device the
# pass runs on: enough to hide per-call overhead on small batches; larger stacks do not run faster per sample on a
# CPU (they leave the caches).
STACK_SAMPLES = {"cuda": 256, "cpu": 128}
# The share of the memory budget the cached values of a segment's batches may take; the rest is left for stacking.
HELD_SHARE = 0.5
# A stacked pass takes more than the values its graph holds (allocator rounding, convolution workspaces): each
# variant is counted this many times its values.
STACK_MARGIN = 1.5
# Bytes of one image's per-sample result of one unit: a float64 loss and two bool hits.
_SAMPLE_BYTES = 10


@dataclass
class _Plan:
    """How one unit is evaluated: from which stop, and whether by recomputing one conv channel."""

    stop: int  # position of the first suffix node
    node: fx.Node | None  # the perturbed conv node (channel slice) or None (the suffix runs the perturbed node)


@dataclass
class _Stop:
    position: int
    keep: set = field(default_factory=set)  # values to hold at this stop: crossing values and conv inputs


class TracedModel:
    """A model traced by ``torch.fx`` with its cuts, suffix graphs and per-node costs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Optional forward arguments (timm's ``attn_mask=None``) are traced as their defaults: the engine feeds images.
        optional = {p.name: p.default for p in list(inspect.signature(model.forward).parameters.values())[1:]
                    if p.default is not inspect.Parameter.empty}
        with _TRACE_LOCK:  # tracing patches torch functions process-wide for its duration
            # shares the model's modules and parameters, so perturbations show
            self.gm = fx.symbolic_trace(model, concrete_args=optional or None)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((self.position[u] for u in node.users), default=-1) for node in self.nodes}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1 + len(optional):
            raise ValueError(f"the traced model takes {len(placeholders) - len(optional)} inputs; the engine handles "
                             "exactly one")
        self.input_node = placeholders[0]
        #: The optional arguments' placeholders (in signature order) with the defaults they were traced with.
        self.defaults = dict(zip(placeholders[1:], optional.values()))
        self.first = max(self.position[n] for n in placeholders) + 1
        # Values that depend on the input carry the batch; the others (parameters, constants) are shared by all.
        self.batched: set[fx.Node] = set()
        for node in self.nodes:
            if node is self.input_node or any(a in self.batched for a in node.all_input_nodes):
                self.batched.add(node)
        self.modules = dict(model.named_modules())
        self.parameters = dict(model.named_parameters(remove_duplicate=False))
        self._suffixes: dict[tuple, fx.GraphModule] = {}
        self.node_cost: dict[fx.Node, float] = {}

    def start(self, x: Tensor) -> dict:
        """The values a walk over the graph starts from: the input batch and the optional arguments' defaults."""
        return {self.input_node: x, **self.defaults}

    def crossing(self, position: int) -> list[fx.Node]:
        """Values computed before ``position`` and used at or after it, in graph order."""
        return [n for n in self.nodes[:position] if self.last_use[n] >= position]

    def plan(self, unit: Unit) -> _Plan | None:
        """Where ``unit`` enters the graph; None if no traced node uses it (it is then evaluated naively)."""
        if unit.kind == "activation":
            owners, aliases, attr = {unit.name}, set(), None
        else:
            param_name = head_parameter_name(self.model, unit) if unit.kind == "head" else unit.name
            # A tied parameter lives under several names; its first use under any of them is the cut.
            param = self.parameters.get(param_name)
            aliases = {name for name, q in self.parameters.items() if q is param} | {param_name}
            # fx keeps torch.nn modules whole, so the call of an enclosing module may be the parameter's only use.
            owners = {prefix for name in aliases for prefix in _enclosing_modules(name)}
            attr = param_name.rpartition(".")[2]
        users = [
            i
            for i, n in enumerate(self.nodes)
            if (n.op == "call_module" and n.target in owners) or (n.op == "get_attr" and n.target in aliases)
        ]
        if not users:
            return None
        first = min(users)
        node = self.nodes[first]
        if unit.kind == "channel" and attr == "weight" and len(users) == 1 and self._channel_sliceable(node):
            return _Plan(stop=first + 1, node=node)
        return _Plan(stop=first, node=None)

    def _channel_sliceable(self, node: fx.Node) -> bool:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        return (
            type(module) is nn.Conv2d
            and (module.groups == 1 or module.padding_mode == "zeros")
            and len(node.args) == 1
            and not node.kwargs
            and isinstance(node.args[0], fx.Node)
            and not module._forward_hooks
            and not module._forward_pre_hooks
        )

    def suffix(self, position: int, inputs: Sequence[fx.Node]) -> fx.GraphModule:
        """A module computing the model's output from the values ``inputs`` crossing the cut at ``position``."""
        key = (position, tuple(inputs))
        if key not in self._suffixes:
            graph = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            for node in inputs:
                env[node] = graph.placeholder(node.name)
                if any(self._mutates(user, node) for user in node.users):
                    # the cached value is shared by every unit's pass: an in-place op must work on a copy
                    env[node] = graph.call_method("clone", (env[node],))
            for node in self.nodes[position:]:
                env[node] = graph.node_copy(node, lambda n: env[n])
            self._suffixes[key] = fx.GraphModule(self.gm, graph)
        return self._suffixes[key]

    def _mutates(self, user: fx.Node, value: fx.Node) -> bool:
        """Whether ``user`` may write into ``value`` in place (``+=``, ``relu_``, ``ReLU(inplace=True)``...)."""
        first = user.args[0] if user.args else None
        if user.op == "call_function":
            return bool(user.kwargs.get("inplace")) or (
                first is value and getattr(user.target, "__name__", "") in _INPLACE_OPERATORS
            )
        if user.op == "call_method":
            name = str(user.target)
            return first is value and name.endswith("_") and not name.endswith("__")
        if user.op == "call_module":
            return first is value and bool(getattr(self.modules.get(user.target), "inplace", False))
        return False

    def advance(self, env: dict, start: int, stop: int, keep: set) -> None:
        """Run the unperturbed nodes ``[start, stop)`` on ``env`` and drop values not needed from ``stop`` on.

        A value is dropped right after its last use (as a plain forward pass frees it), not at ``stop``: holding
        every value of the walk until the stop would cost all of the prefix's activations at once."""
        interpreter = fx.Interpreter(self.gm)
        interpreter.env = env
        for position, node in enumerate(self.nodes[start:stop], start=start):
            env[node] = interpreter.run_node(node)
            for used in node.all_input_nodes:
                if self.last_use[used] <= position and used not in keep and used in env:
                    del env[used]
        for node in [n for n in env if n not in keep]:
            del env[node]

    def measure(self, x: Tensor) -> float:
        """Per-sample cost of every node (multiply-adds for conv/linear, output size otherwise) and per-sample bytes
        of every batched value (:attr:`value_bytes`) and of the values alive at each node (:attr:`live_bytes`),
        from one batch; returns twice the per-sample bytes of the largest set of values crossing any cut."""
        env = self.start(x)
        interpreter = fx.Interpreter(self.gm)
        interpreter.env = env
        batch = x.shape[0]
        self.value_bytes = {self.input_node: x.numel() * x.element_size() / batch}
        self.live_bytes = [0.0] * len(self.nodes)
        peak = 0.0
        for position, node in enumerate(self.nodes[self.first :], start=self.first):
            value = interpreter.run_node(node)
            env[node] = value
            module = self.modules.get(node.target) if node.op == "call_module" else None
            cost = 0.0
            if isinstance(value, Tensor) and value.dim() > 0:
                per_sample = value.numel() / batch
                if isinstance(module, nn.Conv2d):
                    cost = per_sample * module.in_channels // module.groups * math.prod(module.kernel_size)
                elif isinstance(module, nn.Linear):
                    cost = per_sample * module.in_features
                else:
                    cost = per_sample
            self.node_cost[node] = cost
            if node in self.batched:
                self.value_bytes[node] = _tensor_bytes(value) / batch
            # while the node runs, its inputs and its output are all alive
            self.live_bytes[position] = sum(self.value_bytes.get(n, 0.0) for n in env if n in self.batched)
            live = sum(
                v.numel() * v.element_size()
                for n, v in env.items()
                if isinstance(v, Tensor) and self.last_use[n] > position
            )
            peak = max(peak, live / batch)
            for n in [n for n in env if self.last_use[n] <= position and n is not node]:
                del env[n]
        return 2 * peak  # a conv unit's stop also holds the layer's input and output

    def held_bytes(self, stop: int, extra: set | frozenset = frozenset()) -> float:
        """Per-sample bytes held at ``stop``: the batched values crossing it and ``extra`` (a conv's input)."""
        return sum(self.value_bytes.get(n, 0.0) for n in set(self.crossing(stop)) | set(extra) if n in self.batched)

    def suffix_bytes(self, stop: int) -> float:
        """Per-sample bytes one suffix pass from ``stop`` may hold at once: its inputs (the caller holds them for
        the whole pass) and the most values alive at any node from ``stop`` on."""
        return self.held_bytes(stop) + max(self.live_bytes[stop:], default=0.0)

    def suffix_cost(self, plan: _Plan) -> float:
        cost = sum(self.node_cost.get(n, 0.0) for n in self.nodes[plan.stop :])
        if plan.node is not None:
            cost += self.node_cost.get(plan.node, 0.0) / self.modules[plan.node.target].out_channels
        return cost

    @property
    def full_cost(self) -> float:
        return sum(self.node_cost.values())


def _enclosing_modules(param_name: str) -> list[str]:
    """The names of the modules that hold ``param_name``, innermost first (``a.b.weight`` → ``a.b``, ``a``)."""
    parts = param_name.split(".")[:-1]
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def one_channel(conv: nn.Conv2d, x: Tensor, channel: int, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Output channel ``channel`` of ``conv`` on input ``x`` with filter ``weight`` (shape ``[1, in/groups, k, k]``)."""
    if conv.groups == 1:
        return conv._conv_forward(x, weight, bias)
    width_in = conv.in_channels // conv.groups
    group = channel // (conv.out_channels // conv.groups)
    x = x[:, group * width_in : (group + 1) * width_in]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, 1)


def full_passes(
    model: nn.Module,
    work: Sequence[tuple[int, Unit]],
    perturbation: Perturbation,
    data: EvaluationSet,
    record: Callable[[int, UnitOutcome], None],
    reference: tuple[Tensor, Tensor, Tensor] | None = None,
    output: OutputSelector = None,
) -> None:
    """Evaluate each ``(index, unit)`` of ``work`` with a full forward pass per batch (the naive method, and the
    exact method's fallback); ``record`` gets each outcome (with the paired sums when ``reference`` holds the
    unperturbed per-sample results). ``output`` says where the logits are in what the model returns."""
    for index, unit in work:
        with perturbed(model, unit, perturbation):
            pair = tally_pass(model, data, reference=reference, output=output)
        record(index, UnitOutcome(unit=unit, total=pair.total, halves=pair.halves))


def trace_failure(model: nn.Module) -> tuple[TracedModel | None, str | None]:
    """The traced model and None, or None and why ``torch.fx`` cannot trace it (one line)."""
    try:
        return TracedModel(model), None
    except Exception as err:  # noqa: BLE001 - any tracing failure means: fall back to full forward passes
        first_line = (str(err).strip().splitlines() or [""])[0]
        return None, f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {first_line})"


def segment_batches(batch_sizes: Sequence[int], bytes_per_sample: float, budget: float) -> list[list[int]]:
    """Batch positions grouped into segments of whole batches whose cached values (``bytes_per_sample`` per
    sample) fit ``budget`` bytes; a batch larger than the budget is a segment of its own."""
    segments: list[list[int]] = [[]]
    held = 0.0
    for position, size in enumerate(batch_sizes):
        need = size * bytes_per_sample
        if segments[-1] and held + need > budget:
            segments.append([])
            held = 0.0
        segments[-1].append(position)
        held += need
    return segments


def trace(model: nn.Module) -> TracedModel | None:
    """The traced model, or None (with a warning) if ``torch.fx`` cannot trace it."""
    traced, reason = trace_failure(model)
    if reason is not None:
        warnings.warn(f"exact engine: {reason}; evaluating every unit with full forward passes", stacklevel=3)
    return traced


class SuffixEvaluator:
    """Exact per-unit tallies by suffix-only evaluation (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        perturbation: Perturbation,
        data: EvaluationSet,
        memory_budget_mb: float | None = None,
        reference: tuple[Tensor, Tensor, Tensor] | None = None,
        output: OutputSelector = None,
    ) -> None:
        self.model = model
        self.perturbation = perturbation
        self.data = data
        #: Where the logits are in what the model returns: a suffix graph returns whatever the model returns.
        self.output = output
        #: The unperturbed per-sample results over ``data`` (``sample_pass``): outcomes then carry paired sums.
        self.reference = reference
        self.traced, self.trace_failure = trace_failure(model)
        self.budget = budget_bytes(memory_budget_mb)
        self.bytes_per_sample = 0.0
        if self.traced is not None:
            with torch.no_grad():
                x, _ = next(iter(data))
                self.bytes_per_sample = self.traced.measure(x)
        self._plans: dict[Unit, _Plan | None] = {}

    def plan(self, unit: Unit) -> _Plan | None:
        if unit not in self._plans:
            self._plans[unit] = self.traced.plan(unit) if self.traced is not None else None
        return self._plans[unit]

    def costs(self, units: Sequence[Unit]) -> list[float]:
        """Per-sample cost of evaluating each unit (deterministic, so every rank shares units the same way)."""
        if self.traced is None:
            return [1.0] * len(units)
        full = self.traced.full_cost
        return [full if self.plan(u) is None else self.traced.suffix_cost(self.plan(u)) for u in units]

    def run(
        self,
        work: Sequence[tuple[int, Unit]],
        record: Callable[[int, object], None],
        per_sample: bool = False,
    ) -> None:
        """Evaluate every ``(index, unit)``; ``record`` gets each result as soon as it is complete.

        The result is a :class:`UnitOutcome`, or with ``per_sample`` the ``(losses, top1, top5)`` vectors over the
        evaluation set in its order (float64 losses, bool hits).
        """
        planned = self._planned(work, record, per_sample)
        if not planned:
            return
        traced = self.traced
        stops: dict[int, _Stop] = {}
        by_stop: dict[int, list[tuple[int, Unit, _Plan]]] = {}
        for item in planned:
            plan = item[2]
            stop = stops.setdefault(plan.stop, _Stop(plan.stop, set(traced.crossing(plan.stop))))
            if plan.node is not None:
                stop.keep.add(plan.node.args[0])
            by_stop.setdefault(plan.stop, []).append(item)
        results = _Results(self.reference, per_sample)
        # per-sample results of every unit are held until the last segment: they take from the budget too
        tallies = len(planned) * self.data.samples * _SAMPLE_BYTES if per_sample else 0.0
        held = {p: traced.held_bytes(p, stops[p].keep) for p in stops}
        segments = segment_batches(self.data.batch_sizes, max(held.values()),
                                   max(0.0, self.budget - tallies) * HELD_SHARE)
        for segment_number, segment in enumerate(segments):
            # results are complete (and recorded) in the last segment only
            finish = record if segment_number == len(segments) - 1 else None
            batches = self._read(segment)
            samples = sum(len(y) for _, y, _ in batches)
            states = [traced.start(x) for x, _, _ in batches]
            position = traced.first
            for stop_position in sorted(stops):
                for env in states:
                    traced.advance(env, position, stop_position, stops[stop_position].keep)
                position = stop_position
                spare = self.budget - tallies - samples * held[stop_position]
                self._run_stop(stop_position, by_stop[stop_position], states, batches, results, finish, spare)
            del states

    def _planned(self, work: Sequence[tuple[int, Unit]], record: Callable[[int, object], None],
                 per_sample: bool) -> list[tuple[int, Unit, _Plan]]:
        """The units of ``work`` with their plans; those without one are evaluated here by full passes."""
        planned = [(i, u, self.plan(u)) for i, u in work]
        unplanned = [(i, u) for i, u, p in planned if p is None]
        if unplanned:
            why = self.trace_failure or (
                f"no traced node of {type(self.model).__name__} uses them (e.g. {unplanned[0][1].label})")
            warnings.warn(f"exact engine: {len(unplanned)} of {len(planned)} units evaluated with full forward "
                          f"passes: {why}", stacklevel=3)
            if per_sample:
                raise ValueError("per-sample results need a traced model")
            full_passes(self.model, unplanned, self.perturbation, self.data, record, self.reference, self.output)
        return [(i, u, p) for i, u, p in planned if p is not None]

    def _read(self, segment: list[int]) -> list[tuple[Tensor, Tensor, int]]:
        """The batches of ``segment`` with their offsets in the set."""
        wanted, offsets = set(segment), self.data.offsets()
        batches = []
        for p, (x, y) in enumerate(self.data):
            if p in wanted:
                batches.append((x, y, offsets[p]))
            if p >= segment[-1]:
                break  # a streamed set need not be read past this segment
        return batches

    def _run_stop(self, stop_position: int, items: list[tuple[int, Unit, _Plan]], states: list[dict],
                  batches: list[tuple[Tensor, Tensor, int]], results: _Results,
                  finish: Callable[[int, object], None] | None, spare: float) -> None:
        """Every unit cut at ``stop_position``, on the held values of every batch of the segment; ``spare`` bytes
        of the budget are left for stacking variants."""
        traced = self.traced
        inputs = traced.crossing(stop_position)
        suffix = traced.suffix(stop_position, inputs)
        for index, unit, _ in [item for item in items if item[2].node is None]:
            with perturbed(self.model, unit, self.perturbation):
                for env, (_, y, offset) in zip(states, batches):
                    logits = logits_of(suffix(*[env[n] for n in inputs]), self.output)
                    losses, top1, top5 = sample_stats(logits.unsqueeze(0), y)
                    results.add(index, (losses[0], top1[0], top5[0]), offset)
            if finish is not None:
                results.finish(index, unit, finish)
        slice_units = [item for item in items if item[2].node is not None]
        if slice_units:
            node = slice_units[0][2].node
            variants = self._variants(suffix, inputs, node, states[0], spare, stop_position)
            for start in range(0, len(slice_units), variants):
                chunk = slice_units[start : start + variants]
                self._run_channels(node, suffix, inputs, chunk, states, batches, results)
                if finish is not None:
                    for index, unit, _ in chunk:
                        results.finish(index, unit, finish)

    def _run_channels(self, node: fx.Node, suffix: fx.GraphModule, inputs: list[fx.Node],
                      chunk: list[tuple[int, Unit, _Plan]], states: list[dict],
                      batches: list[tuple[Tensor, Tensor, int]], results: _Results) -> None:
        """Channel units of one conv: the cached output with each unit's channel recomputed from its perturbed
        filter, the variants stacked along the batch through one suffix pass."""
        traced = self.traced
        conv = traced.modules[node.target]
        filters = []
        for _, unit, _ in chunk:
            weight = self.perturbation.apply(conv.weight.detach()[unit.index].clone(), unit)
            bias = None if conv.bias is None else conv.bias.detach()[unit.index : unit.index + 1]
            filters.append((unit.index, weight.unsqueeze(0), bias))
        for env, (_, y, offset) in zip(states, batches):
            # the variants are written into one stacked copy of the cached output (the values torch.cat of one
            # copy per variant would give, without holding those copies as well)
            v, size = len(filters), len(y)
            stacked = env[node].repeat(v, *[1] * (env[node].dim() - 1))
            for k, (channel, weight, bias) in enumerate(filters):
                stacked[k * size : (k + 1) * size, channel] = one_channel(conv, env[node.args[0]], channel, weight,
                                                                          bias)[:, 0]
            args = [stacked if n is node else _repeat(env[n], v, n in traced.batched) for n in inputs]
            del stacked
            logits = logits_of(suffix(*args), self.output)
            del args
            losses, top1, top5 = sample_stats(logits.reshape(v, len(y), -1), y)
            for k, (index, _, _) in enumerate(chunk):
                results.add(index, (losses[k], top1[k], top5[k]), offset)

    def _variants(self, suffix: fx.GraphModule, inputs: list[fx.Node], node: fx.Node, env: dict, spare: float,
                  stop: int) -> int:
        """How many perturbed variants to stack along the batch: enough to fill about ``STACK_SAMPLES`` samples,
        as many as ``spare`` bytes of the budget hold, and only if stacking gives bit-identical logits on this
        suffix and device. One variant is a pass over one batch, no larger than a plain forward (which the
        budget does not include); each further one needs its own suffix pass's worth of ``spare``."""
        batch = env[node].shape[0]
        wanted = max(1, STACK_SAMPLES.get(env[node].device.type, STACK_SAMPLES["cpu"]) // batch)
        per_variant = batch * self.traced.suffix_bytes(stop) * STACK_MARGIN
        if per_variant > 0:
            wanted = min(wanted, 1 + max(0, int(spare // per_variant)))
        if wanted == 1:
            return 1
        if any(n in self.traced.batched and not isinstance(env[n], Tensor) for n in inputs):
            # a value read off the batch (a ViT's ``x.shape[0]`` used by a later reshape) would not stack
            return 1
        # what every unit's pass runs: its errors are real errors
        single = logits_of(suffix(*[env[n] for n in inputs]), self.output)
        try:
            double = logits_of(suffix(*[_repeat(env[n], 2, n in self.traced.batched) for n in inputs]), self.output)
        except Exception:  # noqa: BLE001 - a suffix that cannot take a stacked batch is run one variant at a time
            return 1
        if not (isinstance(double, Tensor) and double.shape[0] == 2 * batch):
            return 1
        return wanted if torch.equal(double[:batch], single) and torch.equal(double[batch:], single) else 1


class _Results:
    """Each unit's results over the batches of the set: tallies summed per batch and half (paired with the
    unperturbed per-sample ``reference`` when given), or with ``per_sample`` the per-sample vectors."""

    def __init__(self, reference: tuple[Tensor, Tensor, Tensor] | None, per_sample: bool) -> None:
        self.reference = reference
        self.per_sample = per_sample
        self.sums: dict[int, TallyPair] = {}
        self.samples: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def add(self, index: int, result: tuple[Tensor, Tensor, Tensor], offset: int) -> None:
        """One batch's per-sample results of unit ``index``; the batch starts at ``offset`` in the set."""
        if self.per_sample:
            self.samples.setdefault(index, []).append(result)
        else:
            rows = (None if self.reference is None
                    else tuple(r[offset : offset + len(result[0])] for r in self.reference))
            self.sums.setdefault(index, TallyPair()).add(sum_halves(*(r.unsqueeze(0) for r in result), offset, rows)[0])

    def finish(self, index: int, unit: Unit, record: Callable[[int, object], None]) -> None:
        if self.per_sample:
            parts = self.samples.pop(index)
            record(index, tuple(torch.cat([p[j] for p in parts]) for j in range(3)))
        else:
            pair = self.sums.pop(index)
            record(index, UnitOutcome(unit=unit, total=pair.total, halves=pair.halves))


def _tensor_bytes(value) -> float:
    """Bytes of the tensors in ``value`` (a tensor, or a tuple or list of them, as a traced node returns)."""
    if isinstance(value, Tensor):
        return float(value.numel() * value.element_size())
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    return 0.0


def _repeat(value, times: int, batched: bool):
    if times == 1 or not batched or not isinstance(value, Tensor) or value.dim() == 0:
        return value
    return torch.cat([value] * times)
