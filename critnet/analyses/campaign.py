"""``fault_campaign``: draw (or replay) a fault list, evaluate every fault exactly, and return a :class:`Campaign`."""

# Real annotations, not postponed: a settings dataclass is a callback's arguments (see critnet.choices).

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from critnet.choices import (
    FAULT_MODELS,
    FAULT_TARGETS,
    STRATIFY_KEYS,
    FaultModel,
    FaultTarget,
    SettingError,
    StratifyKey,
    check_choice,
    check_fraction,
    field_values,
)
from critnet.console import progress_bar
from critnet.digests import state_digest
from critnet.distributed import Distributed
from critnet.engine.jobs import Jobs, fingerprint
from critnet.evaluation import check_fit
from critnet.evaluation_set import as_evaluation_set
from critnet.faults.draw import (
    DEFAULT_MODULE_TYPES,
    Stratum,
    build_strata,
    draw_faults,
    plan_sample,
    selected_layers,
    sizing_rows,
)
from critnet.faults.evaluator import COUNTS, FaultEvaluator
from critnet.faults.injection import Fault, read_fault_list
from critnet.modes import evaluation_mode
from critnet.outputs import OutputSelector, check_selector, describe_selector
from critnet.results.campaign_result import Campaign
from critnet.selection import Selection


@dataclass(eq=False)
class CampaignSettings(Selection):
    """The settings of :func:`fault_campaign` and of the :class:`~critnet.callbacks.FaultCampaign` callback, as
    ``campaign.json`` records them (declared once, checked when built: see :mod:`critnet.choices`). ``include``,
    ``exclude`` and ``module_types`` select the fault sites (:class:`~critnet.selection.Selection`).

    Args:
        include: Regular expressions searched in parameter names (weights; null = ``[\\.weight$]``) or module names
            (activations; null = every module of ``module_types``); a name is kept if any matches.
        module_types: Class names of the owning modules; null = any for weights (with ``include: [".*"]`` this
            reaches BatchNorm parameters and biases), ``[Conv2d, Linear]`` for activations.
        layers: Another name of ``include`` (the one it had first); giving both is an error.
        target: ``weights`` (parameters) or ``activations`` (module outputs, through a forward hook).
        fault_model: ``bitflip``, ``stuck_at_0``, ``stuck_at_1`` (one bit per fault) or ``ber`` (every selected bit
            flips independently with probability ``ber``: several flips per inference; weights only).
        bits: Bit positions struck (the lowest one of a multi-bit upset), 0 = the lowest bit of the stored
            value: float32 0-22 mantissa, 23-30 exponent, 31 sign; float16 0-9, 10-14, 15; bfloat16 0-6, 7-14, 15;
            int8 (quantized weights) 0-6 value, 7 sign; uint8 (quantized activations) 0-7. null = every bit of each
            layer's format (see :mod:`critnet.formats`).
        upset_width: Adjacent bits one fault strikes in its value, from the drawn bit upwards: 1 = a single-bit
            upset, 2 or more = a multi-bit upset (every bit of it flipped or stuck alike).
        ber: The bit-error rate of ``fault_model: ber``, in (0, 1).
        faults: null = Leveugle's sample size per stratum for ``error_margin`` at ``confidence``
            (finite-population corrected); an integer = that many faults in all (shared among strata in proportion
            to their size; the number of trials for ``ber``); ``exhaustive`` = every possible fault.
        error_margin: Half-width the sizing aims at, for a rate of 0.5 (the worst case).
        confidence: Confidence of that margin.
        stratify: ``[layer]`` or ``[layer, bit]``: what is sampled and sized separately.
        seed: Seed of the draw (per stratum combined with its name; never ``hash()``).
        critical_threshold: A fault is critical when its SDC-1 rate over the images exceeds this fraction.
        fault_list: Replay this ``faults.csv`` instead of drawing (its original values must match the model); give
            the selection, ``bits`` and ``stratify`` it was drawn with, since the rate tables cover those strata.
        output: Where the logits are in what the model returns, as the ranking's ``output``
            (:class:`~critnet.analyses.ranking.RankSettings`); null: a tensor as it is, else its ``.logits``.

    >>> CampaignSettings(layers=["fc"], bits=[30, 31]).include
    ('fc',)
    """

    module_types: Sequence[str] | None = DEFAULT_MODULE_TYPES
    layers: Sequence[str] | None = None
    target: FaultTarget = "weights"
    fault_model: FaultModel = "bitflip"
    bits: Sequence[int] | None = None
    upset_width: int = 1
    ber: float | None = None
    faults: int | Literal["exhaustive"] | None = None
    error_margin: float = 0.01
    confidence: float = 0.99
    stratify: Sequence[StratifyKey] = ("layer",)
    seed: int = 0
    critical_threshold: float = 0.0
    fault_list: str | None = None
    output: OutputSelector = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            if self.include is not None:
                raise SettingError("layers: another name of include; give one of them, not both")
            self.include, self.layers = self.layers, None
        super().__post_init__()
        check_choice("target", self.target, FAULT_TARGETS)
        check_choice("fault_model", self.fault_model, FAULT_MODELS)
        if self.bits is not None:
            self.bits = tuple(self.bits)
            for position, bit in enumerate(self.bits):
                if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 31:
                    raise SettingError(f"bits[{position}]: {bit!r} is not a bit position 0..31 (the widest format, "
                                       "float32, has 32 bits)")
            if not self.bits or len(set(self.bits)) != len(self.bits):
                raise SettingError(f"bits: {list(self.bits)!r} must list distinct bit positions (at least one)")
        if isinstance(self.upset_width, bool) or not isinstance(self.upset_width, int) or \
                not 1 <= self.upset_width <= 32:
            raise SettingError(f"upset_width: {self.upset_width!r} is not a number of adjacent bits 1..32")
        # type(), not isinstance(): True is an int but no number of faults
        if not (self.faults in (None, "exhaustive") or (type(self.faults) is int and self.faults >= 1)):
            raise SettingError(f"faults: {self.faults!r} is not null (Leveugle's sample size), a positive integer "
                               "or 'exhaustive'")
        for key in ("error_margin", "confidence"):
            if not 0 < check_fraction(key, getattr(self, key)) < 1:
                raise SettingError(f"{key}: {getattr(self, key)!r} is not in (0, 1)")
        self.stratify = (self.stratify,) if isinstance(self.stratify, str) else tuple(self.stratify)
        for position, key in enumerate(self.stratify):
            check_choice(f"stratify[{position}]", key, STRATIFY_KEYS)
        if "layer" not in self.stratify:
            raise SettingError(f"stratify: {list(self.stratify)!r} must contain 'layer' (layer or layer and bit)")
        check_fraction("critical_threshold", self.critical_threshold)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SettingError(f"seed: {self.seed!r} is not an integer")
        if self.fault_model != "ber":
            if self.ber is not None:
                raise SettingError(f"ber: {self.ber!r} is only used with fault_model 'ber', not {self.fault_model!r}")
        elif self.ber is None or not 0 < check_fraction("ber", self.ber) < 1:
            raise SettingError(f"ber: {self.ber!r} must be a bit-error rate in (0, 1) when fault_model is 'ber'")
        elif self.target != "weights":
            raise SettingError("fault_model: 'ber' draws are defined for target 'weights'")
        elif self.upset_width != 1:
            raise SettingError("upset_width: 'ber' draws flip bits independently; give upset_width 1")
        check_selector(self.output)

    def as_dict(self, layers: Sequence[str], formats: dict[str, str] | None = None) -> dict[str, Any]:
        """The settings as ``campaign.json`` records them: every field, with ``layers`` the names selected and
        ``formats`` their number formats."""
        return {**field_values(self, CampaignSettings), **Selection.as_dict(self), "layers": list(layers),
                "formats": dict(formats or {}),
                "bits": None if self.bits is None else list(self.bits), "stratify": list(self.stratify),
                "fault_list": None if self.fault_list is None else str(self.fault_list),
                "output": describe_selector(self.output)}


