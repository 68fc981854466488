"""``fault_campaign``: draw (or replay) a fault list, evaluate every fault exactly, and return a :class:`Campaign`."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from critnet.choices import SettingError, check_choice, check_fraction
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
from critnet.faults.injection import FAULT_MODELS, FAULT_TARGETS, Fault, read_fault_list
from critnet.modes import evaluation_mode
from critnet.outputs import OutputSelector, check_selector, describe_selector
from critnet.console import progress_bar
from critnet.results.campaign_result import Campaign

StratifyBy = Literal["layer", "bit"]
STRATIFY_KEYS: tuple[str, ...] = get_args(StratifyBy)


def check_campaign_settings(*, target: str = "weights", fault_model: str = "bitflip", bits: Sequence[int] | None = None,
                            faults: int | str | None = None, error_margin: float = 0.01, confidence: float = 0.99,
                            stratify: Sequence[str] = ("layer",), ber: float | None = None,
                            critical_threshold: float = 0.0, seed: int = 0) -> None:
    """Raise a one-line :class:`SettingError` naming the first setting outside what is allowed.

    >>> check_campaign_settings(bits=[30, 31], faults=100)
    """
    check_choice("target", target, FAULT_TARGETS)
    check_choice("fault_model", fault_model, FAULT_MODELS)
    for position, bit in enumerate(bits if bits is not None else []):
        if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 31:
            raise SettingError(f"bits[{position}]: {bit!r} is not a bit position 0..31 of a float32 value")
    if bits is not None and (not bits or len(set(bits)) != len(bits)):
        raise SettingError(f"bits: {list(bits)!r} must list distinct bit positions 0..31 (at least one)")
    if not (faults is None or faults == "exhaustive" or (isinstance(faults, int) and not isinstance(faults, bool)
                                                           and faults >= 1)):
        raise SettingError(f"faults: {faults!r} is not null (Leveugle's sample size), a positive integer or 'exhaustive'")
    if not 0 < check_fraction("error_margin", error_margin) < 1:
        raise SettingError(f"error_margin: {error_margin!r} is not in (0, 1)")
    if not 0 < check_fraction("confidence", confidence) < 1:
        raise SettingError(f"confidence: {confidence!r} is not in (0, 1)")
    stratify = [stratify] if isinstance(stratify, str) else list(stratify)
    for position, key in enumerate(stratify):
        check_choice(f"stratify[{position}]", key, STRATIFY_KEYS)
    if "layer" not in stratify:
        raise SettingError(f"stratify: {stratify!r} must contain 'layer' (layer or layer and bit)")
    check_fraction("critical_threshold", critical_threshold)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SettingError(f"seed: {seed!r} is not an integer")
    if fault_model == "ber":
        if ber is None or not 0 < check_fraction("ber", ber) < 1:
            raise SettingError(f"ber: {ber!r} must be a bit-error rate in (0, 1) when fault_model is 'ber'")
        if target != "weights":
            raise SettingError("fault_model: 'ber' draws are defined for target 'weights'")
    elif ber is not None:
        raise SettingError(f"ber: {ber!r} is only used with fault_model 'ber', not {fault_model!r}")


def fault_campaign(
    model: nn.Module,
    data: Any,
    *,
    target: str = "weights",
    layers: Sequence[str] | None = None,
    module_types: Sequence[str] | None = DEFAULT_MODULE_TYPES,
    bits: Sequence[int] | None = None,
    fault_model: str = "bitflip",
    ber: float | None = None,
    faults: int | str | None = None,
    error_margin: float = 0.01,
    confidence: float = 0.99,
    stratify: Sequence[str] = ("layer",),
    seed: int = 0,
    critical_threshold: float = 0.0,
    fault_list: str | Path | None = None,
    resume_dir: str | Path | None = None,
    distributed: Distributed | None = None,
    device: torch.device | str | None = None,
    memory_budget_mb: float | None = None,
    progress: Any = False,
    output: OutputSelector = None,
) -> Campaign:
    """Inject faults into ``model`` one at a time and count, per fault, how many images change.

    Args:
        model: a float32 classifier in eval mode; bit-identical afterwards (also when the campaign raises).
        data: ``(inputs, targets)`` batches: a DataLoader, a list, or one pair of tensors.
        target: ``weights`` (parameters) or ``activations`` (module outputs, through a forward hook).
        layers: regular expressions searched in parameter names (weights; default ``[r"\\.weight$"]``) or module
            names (activations; default all modules of ``module_types``).
        module_types: class names of the owning modules; ``None`` = any (to reach BatchNorm parameters and biases,
            pass ``layers=[".*"], module_types=None``).
        bits: bit positions (0 = lowest mantissa bit, 23–30 exponent, 31 sign); default all 32.
        fault_model: ``bitflip``, ``stuck_at_0``, ``stuck_at_1`` (one site per fault) or ``ber`` (every selected
            bit flips independently with probability ``ber``; several sites per fault).
        ber: the bit-error rate of ``fault_model="ber"``.
        faults: ``None`` = Leveugle's sample size per stratum for ``error_margin`` at ``confidence`` (finite-population
            corrected), an integer = that many faults in all (shared among strata in proportion to their size;
            the number of trials for ``ber``), ``"exhaustive"`` = every possible fault.
        error_margin: the half-width the sizing aims at (worst case p = 0.5).
        confidence: the confidence of that margin.
        stratify: ``("layer",)`` or ``("layer", "bit")``: the strata sampled (and sized) separately.
        seed: the draw's seed (per stratum combined with its name; never ``hash()``).
        critical_threshold: a fault is critical when its SDC-1 rate over the images exceeds this fraction.
        fault_list: replay this ``faults.csv`` instead of drawing (its original values must match ``model``); give
            the ``layers``/``bits``/``stratify`` it was drawn with, since the rate tables cover faults in those strata.
        resume_dir: append finished faults here and skip them when the same campaign runs again.
        distributed: the job's processes (:meth:`Distributed.current` under DDP); faults are shared among ranks,
            every rank holds the data, one gather collects the counts, and the results equal one process.
        device: where the evaluation batches are held (default: where they come from).
        memory_budget_mb: memory for held batches and cached activations.
        progress: draw a rich progress bar (or join a live ``rich.progress.Progress``), as :func:`critnet.rank`
            does; a function is instead called with (faults done, faults to do on this rank).
        output: where the logits are in what the model returns (:func:`critnet.outputs.logits_of`): ``None`` (the
            default) takes a tensor as it is and reads ``.logits`` (attribute or key) from anything else, e.g. a
            Hugging Face ``ModelOutput`` or a dict; a key (``"scores"``), an index (``0`` for a tuple) or a
            callable that takes the model's output and returns the logits tensor selects them explicitly. With
            ``resume_dir`` a key or index keys the partial-results file as it is, a callable by its module and
            qualified name.

    Returns:
        The :class:`Campaign` (the same on every rank); nothing is written (``Campaign.save`` writes the reports).

    Raises:
        SettingError: a setting outside what is allowed (one line naming it).
        CritnetError: (one line, before any fault is injected) data that is not ``(inputs, targets)`` batches of
            class indices within the model's classes, inputs the model rejects, or logits that cannot be read (see
            :func:`critnet.evaluation.check_fit`).

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    >>> data = (torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,)))
    >>> campaign = fault_campaign(model, data, faults=20, seed=1)
    >>> len(campaign.faults), sum(f["images"] for f in campaign.faults)
    (20, 160)
    """
    check_campaign_settings(target=target, fault_model=fault_model, bits=bits, faults=faults,
                            error_margin=error_margin, confidence=confidence, stratify=stratify, ber=ber,
                            critical_threshold=critical_threshold, seed=seed)
    check_selector(output)
    stratify = (stratify,) if isinstance(stratify, str) else tuple(stratify)
    bits = tuple(bits) if bits is not None else tuple(range(32))
    distributed = distributed or Distributed.single()
    started = time.perf_counter()
    evaluation = as_evaluation_set(data, device=device, memory_budget_mb=memory_budget_mb)
    check_fit(model, evaluation, output=output)
    checksum = state_digest(model)
    with evaluation_mode(model, evaluation.device):  # selecting activation sites may run the model once
        members = selected_layers(model, target, layers, module_types, next(iter(evaluation))[0])
    strata = build_strata(members, bits, stratify, fault_model)
    if fault_list is not None:
        fault_list_ = read_fault_list(fault_list, model)
    else:
        plan_sample(strata, faults, error_margin, confidence)
        fault_list_ = draw_faults(model, strata, target=target, fault_model=fault_model, seed=seed, ber=ber)
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
    settings = {"target": target, "fault_model": fault_model, "ber": ber, "layers": list(members), "bits": list(bits),
                "faults": faults, "error_margin": error_margin, "confidence": confidence, "stratify": list(stratify),
                "seed": seed, "critical_threshold": critical_threshold,
                "fault_list": None if fault_list is None else str(fault_list), "output": describe_selector(output)}
    return Campaign(
        fault_list=fault_list_,
        counts=[counts[f.id] for f in fault_list_],
        strata=strata,
        sizing=sizing_rows(strata, _drawn_per_stratum(strata, fault_list_), error_margin, confidence),
        settings=settings,
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


__all__ = ["STRATIFY_KEYS", "StratifyBy", "check_campaign_settings", "fault_campaign"]
