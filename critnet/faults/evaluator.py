"""Exact per-fault outcomes: the golden logits once, then each fault's logits only where they can differ.

Built on the suffix engine (:mod:`critnet.engine.suffix`): the model is traced once, the fault-free values crossing
each cut are cached per layer, and a fault runs only the network after its layer. A single-bit fault in a conv
weight changes one output channel, so that channel is recomputed from the faulty filter and compared with the
cached one: images whose channel is bit-identical keep the golden logits (masked, nothing more to run); the
others are packed, from many faults of the layer at once, into suffix passes of a fixed batch size. Both shortcuts
are checked on the data before they are used (recomputing one channel reproduces the cached channel; a pack of
rows gives each row's fault-free logits) and are switched off where they would not be bit-exact.

Every other fault (several sites, biases, BatchNorm parameters, activations) is written into the model and runs
the suffix from its first affected layer; models that ``torch.fx`` cannot trace run full forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from critnet.engine.jobs import Codec
from critnet.engine.suffix import (
    TracedModel,
    budget_bytes,
    segment_batches,
    trace,
)
from critnet.evaluation import batch_results
from critnet.evaluation_set import EvaluationSet
from critnet.faults.injection import Fault, injected
from critnet.formats import FORMATS, bit_patterns
from critnet.outputs import OutputSelector, logits_of
from critnet.perturb import Unit
from critnet.storage import quantization_parameters, quantized_from, requantized, stored_values

# torch.ao's quantized conv (fused ConvReLU2d derives from it): its weight lives in packed parameters
QuantizedConv2d = torch.ao.nn.quantized.Conv2d
QuantizedConvReLU2d = torch.ao.nn.intrinsic.quantized.ConvReLU2d


@dataclass
class FaultCounts:
    """Outcome counts of one fault over the evaluated images, against the golden (fault-free) run.

    ``masked`` (bit-identical logits) + ``noncritical`` (logits differ, same top-1) + ``sdc1`` (top-1 changed) =
    ``images``. ``sdc5`` (the golden top-1 class left the faulty top-5) and ``nonfinite`` (a NaN/inf logit; such an
    image has no trustworthy class and counts as SDC-1 and SDC-5) are subsets of ``sdc1``. The ``*_correct``
    counts repeat these over the images the golden model classifies correctly. ``delta_loss_sum`` adds the change
    of cross-entropy over the images whose logits and loss stay finite; ``loss_excluded`` counts the others, so
    one broken image never turns the fault's mean into NaN.
    """

    images: int = 0
    masked: int = 0
    noncritical: int = 0
    sdc1: int = 0
    sdc5: int = 0
    nonfinite: int = 0
    delta_loss_sum: float = 0.0  # float64 sum of per-image (faulty - golden) cross-entropy, finite images only
    faulty_correct: int = 0
    correct_images: int = 0
    sdc1_correct: int = 0
    sdc5_correct: int = 0
    loss_excluded: int = 0  # images left out of delta_loss_sum: a non-finite logit or loss

    @property
    def loss_images(self) -> int:
        """The images ``delta_loss_sum`` covers."""
        return self.images - self.loss_excluded

    def to_record(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_record(cls, values: Sequence) -> FaultCounts:
        return cls(*[float(v) if f.name == "delta_loss_sum" else int(v) for f, v in zip(fields(cls), values)])


#: A fault's counts as a record of the job runner.
COUNTS = Codec(FaultCounts.to_record, lambda value, fault: FaultCounts.from_record(value))


@dataclass
class GoldenRun:
    """The fault-free logits of the evaluation set (as the model returns them, dataset order), predictions, losses
    and hits."""

    logits: Tensor
    targets: Tensor
    predictions: Tensor
    losses: Tensor  # float64 copies of the per-image cross-entropy of the logits in float32
    correct: Tensor


def golden_run(model: nn.Module, data: EvaluationSet, output: OutputSelector = None) -> GoldenRun:
    """One fault-free forward pass over ``data`` through critnet's evaluation loop, batch by batch as every naive
    reference does; ``output`` says where the logits are in what the model returns."""
    logits, targets = [], []
    with torch.no_grad():
        for (_, out, _, _, _), (_, y) in zip(batch_results(model, data, output=output), data):
            logits.append(out)
            targets.append(y)
    out, y = torch.cat(logits), torch.cat(targets)
    predictions = out.argmax(1)
    losses = F.cross_entropy(out.float(), y, reduction="none").double()
    return GoldenRun(out, y, predictions, losses, predictions == y)


def tally_rows(counts: FaultCounts, faulty: Tensor, rows: Tensor, golden: GoldenRun) -> None:
    """Add the outcomes of faulty logits ``faulty`` for the images ``rows`` (indices into the evaluation set)."""
    # the golden logits are float32 (critnet's evaluation loop widens them); widening is exact and one-to-one,
    # so bit-identical float32 logits mean bit-identical logits in the model's own format
    faulty = faulty.float()
    reference = golden.logits[rows]
    masked = (bit_patterns(faulty) == bit_patterns(reference)).all(1)
    nonfinite = ~torch.isfinite(faulty).all(1)
    golden_class = golden.predictions[rows]
    sdc1 = ~masked & (nonfinite | (faulty.argmax(1) != golden_class))
    top = faulty.topk(min(5, faulty.shape[1]), dim=1).indices
    sdc5 = sdc1 & (nonfinite | ~(top == golden_class[:, None]).any(1))
    targets = golden.targets[rows]
    losses = F.cross_entropy(faulty, targets, reduction="none").double()
    delta = torch.where(masked, torch.zeros_like(losses), losses - golden.losses[rows])
    # a NaN/inf logit has no meaningful loss (and finite logits can still overflow it): counted, not summed
    excluded = nonfinite | ~torch.isfinite(delta)
    delta = torch.where(excluded, torch.zeros_like(delta), delta)
    correct = golden.correct[rows]
    hits = (faulty.argmax(1) == targets) & ~nonfinite
    # one conversion to Python numbers per call: the per-count syncs dominate on small packs
    masked_n, sdc1_n, sdc5_n, nonfinite_n, hits_n, correct_n, sdc1_c, sdc5_c, excluded_n = torch.stack(
        [masked, sdc1, sdc5, nonfinite, hits, correct, sdc1 & correct, sdc5 & correct, excluded]).sum(1).tolist()
    counts.images += len(rows)
    counts.masked += masked_n
    counts.sdc1 += sdc1_n
    counts.noncritical = counts.images - counts.masked - counts.sdc1
    counts.sdc5 += sdc5_n
    counts.nonfinite += nonfinite_n
    counts.delta_loss_sum += float(delta.sum())
    counts.faulty_correct += hits_n
    counts.correct_images += correct_n
    counts.sdc1_correct += sdc1_c
    counts.sdc5_correct += sdc5_c
    counts.loss_excluded += excluded_n


def tally_masked(counts: FaultCounts, rows: Tensor, golden: GoldenRun) -> None:
    """Add images ``rows`` whose logits are known to be the golden ones bit for bit."""
    correct = int(golden.correct[rows].sum())
    counts.images += len(rows)
    counts.masked += len(rows)
    counts.faulty_correct += correct
    counts.correct_images += correct


@dataclass
class _Plan:
    kind: str  # "identity", "channel" (recompute one conv channel), "suffix" (fault in the model), "full"
    stop: int = -1
    node: fx.Node | None = None


@dataclass
class _Queued:
    """Images of one fault waiting for a suffix pass: their batch, rows in it and recomputed channel."""

    fault: int
    batch: int
    rows: Tensor
    channel: int
    values: Tensor


@dataclass
class _Progress:
    outstanding: dict[int, int] = field(default_factory=dict)  # queued images per fault, not yet evaluated
    queued_all: set[int] = field(default_factory=set)  # faults whose every image has been queued or tallied


class FaultEvaluator:
    """Per-fault outcome counts by suffix-only evaluation (see the module docstring).

    Args:
        model: the network in eval mode; its parameters are bit-identical after every call, also on errors.
        data: the evaluation set.
        memory_budget_mb: the most memory the cached values crossing the cuts may take; data beyond it is
            processed in segments of whole batches.
        pack_size: images per packed suffix pass (default: the largest batch of ``data``).
        output: where the logits are in what the model returns (:func:`critnet.outputs.logits_of`); the traced
            suffixes return whatever the model returns.

    >>> from critnet.evaluation_set import as_evaluation_set
    >>> from critnet.faults.injection import Site
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).eval()
    >>> data = as_evaluation_set((torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])))
    >>> bits = int(model[0].weight.detach().view(-1).view(torch.int32)[5])
    >>> found = {}
    >>> fault = Fault(0, "bitflip", "weights", (Site("0.weight", 5, 31),), (bits,))
    >>> FaultEvaluator(model, data).run([(fault.id, fault)], lambda key, counts: found.update({key: counts.images}))
    >>> found
    {0: 4}
    """

    def __init__(self, model: nn.Module, data: EvaluationSet, memory_budget_mb: float | None = None,
                 pack_size: int | None = None, output: OutputSelector = None) -> None:
        self.model = model
        self.data = data
        self.output = output
        self.golden = golden_run(model, data, output)
        self.traced: TracedModel | None = trace(model)
        self.budget = budget_bytes(memory_budget_mb)
        self.pack_size = pack_size or max(data.batch_sizes)
        self.bytes_per_sample = 0.0
        if self.traced is not None:
            with torch.no_grad():
                self.bytes_per_sample = self.traced.measure(next(iter(data))[0])
        #: What weight faults strike, by name (float parameters and quantized layers' packed weights).
        self.stores = stored_values(model)
        #: Why a shortcut was switched off, by layer (empty when every shortcut held).
        self.fallbacks: dict[str, str] = {}
        #: Where the work went: images settled by the channel comparison alone, images run through packed suffix
        #: passes (and the fault-free rows that filled short packs), suffix passes with the fault in the model.
        self.stats = {"images_masked_by_channel": 0, "images_packed": 0, "packs": 0, "padding_images": 0,
                      "in_model_passes": 0, "full_passes": 0}

    # ----------------------------------------------------------------- planning

    def plan(self, fault: Fault) -> _Plan:
        if fault.is_identity:
            return _Plan("identity")
        if self.traced is None:
            return _Plan("full")
        if fault.target == "weights" and len(fault.sites) == 1:
            site = fault.sites[0]
            shape = self.stores[site.parameter].shape
            if len(shape) == 4:
                channel = site.index // shape[1:].numel()
                plan = self.traced.plan(Unit("channel", site.parameter, channel))
                if plan is not None and plan.node is not None:
                    return _Plan("channel", plan.stop, plan.node)
                node = self._quantized_conv_node(site.parameter)
                if node is not None:
                    return _Plan("channel", self.traced.position[node] + 1, node)
        kind = "tensor" if fault.target == "weights" else "activation"
        plans = [self.traced.plan(Unit(kind, s.parameter, None if kind == "tensor" else 0)) for s in fault.sites]
        if any(p is None for p in plans):
            return _Plan("full")
        return _Plan("suffix", min(p.stop for p in plans))

    def _quantized_conv_node(self, weight_name: str) -> fx.Node | None:
        """The only call of the quantized conv layer owning ``weight_name``, when its output channels can be
        recomputed with the layer alone (one input, no hooks), else None."""
        owner = weight_name.rpartition(".")[0]
        module = self.traced.modules.get(owner)
        if not isinstance(module, QuantizedConv2d) or module._forward_hooks or module._forward_pre_hooks:
            return None
        calls = [n for n in self.traced.nodes if n.op == "call_module" and n.target == owner]
        if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs or not isinstance(calls[0].args[0], fx.Node):
            return None
        return calls[0]

    def costs(self, faults: Sequence[Fault]) -> list[float]:
        """Relative cost of each fault (deterministic, so every rank shares the faults alike)."""
        if self.traced is None:
            return [1.0] * len(faults)
        full = sum(self.traced.node_cost.values()) or 1.0
        costs = []
        for fault in faults:
            plan = self.plan(fault)
            if plan.kind == "identity":
                costs.append(0.0)
            elif plan.kind == "full":
                costs.append(full)
            else:
                costs.append(sum(self.traced.node_cost.get(n, 0.0) for n in self.traced.nodes[plan.stop:]))
        return costs

    def segments(self) -> list[list[int]]:
        """Batch positions per segment: whole batches whose cached values fit the memory budget."""
        return segment_batches(self.data.batch_sizes, self.bytes_per_sample, self.budget)

    # ----------------------------------------------------------------- evaluation

    def run(self, work: Sequence[tuple[int, Fault]], record: Callable[[int, FaultCounts], None]) -> None:
        """Evaluate every ``(fault id, fault)`` of ``work`` (a :class:`~critnet.engine.jobs.Jobs` evaluation);
        ``record`` gets each fault's id and counts as soon as they are complete."""
        with torch.no_grad():
            self._run([fault for _, fault in work], lambda fault, counts: record(fault.id, counts))

    def _run(self, faults: Sequence[Fault], record: Callable[[Fault, FaultCounts], None]) -> None:
        everything = torch.arange(self.data.samples, device=self.golden.logits.device)
        planned = []
        for fault in faults:
            plan = self.plan(fault)
            if plan.kind == "identity":  # not a single bit changes: every image keeps the golden logits
                counts = FaultCounts()
                tally_masked(counts, everything, self.golden)
                record(fault, counts)
            elif plan.kind == "full":
                counts = FaultCounts()
                with injected(self.model, fault, self.stores):
                    for (x, _), offset in zip(self.data, self.data.offsets()):
                        tally_rows(counts, logits_of(self.model(x), self.output), everything[offset: offset + len(x)],
                                   self.golden)
                        self.stats["full_passes"] += 1
                record(fault, counts)
            else:
                planned.append((fault, plan))
        if not planned:
            return
        traced = self.traced
        by_stop: dict[int, list[tuple[Fault, _Plan]]] = {}
        for item in planned:
            by_stop.setdefault(item[1].stop, []).append(item)
        keep = {stop: set(traced.crossing(stop)) | {p.node.args[0] for _, p in items if p.node is not None}
                for stop, items in by_stop.items()}
        counts = {fault.id: FaultCounts() for fault, _ in planned}
        segments = self.segments()
        offsets = self.data.offsets()
        for number, segment in enumerate(segments):
            last = number == len(segments) - 1
            wanted = set(segment)
            batches: list[tuple[Tensor, Tensor]] = []  # (inputs, rows in the evaluation set)
            for position, (x, _) in enumerate(self.data):
                if position in wanted:
                    batches.append((x, everything[offsets[position]: offsets[position] + len(x)]))
                if position >= segment[-1]:
                    break
            states = [{traced.input_node: x} for x, _ in batches]
            position = traced.first
            for stop in sorted(by_stop):
                for env in states:
                    traced.advance(env, position, stop, keep[stop])
                position = stop
                inputs = traced.crossing(stop)
                suffix = traced.suffix(stop, inputs)
                done = (lambda fault: record(fault, counts.pop(fault.id))) if last else (lambda fault: None)
                in_model = [f for f, p in by_stop[stop] if p.kind == "suffix"]
                for fault in in_model:
                    with injected(self.model, fault, self.stores):
                        for env, (_, rows) in zip(states, batches):
                            logits = logits_of(suffix(*[env[n] for n in inputs]), self.output)
                            tally_rows(counts[fault.id], logits, rows, self.golden)
                            self.stats["in_model_passes"] += 1
                    done(fault)
                nodes: dict[fx.Node, list[Fault]] = {}
                for fault, plan in by_stop[stop]:
                    if plan.kind == "channel":
                        nodes.setdefault(plan.node, []).append(fault)
                for node, node_faults in nodes.items():
                    _ChannelFaults(self, node, suffix, inputs, states, batches, counts, done).run(node_faults)
            del states


