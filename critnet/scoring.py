"""Everything about scores, in one place: per-sample loss and top-k hits, their sums (:class:`Tally`), the outcome
of one perturbed unit, the score of an outcome and the sort key that puts the most critical unit first.

Lightning-free: the engine fills the tallies, the ranking orders them, pruning and fault campaigns sum them. Sums
rather than means are kept so that chunks, batches and ranks combine exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from critnet.choices import SCORES, check_choice

if TYPE_CHECKING:  # perturb imports nothing from here, but keep the import graph one-way at runtime
    from critnet.perturb import Unit


def per_sample(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample cross-entropy (float64 copy of the logits-precision value), top-1 and top-5 hits.

    Args:
        logits: ``(variants, batch, classes)``.
        targets: ``(batch,)`` class indices.

    Returns:
        ``(variants, batch)`` tensors: losses (float64), top-1 hits and top-5 hits (bool).
    """
    variants, batch, classes = logits.shape
    flat = logits.reshape(variants * batch, classes)
    # The loss in the logits' precision (what a plain loop computes), summed later in float64.
    losses = F.cross_entropy(flat, targets.repeat(variants), reduction="none").reshape(variants, batch).double()
    k = min(5, classes)
    top = flat.topk(k, dim=1).indices.reshape(variants, batch, k)
    # A row with a NaN logit predicts nothing (topk would rank the NaN first and count it as a hit).
    valid = ~torch.isnan(flat).any(dim=1).reshape(variants, batch, 1)
    hits = (top == targets.view(1, batch, 1)) & valid
    return losses, hits[..., 0], hits.any(dim=2)


#: Two-sided 95 % normal quantile of the per-unit intervals (``delta_loss_lo``/``_hi`` = score ± Z95 · se).
Z95 = NormalDist().inv_cdf(0.975)


