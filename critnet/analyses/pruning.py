"""``critnet.prune_sweep`` (DWP §3.2: prune → evaluate → exact restore over a p_prune × p_bern grid) and
``critnet.compare_orders`` (whole output channels pruned by criticality, by L1 norm and at random)."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from critnet.analyses.ranking import model_name, rank
from critnet.choices import (
    CHANNEL_ORDERS,
    CRITICALITY_METHODS,
    PRUNE_METHODS,
    PRUNE_SCOPES,
    SCORES,
    ChannelOrder,
    CriticalityMethod,
    PruneMethod,
    PruneScope,
    Score,
    SettingError,
    check_choice,
    check_fractions,
    check_positive_int,
    field_values,
)
from critnet.digests import state_digest
from critnet.distributed import Distributed
from critnet.engine.jobs import Codec, Jobs, Record, fingerprint
from critnet.engine.pruning_masks import (
    LayerNorms,
    LayerSelection,
    PruneMasks,
    channel_count,
    channel_l1,
    channel_masks,
    channel_order,
    channel_unit,
    dwp_masks,
    pruned,
    read_channel_ranking,
)
from critnet.errors import CritnetError
from critnet.evaluation import ForwardContext, batch_tallies, check_fit
from critnet.evaluation_set import as_evaluation_set
from critnet.modes import evaluation_mode, model_device
from critnet.outputs import OutputSelector, check_selector, describe_selector
from critnet.perturb import Unit
from critnet.console import progress_bar
from critnet.results import Ranking, Sweep
from critnet.scoring import Tally
from critnet.selection import Selection


@dataclass(eq=False)
class SweepSettings(LayerSelection):
    """The settings of :func:`prune_sweep` and of the :class:`~critnet.callbacks.PruneSweep` callback, as
    ``prune_sweep.json`` records them (declared once, checked when built: see :mod:`critnet.choices`). ``include``, ``exclude``, ``module_types`` and
    ``include_linear`` pick the pruned layers (:class:`~critnet.engine.pruning_masks.LayerSelection`; default:
    every Conv2d).

    Args:
        method: ``connections`` (L1 norm of every (out, in) kernel), ``neurons`` (L1 norm of every output filter)
            or ``weights`` (every weight's magnitude).
        scope: ``global`` (one threshold over all selected layers, as the original) or ``layerwise``.
        p_prune: Fractions of the ascending unit norms below which units are pruning candidates, each in [0, 1].
        p_bern: Probabilities that a candidate is pruned (independent Bernoulli draws), each in [0, 1].
        repeats: Bernoulli draws per setting with 0 < p_bern < 1 (seeds ``seed``, ``seed + 1``, …); settings
            without randomness are evaluated once.
        seed: Base seed of the mask draws; the same masks on every rank.

    >>> SweepSettings(p_prune=0.5, module_types=["Conv2d", "Linear"]).as_dict()["p_prune"]
    [0.5]
    """

    method: PruneMethod = "connections"
    scope: PruneScope = "global"
    p_prune: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    p_bern: Sequence[float] = (1.0,)
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method", self.method, PRUNE_METHODS)
        check_choice("scope", self.scope, PRUNE_SCOPES)
        check_positive_int("repeats", self.repeats)
        check_positive_int("seed", self.seed, minimum=0)
        self.p_prune = check_fractions("p_prune", self.p_prune)
        self.p_bern = check_fractions("p_bern", self.p_bern)

    def as_dict(self) -> dict[str, Any]:
        """The settings as ``prune_sweep.json`` records them."""
        return {**field_values(self, SweepSettings), **Selection.as_dict(self)}


@dataclass(eq=False)
class OrderSettings(LayerSelection):
    """The settings of a comparison of channel pruning orders (:func:`compare_orders`), checked when built like
    :class:`SweepSettings`, on the same layer selection; ``prune_guided.json`` records them (``ratios`` as
    ``channel_ratios``). The PruneSweep callback calls ``orders`` and ``ratios`` ``guided_orders`` and
    ``guided_ratios``.

    Args:
        orders: Channel pruning orders: ``criticality`` (least critical first), ``l1`` (smallest filter L1 norm
            first), ``random``; repeated ones count once.
        ratios: Fractions of the output channels of the selected layers to prune, each in [0, 1].
        criticality_score: Score of a channel ranking computed for the ``criticality`` order: ``delta_loss``,
            ``loss``, ``top1_drop`` or ``top5_drop``.
        criticality_method: Engine method of that ranking: ``exact`` (suffix-only) or ``naive``.
        repeats: Draws of the random order (seeds ``seed``, ``seed + 1``, …).
        seed: Base seed of the random order.

    >>> OrderSettings(orders=["l1", "random", "l1"]).orders
    ['l1', 'random']
    """

    orders: Sequence[ChannelOrder] = CHANNEL_ORDERS
    ratios: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3)
    criticality_score: Score = "delta_loss"
    criticality_method: CriticalityMethod = "exact"
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.orders = list(dict.fromkeys(check_choice(f"orders[{i}]", order, CHANNEL_ORDERS)
                                         for i, order in enumerate(self.orders)))
        if not self.orders:
            raise SettingError(f"orders: must list at least one of {', '.join(CHANNEL_ORDERS)}")
        check_choice("criticality_score", self.criticality_score, SCORES)
        check_choice("criticality_method", self.criticality_method, CRITICALITY_METHODS)
        check_positive_int("repeats", self.repeats)
        check_positive_int("seed", self.seed, minimum=0)
        self.ratios = check_fractions("ratios", self.ratios)

    def as_dict(self) -> dict[str, Any]:
        """The settings as ``prune_guided.json`` records them."""
        record = {**field_values(self, OrderSettings), **Selection.as_dict(self)}
        record["channel_ratios"] = record.pop("ratios")
        return record


#: A setting's tallies as a record (pruned networks have no paired sums).
_TALLIES = Codec(lambda t: [t.loss_sum, t.top1_correct, t.top5_correct, t.samples], lambda value, masks: Tally(*value))


class _MaskEvaluation:
    """Evaluates the model under pruning masks, once per distinct mask set (cached, and kept in the resume file).

    Every rank must evaluate the same masks in the same order (the evaluation is a collective when the images are
    shared among ranks); the seeded draws make the masks equal, and :meth:`__call__` proves it.
    """

    def __init__(self, model: nn.Module, data: Any, *, distributed: Distributed, sharded: bool,
                 forward_context: ForwardContext | None, resume_dir: str | Path | None, precision: str | None,
                 device: Any, memory_budget_mb: float | None, output: OutputSelector = None) -> None:
        self.model = model
        self.output = output
        self.distributed = distributed
        self.sharded = sharded
        self.forward_context = forward_context
        # a rank with no batches of a sharded set holds an empty list (more ranks than batches)
        empty = sharded and isinstance(data, (list, tuple)) and len(data) == 0
        self.data: Any = []
        problem: tuple[type, str] | None = None
        try:
            if not empty:
                self.data = as_evaluation_set(data, device=model_device(model, device),
                                              memory_budget_mb=memory_budget_mb)
                check_fit(model, self.data, output=output, forward_context=forward_context)
        except CritnetError as err:
            if not (sharded and distributed.world_size > 1):
                raise
            problem = (type(err), str(err))
        if sharded and distributed.world_size > 1:
            # each rank checked only its own share: all must raise together, or the others would wait for the
            # failed one in the evaluation's collectives forever
            problems = [(r, p) for r, p in enumerate(distributed.gather(problem)) if p is not None]
            if problems:
                owner, (kind, message) = problems[0]
                raise kind(f"{message} (in rank {owner}'s share of the batches)")
        self.checksum = state_digest(model)
        key = None
        if resume_dir is not None:
            # keyed by the weights, every rank's share of the data and the precision, so a changed model, data
            # subset, device count, precision or output selector starts afresh
            shares = distributed.gather(getattr(self.data, "checksum", ""))
            key = fingerprint("pruning", model=self.checksum, data=shares, precision=precision or "",
                              output=describe_selector(output))
        # every rank evaluates every setting (the images are shared among them); rank 0 keeps the records
        self.jobs = Jobs(distributed, resume_dir, key, replicated=True)

    def __call__(self, masks: PruneMasks) -> Tally:
        key = masks.fingerprint()
        if len(set(self.distributed.gather(key))) != 1:
            raise RuntimeError("pruning: the masks differ between ranks (do the weights differ?)")
        return self.jobs.run("prune", [(key, masks)], self._evaluate, _TALLIES)[key]

    def _evaluate(self, work: list[tuple[int, PruneMasks]], record: Record) -> None:
        for key, masks in work:
            with pruned(self.model, masks), evaluation_mode(self.model):
                record(key, batch_tallies(self.model, self.data, distributed=self.distributed, sharded=self.sharded,
                                          forward_context=self.forward_context, output=self.output))

    def close(self) -> None:
        self.jobs.close()
        # the restore is tested; this guards every real run too
        if state_digest(self.model) != self.checksum:
            raise RuntimeError("pruning: the model's weights changed during the sweep")


def _evaluation(model, data, distributed, sharded, forward_context, resume_dir, precision, device, memory_budget_mb,
                output):
    distributed = distributed or Distributed.single()
    return distributed, _MaskEvaluation(model, data, distributed=distributed, sharded=sharded,
                                        forward_context=forward_context, resume_dir=resume_dir, precision=precision,
                                        device=device, memory_budget_mb=memory_budget_mb, output=output)


def _warn_if_over_budget(norms: LayerNorms, settings: SweepSettings, memory_budget_mb: float | None) -> None:
    """One line when what a setting holds beside its forward passes cannot fit ``memory_budget_mb``: its keep-masks
    (one flag per unit, the masks being broadcast views) and the removed weights' values set aside for the restore,
    counted as if every selected weight were removed. The norms are not held (:class:`LayerNorms`)."""
    if memory_budget_mb is None:
        return
    removable = max(settings.p_prune) > 0 and max(settings.p_bern) > 0
    values = sum(w.numel() * w.element_size() for w in norms.weights) if removable else 0
    needed = (norms.units + values) / 2**20
    if needed > memory_budget_mb:
        warnings.warn(f"memory_budget_mb={memory_budget_mb}: the sweep's masks and the removed weights it sets aside "
                      f"need up to {needed:.0f} MB beyond a plain forward; its peak will exceed the budget",
                      stacklevel=3)


def prune_sweep(
    model: nn.Module,
    data: Any,
    *,
    method: PruneMethod = SweepSettings.method,
    scope: PruneScope = SweepSettings.scope,
    p_prune: Sequence[float] = SweepSettings.p_prune,
    p_bern: Sequence[float] = SweepSettings.p_bern,
    repeats: int = SweepSettings.repeats,
    seed: int = SweepSettings.seed,
    include_linear: bool = SweepSettings.include_linear,
    include: Sequence[str] | None = SweepSettings.include,
    exclude: Sequence[str] = SweepSettings.exclude,
    module_types: Sequence[str] | None = SweepSettings.module_types,
    device: Any = None,
    memory_budget_mb: float | None = 4096.0,
    resume_dir: str | Path | None = None,
    progress: Any = False,
    distributed: Distributed | None = None,
    sharded: bool = False,
    forward_context: ForwardContext | None = None,
    precision: str | None = None,
    name: str | None = None,
    reference_metrics: Mapping[str, Any] | None = None,
    output: OutputSelector = None,
) -> Sweep:
    """Prune ``model`` by DWP §3.2 masks at every p_prune × p_bern setting, evaluate it on ``data``, and restore the
    exact weights after each setting.

    The keyword arguments ``method`` … ``module_types`` are the sweep's settings, documented once in
    :class:`SweepSettings`, which checks them before the model is touched.

    Args:
        model: the classifier; bit-identical afterwards (checked by a digest of its state dict).
        data: a DataLoader, any iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair.
        device: where to evaluate (default: where the model is).
        memory_budget_mb: keep the decoded batches in memory up to this size, else read them for every setting;
            one line says so before the sweep starts when a setting's masks and the removed values it sets aside
            may not fit it (the unit norms are computed layer by layer and not held).
        resume_dir: append every evaluated setting here and skip it when the same sweep runs again.
        progress: draw a rich progress bar (or join a live ``rich.progress.Progress``).
        distributed: a :class:`~critnet.distributed.Distributed` handle; the batches are shared among the ranks
            (rank r evaluates batches r, r + world_size, …) and the sums added in batch order.
        sharded: ``data`` already holds only this rank's batches (r, r + world_size, …), so no rank reads the
            others' images.
        forward_context: wraps every forward pass (e.g. an autocast for bf16-mixed).
        precision: the numerics ``forward_context`` gives (keys the resume file), e.g. ``"bf16-mixed"``.
        name: how reports call the model (default: its class name).
        reference_metrics: metrics of the unpruned model measured elsewhere, recorded beside the sweep.
        output: where the logits are in what the model returns, as the ``output`` of
            :class:`~critnet.analyses.ranking.RankSettings` (None: the tensor itself, or its ``.logits``).

    Returns:
        A :class:`~critnet.results.Sweep`: one row per setting and draw, the unpruned baseline first.

    Raises:
        CritnetError: one line naming what is at fault, before the model is pruned, as for :func:`critnet.rank`.

    >>> import critnet, torch
    >>> model = critnet.load_model("resnet20")
    >>> sweep = critnet.prune_sweep(model, (torch.randn(16, 3, 32, 32), torch.arange(16) % 10), p_prune=[0.5])
    >>> [round(row["ratio"], 2) for row in sweep.rows]
    [0.0, 0.5]
    """
    settings = SweepSettings(method=method, scope=scope, p_prune=p_prune, p_bern=p_bern, repeats=repeats, seed=seed,
                             include_linear=include_linear, include=include, exclude=exclude,
                             module_types=module_types)
    check_selector(output)
    started = time.perf_counter()
    distributed, evaluate = _evaluation(model, data, distributed, sharded, forward_context, resume_dir, precision,
                                        device, memory_budget_mb, output)
    network = model_name(model, name)
    plan = [(0.0, 0.0, 0, seed)]  # the unpruned baseline first, as in the original table
    for prune in settings.p_prune:
        for bern in settings.p_bern:
            if (prune, bern) == (0.0, 0.0):
                continue
            random = 0.0 < bern < 1.0 and prune > 0.0
            plan += [(prune, bern, repeat, seed + repeat) for repeat in range(repeats if random else 1)]
    norms = LayerNorms(model, method, settings)
    _warn_if_over_budget(norms, settings, memory_budget_mb)
    rows = []
    try:
        with progress_bar(progress, "prune", distributed, total=len(plan), step_name="settings") as bar:
            baseline = evaluate(dwp_masks(model, method, scope, 0.0, 0.0, seed, norms=norms, selection=settings))
            for prune, bern, repeat, draw_seed in plan:
                masks = dwp_masks(model, method, scope, prune, bern, draw_seed, norms=norms, selection=settings)
                tally = baseline if (prune, bern) == (0.0, 0.0) else evaluate(masks)
                rows.append({
                    "network": network, "method": method, "scope": scope, "p_prune": prune, "p_bern": bern,
                    "repeat": repeat, "seed": draw_seed, "nominal_ratio": prune * bern, "ratio": masks.ratio,
                    "param_fraction": masks.param_fraction, "pruned_weights": masks.pruned,
                    "selected_weights": masks.selected, "units_pruned": masks.units_pruned, "units": masks.units,
                    "threshold": masks.threshold, **tally.metrics(),
                })
                bar.update(len(rows), step=f"{method} p_prune={prune:g} p_bern={bern:g} #{repeat}")
    finally:
        evaluate.close()
    return Sweep(
        kind="prune_sweep",
        title=f"{network} · prune {method} ({scope}) · {baseline.samples} images",
        rows=rows,
        info={
            "network": network, **settings.as_dict(), "samples": baseline.samples,
            "devices": distributed.world_size, "baseline": baseline.metrics(),
            "validate_metrics": None if reference_metrics is None else dict(reference_metrics),
            "seconds": time.perf_counter() - started,
            # checked by a digest of the whole state dict before returning; a mismatch raises instead
            "weights_restored_bit_identical": True,
        },
    )


def _criticality_scores(criticality: Any) -> dict[Unit, float]:
    """Channel scores (larger = more critical) from a Ranking, a mapping or a ranking CSV file."""
    if isinstance(criticality, Ranking):
        if criticality.unit != "channel":
            raise SettingError(f"criticality: a ranking of {criticality.unit} units cannot order channels; "
                               "rank with unit='channel'")
        return {channel_unit(row["layer"], int(row["index"])): float(row["score"])
                for row in criticality.levels[0].rows}
    if isinstance(criticality, (str, Path)):
        return read_channel_ranking(criticality)
    if isinstance(criticality, Mapping):
        return {key if isinstance(key, Unit) else channel_unit(*key): float(value)
                for key, value in criticality.items()}
    raise SettingError(f"criticality: expected a Ranking, a ranking.csv path or a mapping of channels to scores, "
                       f"got {type(criticality).__name__}")


def _criticality_order(model: nn.Module, criticality: Any, data: Any, only_a_share: bool, settings: OrderSettings,
                       device: Any, memory_budget_mb: float | None, distributed: Distributed, name: str | None,
                       output: OutputSelector, resume_dir: str | Path | None
                       ) -> tuple[Ranking | None, dict[Unit, float], dict[str, Any]]:
    """The channel scores of the ``criticality`` order: from the given ranking, or (when None) ranked here by
    zeroing every channel on ``data``; with the ranking computed here (or None) and what the sweep records of it."""
    if criticality is not None:
        source = str(criticality) if isinstance(criticality, (str, Path)) else type(criticality).__name__
        return None, _criticality_scores(criticality), {"criticality_source": source}
    if only_a_share:
        raise SettingError("criticality_data: needed to rank channels when data is this rank's share only")
    started = time.perf_counter()
    computed = rank(
        model, data, unit="channel", perturbation="zero", units=list(channel_l1(model, settings)),
        score=settings.criticality_score, method=settings.criticality_method, device=device,
        memory_budget_mb=memory_budget_mb, distributed=distributed, name=name, output=output,
        # the engine's own resume file, keyed by weights, units, data and method
        resume_dir=None if resume_dir is None else Path(resume_dir) / "criticality",
    )
    info = {"criticality_source": "computed", "criticality_perturbation": "zero",
            "criticality_samples": computed.samples, "criticality_seconds": time.perf_counter() - started}
    return computed, _criticality_scores(computed), info


def compare_orders(
    model: nn.Module,
    data: Any,
    *,
    orders: Sequence[ChannelOrder] = OrderSettings.orders,
    ratios: Sequence[float] = OrderSettings.ratios,
    criticality: Ranking | Mapping[Any, float] | str | Path | None = None,
    criticality_data: Any = None,
    criticality_score: Score = OrderSettings.criticality_score,
    criticality_method: CriticalityMethod = OrderSettings.criticality_method,
    repeats: int = OrderSettings.repeats,
    seed: int = OrderSettings.seed,
    include_linear: bool = OrderSettings.include_linear,
    include: Sequence[str] | None = OrderSettings.include,
    exclude: Sequence[str] = OrderSettings.exclude,
    module_types: Sequence[str] | None = OrderSettings.module_types,
    device: Any = None,
    memory_budget_mb: float | None = 4096.0,
    resume_dir: str | Path | None = None,
    progress: Any = False,
    distributed: Distributed | None = None,
    sharded: bool = False,
    forward_context: ForwardContext | None = None,
    precision: str | None = None,
    name: str | None = None,
    output: OutputSelector = None,
) -> Sweep:
    """Zero whole output channels in several orders — least critical first, smallest L1 norm first, at random —
    at the same fractions of channels, and evaluate each (weights restored exactly after every setting).

    The keyword arguments ``orders``, ``ratios``, ``criticality_score`` … ``module_types`` are the comparison's
    settings, documented once in :class:`OrderSettings`, which checks them before the model is touched.

    Args:
        model: the classifier; bit-identical afterwards.
        data: the evaluation data (DataLoader, iterable of batches, or one ``(inputs, targets)`` pair).
        criticality: the channel ranking of the ``criticality`` order: a :class:`~critnet.results.Ranking` of
            channel units, a ``ranking.csv`` path (columns ``layer``, ``index``, ``score``) or a mapping from
            channel units (or ``(layer, index)``) to scores; None = rank here by zeroing every channel.
        criticality_data: the images that ranking uses (default ``data``; pass held-out images so the order is not
            judged on the images it was chosen on).
        device, memory_budget_mb, resume_dir, progress, distributed, sharded, forward_context, precision, name,
            output: as for :func:`prune_sweep` (with ``sharded`` data the ranking needs ``criticality_data``);
            ``output`` also reads the logits of the criticality ranking.

    Returns:
        A :class:`~critnet.results.Sweep` with one row per order, ratio and draw; ``.criticality`` holds the
        ranking computed here.

    Raises:
        CritnetError: one line naming what is at fault, before the model is touched, as for :func:`critnet.rank`.

    >>> import critnet, torch
    >>> model = critnet.load_model("resnet20")
    >>> batch = (torch.randn(16, 3, 32, 32), torch.arange(16) % 10)
    >>> sweep = critnet.compare_orders(model, batch, orders=["l1", "random"], ratios=[0.1])
    >>> [row["order"] for row in sweep.rows]
    ['l1', 'random']
    """
    settings = OrderSettings(orders=orders, ratios=ratios, criticality_score=criticality_score,
                             criticality_method=criticality_method, repeats=repeats, seed=seed,
                             include_linear=include_linear, include=include, exclude=exclude,
                             module_types=module_types)
    check_selector(output)
    started = time.perf_counter()
    network = model_name(model, name)
    # the pruned evaluations' data is read and checked first, so that a bad batch is named before a ranking runs
    distributed, evaluate = _evaluation(model, data, distributed, sharded, forward_context, resume_dir, precision,
                                        device, memory_budget_mb, output)
    computed: Ranking | None = None
    scores = None
    criticality_info: dict[str, Any] = {}
    rows = []
    try:
        if "criticality" in settings.orders:
            computed, scores, criticality_info = _criticality_order(
                model, criticality, evaluate.data if criticality_data is None else criticality_data,
                sharded and criticality_data is None, settings, device, memory_budget_mb, distributed, name, output,
                resume_dir)
        plan = [(order, ratio, repeat, seed + repeat) for ratio in settings.ratios for order in settings.orders
                for repeat in range(repeats if order == "random" else 1)]
        guided_started = time.perf_counter()
        ordered: dict[tuple[str, int], list[Unit]] = {}
        total = len(channel_l1(model, settings))
        with progress_bar(progress, "channel orders", distributed, total=len(plan), step_name="settings") as bar:
            for order, ratio, repeat, draw_seed in plan:
                if (order, draw_seed) not in ordered:
                    ordered[(order, draw_seed)] = channel_order(model, order, selection=settings,
                                                                criticality=scores, seed=draw_seed)
                count = channel_count(ratio, total)
                masks = channel_masks(model, ordered[(order, draw_seed)][:count], settings)
                tally = evaluate(masks)
                rows.append({
                    "network": network, "order": order, "channel_ratio": ratio, "repeat": repeat,
                    "seed": draw_seed if order == "random" else None, "channels_pruned": count, "channels": total,
                    "ratio": masks.ratio, "param_fraction": masks.param_fraction, **tally.metrics(),
                })
                bar.update(len(rows), step=f"{order} channels={ratio:g} #{repeat}")
    finally:
        evaluate.close()
    samples = rows[0]["samples"] if rows else 0
    info = {"network": network, **settings.as_dict(), "samples": samples, **criticality_info,
            "guided_seconds": time.perf_counter() - guided_started, "seconds": time.perf_counter() - started}
    return Sweep(
        kind="prune_guided",
        title=f"{network} · channels pruned by {' / '.join(settings.orders)} order · {samples} images",
        rows=rows,
        info=info,
        criticality=computed,
        series_order=settings.orders,
    )