class _OneChannel:
    """Output channel ``c`` of a conv layer computed from its filter ``c`` alone: a float conv's, or a quantized
    conv's (``torch.ao``: plain or fused with ReLU, per-channel or per-tensor int8 weights, no groups) through the
    quantized conv kernel with a one-channel packed weight and the layer's output scale. Whether that reproduces
    the layer's own channel bit for bit is checked on the data before it is used."""

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv
        self.quantized = isinstance(conv, QuantizedConv2d)
        if self.quantized:
            self.weight, self.bias = conv.weight(), conv.bias()
            self.integers = self.weight.int_repr()
            self.parameters = quantization_parameters(self.weight)
            self.op = {QuantizedConv2d: torch.ops.quantized.conv2d,
                       QuantizedConvReLU2d: torch.ops.quantized.conv2d_relu}.get(type(conv))
        else:
            self.weight, self.bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        self.channels = self.weight.shape[0]

    @property
    def available(self) -> bool:
        return not self.quantized or (self.op is not None and self.conv.groups == 1
                                      and self.conv.padding_mode == "zeros")

    def filter(self, channel: int) -> Tensor:
        """A copy of filter ``channel`` to write a fault into (a quantized weight's integers)."""
        source = self.integers if self.quantized else self.weight
        return source[channel: channel + 1].clone()

    def __call__(self, x: Tensor, channel: int, one_filter: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias[channel: channel + 1]
        if not self.quantized:
            return self.conv._conv_forward(x, one_filter, bias)[:, 0]
        scales, zero_points = self.parameters
        if len(scales) > 1:  # per channel: the filter's own
            scales, zero_points = scales[channel: channel + 1], zero_points[channel: channel + 1]
        weight = quantized_from(self.weight, one_filter, scales, zero_points)
        conv = self.conv
        packed = torch.ops.quantized.conv2d_prepack(weight, bias, list(conv.stride), list(conv.padding),
                                                   list(conv.dilation), conv.groups)
        return self.op(x, packed, conv.scale, conv.zero_point)[:, 0]


def _plain(value: Tensor) -> Tensor:
    """A quantized tensor's integers (rows of a pack are gathered as integers), any other tensor as it is."""
    return value.int_repr() if value.is_quantized else value


def _like(model_value: Tensor, plain: Tensor) -> Tensor:
    """``plain`` as a tensor of ``model_value``'s kind: quantized with its scale and zero point if it is."""
    return requantized(model_value, plain) if model_value.is_quantized else plain


class _ChannelFaults:
    """The single-site faults of one conv layer's weight: recompute one channel, pack the images it changes.

    A float conv recomputes the channel from a faulty copy of its filter; a quantized conv, whose weight is packed,
    recomputes the whole layer with the fault in the model (one layer, not the network after it).
    """

    def __init__(self, evaluator: FaultEvaluator, node: fx.Node, suffix: fx.GraphModule, inputs: list[fx.Node],
                 states: list[dict], batches: list[tuple[Tensor, Tensor]], counts: dict[int, FaultCounts],
                 done: Callable[[Fault], None]) -> None:
        self.evaluator = evaluator
        self.traced = evaluator.traced
        self.golden = evaluator.golden
        self.node, self.suffix, self.inputs = node, suffix, inputs
        self.states, self.batches, self.counts, self.done = states, batches, counts, done
        self.conv: nn.Module = self.traced.modules[node.target]
        self.size = min(evaluator.pack_size, sum(len(rows) for _, rows in batches))
        self.queue: list[_Queued] = []
        self.queued = 0
        self.progress = _Progress()
        self.faults: dict[int, Fault] = {}
        # the packs' inputs as plain tensors (a quantized value's integers), made once: gathering rows from them
        # is all a pack does, and int_repr copies the whole tensor
        self.plain = [{n: _plain(env[n]) for n in inputs if n in self.traced.batched and isinstance(env[n], Tensor)}
                      for env in states]
        self.one_channel = _OneChannel(self.conv)
        self.exact_channel = self._channel_recompute_is_exact()
        self.packable = self._packs_are_exact()

    def _channel_recompute_is_exact(self) -> bool:
        if not self.one_channel.available:
            return False
        env = self.states[0]
        for channel in {0, self.one_channel.channels - 1}:
            alone = self.one_channel(env[self.node.args[0]], channel, self.one_channel.filter(channel))
            if not torch.equal(bit_patterns(alone), bit_patterns(env[self.node][:, channel].contiguous())):
                self.evaluator.fallbacks[str(self.node.target)] = "one channel alone differs from the full conv"
                return False
        return True

    def _packs_are_exact(self) -> bool:
        """Whether a pack of rows from different batches, in another order, gives every row its golden logits."""
        rows = [(b, r) for b, (_, batch_rows) in enumerate(self.batches) for r in range(len(batch_rows))]
        picked = rows[::-1][: self.size]
        logits = self._logits([(b, torch.tensor([r]), None, None) for b, r in picked])
        expected = torch.stack([self.golden.logits[self.batches[b][1][r]] for b, r in picked])
        if torch.equal(bit_patterns(logits.float()), bit_patterns(expected)):
            return True
        self.evaluator.fallbacks[str(self.node.target)] = "packed rows do not reproduce the golden logits"
        return False

    def _logits(self, parts: list[tuple[int, Tensor, int | None, Tensor | None]]) -> Tensor:
        """The suffix's logits on the packed ``parts`` (see :meth:`_pack_inputs`)."""
        return logits_of(self.suffix(*self._pack_inputs(parts)), self.evaluator.output)

    def _pack_inputs(self, parts: list[tuple[int, Tensor, int | None, Tensor | None]]) -> list:
        args = []
        for n in self.inputs:
            if n is self.node:
                pieces = []
                for b, rows, channel, values in parts:
                    piece = self.plain[b][n][rows]  # indexing copies: the cache stays as it was
                    if channel is not None:
                        piece[:, channel] = _plain(values)
                    pieces.append(piece)
                args.append(_like(self.states[0][n], torch.cat(pieces)))
            elif n in self.traced.batched and isinstance(self.states[0][n], Tensor):
                args.append(_like(self.states[0][n], torch.cat([self.plain[b][n][rows] for b, rows, _, _ in parts])))
            else:
                args.append(self.states[0][n])
        return args

    def _faulty_channels(self, fault: Fault, channel: int) -> list[Tensor]:
        """Per batch, output channel ``channel`` of the layer with ``fault`` in its weight."""
        site = fault.sites[0]
        inputs = [env[self.node.args[0]] for env in self.states]
        if not self.exact_channel:
            with injected(self.evaluator.model, fault, self.evaluator.stores):
                return [self.conv(x)[:, channel] for x in inputs]
        # the fault lives in a copy of one filter: the model itself is never written
        faulty_filter = self.one_channel.filter(channel)
        patterns = faulty_filter.view(-1) if self.one_channel.quantized else FORMATS[fault.format].patterns(faulty_filter)
        patterns[site.index % faulty_filter.numel()] = fault.faulty_bits[0]
        return [self.one_channel(x, channel, faulty_filter) for x in inputs]

    def run(self, faults: Sequence[Fault]) -> None:
        per_filter = self.evaluator.stores[faults[0].sites[0].parameter].shape[1:].numel() if faults else 1
        for fault in faults:
            site = fault.sites[0]
            channel = site.index // per_filter
            self.faults[fault.id] = fault
            self.progress.outstanding.setdefault(fault.id, 0)
            for b, (env, values) in enumerate(zip(self.states, self._faulty_channels(fault, channel))):
                rows = self.batches[b][1]
                cached = env[self.node][:, channel]
                differs = (bit_patterns(values).reshape(len(rows), -1)
                           != bit_patterns(cached).reshape(len(rows), -1)).any(1)
                if not self.packable:
                    if differs.any():  # the whole batch in its own order, as the golden run saw it
                        everything = torch.arange(len(rows), device=rows.device)
                        logits = self._logits([(b, everything, channel, values)])
                        tally_rows(self.counts[fault.id], logits, rows, self.golden)
                    else:
                        tally_masked(self.counts[fault.id], rows, self.golden)
                    continue
                unchanged = (~differs).nonzero()[:, 0]
                if len(unchanged):
                    tally_masked(self.counts[fault.id], rows[unchanged], self.golden)
                    self.evaluator.stats["images_masked_by_channel"] += len(unchanged)
                changed = differs.nonzero()[:, 0]
                if len(changed):
                    self._enqueue(_Queued(fault.id, b, changed, channel, values[changed]))
            self.progress.queued_all.add(fault.id)
            self._finish_ready()
        self._flush(final=True)

    def _enqueue(self, item: _Queued) -> None:
        self.queue.append(item)
        self.queued += len(item.rows)
        self.progress.outstanding[item.fault] += len(item.rows)
        while self.queued >= self.size:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        if not self.queue:
            return
        pack: list[_Queued] = []
        room = self.size
        while self.queue and room:
            item = self.queue[0]
            if len(item.rows) <= room:
                pack.append(self.queue.pop(0))
                room -= len(item.rows)
            else:  # split: the rest waits for the next pack
                pack.append(_Queued(item.fault, item.batch, item.rows[:room], item.channel, item.values[:room]))
                self.queue[0] = _Queued(item.fault, item.batch, item.rows[room:], item.channel, item.values[room:])
                room = 0
        self.queued -= self.size - room
        parts = [(q.batch, q.rows, q.channel, q.values) for q in pack]
        if room:  # a short last pack is filled with fault-free rows, so every pass has the checked batch size
            parts.append((0, torch.zeros(room, dtype=torch.long, device=pack[0].rows.device), None, None))
        logits = self._logits(parts)
        self.evaluator.stats["packs"] += 1
        self.evaluator.stats["images_packed"] += self.size - room
        self.evaluator.stats["padding_images"] += room
        start = 0
        for q in pack:
            rows = self.batches[q.batch][1][q.rows]
            tally_rows(self.counts[q.fault], logits[start: start + len(q.rows)], rows, self.golden)
            start += len(q.rows)
            self.progress.outstanding[q.fault] -= len(q.rows)
        self._finish_ready()
        if final and self.queue:
            self._flush(final=True)

    def _finish_ready(self) -> None:
        for fault_id in [f for f in self.progress.queued_all if self.progress.outstanding[f] == 0]:
            self.progress.queued_all.discard(fault_id)
            del self.progress.outstanding[fault_id]
            self.done(self.faults.pop(fault_id))


__all__ = ["FaultCounts", "FaultEvaluator", "GoldenRun", "golden_run", "tally_masked", "tally_rows"]