@dataclass
class Tally:
    """Sums over a set of samples: float64 sum of per-sample cross-entropy, top-1/top-5 hits, sample count.

    A perturbed unit's tally also carries sums *paired* with the unperturbed model on the same samples (``paired``
    of them): the squared per-sample loss differences and how many samples changed their top-1/top-5 hit. They give
    the standard errors of Δloss and of the accuracy drops (:func:`paired_error`); they stay 0 where no baseline
    was at hand (the baseline itself, pruning, fault campaigns).
    """

    loss_sum: float = 0.0
    top1_correct: int = 0
    top5_correct: int = 0
    samples: int = 0
    #: Σ (perturbed loss − unperturbed loss)² over the paired samples.
    delta_sq_sum: float = 0.0
    #: Paired samples whose top-1 (top-5) hit differs from the unperturbed model's.
    top1_changed: int = 0
    top5_changed: int = 0
    paired: int = 0

    @property
    def loss(self) -> float:
        """Mean cross-entropy; NaN when no samples were counted (inf/NaN sums propagate)."""
        if self.samples == 0:
            return math.nan
        return self.loss_sum / self.samples

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent (micro: fraction of samples)."""
        return math.nan if self.samples == 0 else 100.0 * self.top1_correct / self.samples

    @property
    def top5(self) -> float:
        """Top-5 accuracy in percent (micro: fraction of samples)."""
        return math.nan if self.samples == 0 else 100.0 * self.top5_correct / self.samples

    def metrics(self) -> dict[str, float | int]:
        """``loss`` (mean), ``top1``, ``top5`` (percent) and ``samples``: a tally as the reports record it."""
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "samples": self.samples}

    def summary(self) -> dict[str, float | int]:
        """``top1``, ``top5`` (percent), ``loss`` (mean), ``samples`` and the correct counts behind the percentages."""
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.samples,
                "top1_correct": self.top1_correct, "top5_correct": self.top5_correct}

    def __add__(self, other: Tally) -> Tally:
        if not isinstance(other, Tally):
            return NotImplemented
        return Tally(
            loss_sum=self.loss_sum + other.loss_sum,
            top1_correct=self.top1_correct + other.top1_correct,
            top5_correct=self.top5_correct + other.top5_correct,
            samples=self.samples + other.samples,
            delta_sq_sum=self.delta_sq_sum + other.delta_sq_sum,
            top1_changed=self.top1_changed + other.top1_changed,
            top5_changed=self.top5_changed + other.top5_changed,
            paired=self.paired + other.paired,
        )


@dataclass
class UnitOutcome:
    """The evaluation of one perturbed unit (or of the unperturbed model when ``unit`` is None).

    ``halves`` are the tallies over the two disjoint halves of the evaluation samples, the even and the odd sample
    indices (interleaved, so both halves see every class of a class-sorted dataset); ``exact`` is False when ``total`` is not a full evaluation (taylor estimates, or units that hybrid/halving
    did not evaluate on the full set), and ``estimate`` holds the Taylor estimate of Δloss where one was computed.
    """

    unit: Unit | None
    total: Tally
    halves: tuple[Tally, Tally]
    exact: bool = True
    estimate: float | None = None
    #: The unperturbed tally over the same samples, when ``total`` covers only part of the set (a unit that
    #: ``halving`` eliminated early); its scores and errors are then paired with this instead of the baseline.
    reference: Tally | None = None


def score_of(outcome_tally: Tally, baseline: Tally, score: str) -> float:
    """The score of a perturbed tally against the unperturbed baseline; larger = more critical.

    ``loss``: the perturbed mean loss; ``delta_loss``: perturbed minus baseline loss; ``top1_drop``/``top5_drop``:
    baseline minus perturbed accuracy, in percentage points.
    """
    if score == "loss":
        return outcome_tally.loss
    if score == "delta_loss":
        return outcome_tally.loss - baseline.loss
    if score == "top1_drop":
        return baseline.top1 - outcome_tally.top1
    if score == "top5_drop":
        return baseline.top5 - outcome_tally.top5
    check_choice("score", score, SCORES)
    raise AssertionError(score)


def paired_error(outcome_tally: Tally, baseline: Tally, score: str) -> float:
    """The standard error of :func:`score_of` from the per-sample paired differences (perturbed minus unperturbed
    on the same image): ``sqrt(s² / n)`` with ``s²`` their sample variance. NaN when the tally has no paired sums
    for all its samples, or fewer than 2 samples.

    It treats the evaluated images as a sample of the data the network will see, so it says whether another set
    of images would rank the unit the same. ``loss`` and ``delta_loss`` share it (the baseline is the same for
    every unit); accuracy drops are in percentage points, their differences being −1, 0 or 1 per image.

    >>> base = Tally(loss_sum=4.0, top1_correct=3, top5_correct=4, samples=4)
    >>> hit = Tally(loss_sum=6.0, top1_correct=2, top5_correct=4, samples=4, delta_sq_sum=2.0, top1_changed=1,
    ...             paired=4)
    >>> round(paired_error(hit, base, "delta_loss"), 4), paired_error(hit, base, "top1_drop")
    (0.2887, 25.0)
    """
    n = outcome_tally.samples
    if n < 2 or outcome_tally.paired != n or baseline.samples != n:
        return math.nan
    if score in ("loss", "delta_loss"):
        mean = (outcome_tally.loss_sum - baseline.loss_sum) / n
        squares, scale = outcome_tally.delta_sq_sum, 1.0
    else:
        check_choice("score", score, SCORES)
        top = score == "top1_drop"
        correct = (baseline.top1_correct - outcome_tally.top1_correct if top
                   else baseline.top5_correct - outcome_tally.top5_correct)
        mean, scale = correct / n, 100.0
        squares = float(outcome_tally.top1_changed if top else outcome_tally.top5_changed)  # d² = |d| for d ∈ {-1, 0, 1}
    if not (math.isfinite(mean) and math.isfinite(squares)):
        return math.nan
    variance = max(squares - n * mean * mean, 0.0) / (n - 1)
    return scale * math.sqrt(variance / n)


def criticality_key(score: float) -> tuple[int, float]:
    """Sort key putting the most critical first: NaN, then +inf, then finite scores descending, then -inf.

    A NaN or infinite loss means the perturbation broke the network, so it ranks as most critical; Python's sort is
    stable, so ties keep the order of the units.
    """
    if math.isnan(score):
        return (0, 0.0)
    if score == math.inf:
        return (1, 0.0)
    if score == -math.inf:
        return (3, 0.0)
    return (2, -score)


def ranking_key(tally: Tally, baseline: Tally, score: str) -> tuple[int, tuple[int, float]]:
    """Sort key, most critical first: a NaN or infinite loss ranks above every finite one whatever the score
    (the perturbation broke the network), then :func:`criticality_key` of the score."""
    loss = tally.loss
    broken = math.isnan(loss) or math.isinf(loss)
    return (0 if broken else 1, criticality_key(score_of(tally, baseline, score)))


def estimated_score(outcome: UnitOutcome, baseline: UnitOutcome, score: str) -> float:
    """The score implied by a Taylor estimate of Δloss (NaN for accuracy scores, which have no estimate)."""
    if outcome.estimate is None:
        return math.nan
    if score == "loss":
        return baseline.total.loss + outcome.estimate
    if score == "delta_loss":
        return outcome.estimate
    return math.nan


def outcome_score(outcome: UnitOutcome, baseline: UnitOutcome, score: str) -> float:
    """The unit's score: over its evaluated samples (paired with the unperturbed model on the same samples), or
    from its estimate when it was not evaluated at all."""
    if outcome.total.samples == 0:
        return estimated_score(outcome, baseline, score)
    return score_of(outcome.total, reference_of(outcome, baseline), score)


def reference_of(outcome: UnitOutcome, baseline: UnitOutcome) -> Tally:
    """The unperturbed tally ``outcome`` is compared with: over its own samples if it has one, else the baseline."""
    return outcome.reference if outcome.reference is not None else baseline.total


def per_sample_criticality(samples: tuple, baseline: tuple, positions: Tensor, score: str) -> Tensor:
    """Per-sample scores (larger = more critical) at ``positions``, paired with the unperturbed result of the
    same sample: the per-image counterpart of :func:`score_of` (the ``loss`` score pairs like ``delta_loss``, since
    the baseline is the same for every unit)."""
    losses, top1, top5 = samples
    if score in ("loss", "delta_loss"):
        return losses[positions] - baseline[0][positions]
    hits, base = (top1, baseline[1]) if score == "top1_drop" else (top5, baseline[2])
    return base[positions].double() - hits[positions].double()


# The two halves of the evaluation set.
# Per-sample loss and top-k hits of logits, summed (float64) into the tallies of the two halves of the samples.
# 
# The halves interleave: samples with an even index in the evaluation set form the first half, odd ones the second.
# Datasets such as ImageFolder trees are sorted by class, so first-half/second-half splits would be class-disjoint and
# their disagreement would measure class specificity rather than whether the evaluation set is large enough.
def in_first_half(offset: int, batch: int, device: torch.device | str | None = None) -> Tensor:
    """Which samples of a batch starting at ``offset`` belong to the first (even-index) half of the set."""
    return (torch.arange(offset, offset + batch, device=device) % 2) == 0


def sum_halves(losses: Tensor, top1: Tensor, top5: Tensor, offset: int,
               reference: tuple[Tensor, Tensor, Tensor] | None = None) -> list[tuple[Tally, Tally]]:
    """Per variant: the tallies of the samples of this batch in the first and in the second half of the set.

    ``reference`` holds the unperturbed model's ``(losses, top1, top5)`` for the same samples (``(batch,)``
    tensors); with it the tallies also carry the paired sums behind the standard errors (see :class:`Tally`).
    """
    first = in_first_half(offset, losses.shape[1], losses.device)
    second = ~first
    columns = [losses, top1.double(), top5.double()]
    if reference is not None:
        base_losses, base_top1, base_top5 = (r.to(losses.device) for r in reference)
        columns += [(losses - base_losses).square(), (top1 != base_top1).double(), (top5 != base_top5).double()]
    # Indexing, not multiplying by a 0/1 mask: an infinite loss times 0 would turn into NaN.
    sums = torch.stack([c[:, half].sum(1) for c in columns for half in (first, second)], dim=1).cpu().tolist()
    counts = (int(first.sum()), losses.shape[1] - int(first.sum()))
    pairs = []
    for s in sums:
        halves = []
        for h in (0, 1):
            paired = {} if reference is None else dict(delta_sq_sum=s[6 + h], top1_changed=int(s[8 + h]),
                                                       top5_changed=int(s[10 + h]), paired=counts[h])
            halves.append(Tally(s[h], int(s[2 + h]), int(s[4 + h]), counts[h], **paired))
        pairs.append((halves[0], halves[1]))
    return pairs


class TallyPair:
    """Running tallies of one variant over the two (even/odd) halves of the set."""

    __slots__ = ("first", "second")

    def __init__(self) -> None:
        self.first = Tally()
        self.second = Tally()

    def add(self, pair: tuple[Tally, Tally]) -> None:
        self.first = self.first + pair[0]
        self.second = self.second + pair[1]

    @property
    def halves(self) -> tuple[Tally, Tally]:
        return (self.first, self.second)

    @property
    def total(self) -> Tally:
        return self.first + self.second