def fault_campaign(
    model: nn.Module,
    data: Any,
    *,
    target: FaultTarget = CampaignSettings.target,
    layers: Sequence[str] | None = CampaignSettings.layers,
    include: Sequence[str] | None = CampaignSettings.include,
    exclude: Sequence[str] = CampaignSettings.exclude,
    module_types: Sequence[str] | None = CampaignSettings.module_types,
    bits: Sequence[int] | None = CampaignSettings.bits,
    upset_width: int = CampaignSettings.upset_width,
    fault_model: FaultModel = CampaignSettings.fault_model,
    ber: float | None = CampaignSettings.ber,
    faults: int | Literal["exhaustive"] | None = CampaignSettings.faults,
    error_margin: float = CampaignSettings.error_margin,
    confidence: float = CampaignSettings.confidence,
    stratify: Sequence[StratifyKey] = CampaignSettings.stratify,
    seed: int = CampaignSettings.seed,
    critical_threshold: float = CampaignSettings.critical_threshold,
    fault_list: str | Path | None = CampaignSettings.fault_list,
    output: OutputSelector = CampaignSettings.output,
    resume_dir: str | Path | None = None,
    distributed: Distributed | None = None,
    device: torch.device | str | None = None,
    memory_budget_mb: float | None = None,
    progress: Any = False,
) -> Campaign:
    """Inject faults into ``model`` one at a time and count, per fault, how many images change.

    The keyword arguments ``target`` … ``output`` are the campaign's settings, documented once in
    :class:`CampaignSettings`, which checks them before the model is touched.

    Args:
        model: a classifier in eval mode, its values stored as float32, float16, bfloat16 or int8 (a quantized
            model: :func:`critnet.quantize_int8`); bit-identical afterwards (also when the campaign raises).
        data: ``(inputs, targets)`` batches: a DataLoader, a list, or one pair of tensors.
        resume_dir: append finished faults here and skip them when the same campaign runs again.
        distributed: the job's processes (:meth:`Distributed.current` under DDP); faults are shared among ranks,
            every rank holds the data, one gather collects the counts, and the results equal one process.
        device: where the evaluation batches are held (default: where they come from).
        memory_budget_mb: memory for held batches and cached activations.
        progress: draw a rich progress bar (or join a live ``rich.progress.Progress``), as :func:`critnet.rank`
            does; a function is instead called with (faults done, faults to do on this rank).

    Returns:
        The :class:`Campaign` (the same on every rank); nothing is written (``Campaign.report`` writes the files).

    Raises:
        CritnetError: (one line, before any fault is injected) a setting (:class:`SettingError`), data that is not
            ``(inputs, targets)`` batches of class indices within the model's classes, inputs the model rejects, or
            logits that cannot be read (see :func:`critnet.evaluation.check_fit`).

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    >>> data = (torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,)))
    >>> campaign = fault_campaign(model, data, faults=20, seed=1)
    >>> len(campaign.faults), sum(f["images"] for f in campaign.faults)
    (20, 160)
    """
    settings = CampaignSettings(include, exclude, module_types, layers=layers, target=target,
                                fault_model=fault_model, bits=bits, upset_width=upset_width, ber=ber, faults=faults, error_margin=error_margin,
                                confidence=confidence, stratify=stratify, seed=seed,
                                critical_threshold=critical_threshold, fault_list=fault_list, output=output)
    distributed = distributed or Distributed.single()
    started = time.perf_counter()
    evaluation = as_evaluation_set(data, device=device, memory_budget_mb=memory_budget_mb)
    check_fit(model, evaluation, output=output)
    checksum = state_digest(model)
    with evaluation_mode(model, evaluation.device):  # selecting activation sites runs the model once
        members = selected_layers(model, target, settings, next(iter(evaluation))[0])
    strata = build_strata(members, settings.bits, settings.stratify, fault_model, settings.upset_width)
    if fault_list is not None:
        fault_list_ = read_fault_list(fault_list, model)
    else:
        plan_sample(strata, faults, error_margin, confidence)
        fault_list_ = draw_faults(model, strata, target=target, fault_model=fault_model, seed=seed, ber=ber,
                                  width=settings.upset_width)
    # eval mode (BatchNorm running statistics) and exact GPU arithmetic for the golden run and every fault
    with evaluation_mode(model, evaluation.device):
        evaluator = FaultEvaluator(model, evaluation, memory_budget_mb, output=output)
        key = None if resume_dir is None else fingerprint(
            "faults", model=checksum, data=evaluation.checksum, faults=[f.list_row() for f in fault_list_],
            output=describe_selector(output))
        with progress_bar(progress, f"faults · {fault_model} · {target}", distributed, step_name="faults") as bar, \
                Jobs(distributed, resume_dir, key, progress=bar.update) as jobs:
            counts = jobs.run("fault", [(f.id, f) for f in fault_list_], evaluator.run, COUNTS, evaluator.costs)
    if checksum != state_digest(model):  # the injection restores bit views; this guards the guarantee itself
        raise RuntimeError("fault campaign: the model's parameters changed during the campaign")
    return Campaign(
        fault_list=fault_list_,
        counts=[counts[f.id] for f in fault_list_],
        strata=strata,
        sizing=sizing_rows(strata, _drawn_per_stratum(strata, fault_list_), error_margin, confidence),
        settings=settings.as_dict(layers=list(members),
                                  formats={name: layer.format.name for name, layer in members.items()}),
        golden={"images": evaluation.samples, "correct": int(evaluator.golden.correct.sum()),
                "top1": 100.0 * float(evaluator.golden.correct.double().mean())},
        info={"model_checksum": checksum, "data_checksum": evaluation.checksum, "devices": distributed.world_size,
              "resumed_faults": jobs.resumed, "shortcut_fallbacks": dict(evaluator.fallbacks),
              "engine": dict(evaluator.stats),
              "elapsed_s": round(time.perf_counter() - started, 3)},
    )


def _drawn_per_stratum(strata: list[Stratum], faults: Sequence[Fault]) -> dict[str, int]:
    by_label: dict[str, int] = {}
    if len(strata) == 1 and math.isinf(strata[0].population):
        return {strata[0].label: len(faults)}
    index = {(s.layer, b): s.label for s in strata for b in s.bits}
    for fault in faults:
        if len(fault.sites) == 1:
            label = index.get((fault.sites[0].parameter, fault.sites[0].bit))
            if label is not None:
                by_label[label] = by_label.get(label, 0) + 1
    return by_label


__all__ = ["CampaignSettings", "fault_campaign"]
