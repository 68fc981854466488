"""The sequential test of ``method="halving"``: which units can no longer be among the ``top_k`` most critical.

Every unit still in the race is evaluated on a growing random sample of the evaluation set: each stage adds images
drawn without replacement (a seeded permutation, so every stage is spread over the whole, class-sorted set). After
each stage but the last, every unit's *full-set* score — the mean of its per-image paired differences over all
``n`` images — gets a lower and an upper confidence bound from the images seen so far, and a unit is eliminated when
its upper bound falls below the ``top_k``-th largest lower bound. Units left after the last stage have been
evaluated on every image: their scores are the exact full-set scores, and the top ``top_k`` among them is reported.

Error probability. If every bound used holds, no true top-``top_k`` unit is ever eliminated: eliminating a true top
unit ``v`` needs either ``v``'s own upper bound to fail, or ``top_k`` units with lower bounds above ``v``'s score,
one of which is not a true top unit and so has a failed lower bound. Only one side of each unit matters (the upper
bound of a true top unit, the lower bound of any other), so a Bonferroni share ``(1 − top_k_confidence) / units``
per one-sided bound sequence makes the top ``top_k`` right with probability at least ``top_k_confidence``, under any
dependence between units (they share the same images).

Two bounds (:data:`critnet.choices.BOUNDS`):

``betting`` (the default; finite-sample). Each bound is a confidence sequence for the mean of a finite population
sampled without replacement, built by betting (Waudby-Smith & Ramdas, "Confidence sequences for sampling without
replacement", NeurIPS 2020; "Estimating means of bounded random variables by betting", JRSS-B 2024): for a
candidate mean ``m``, a gambler bets on each new image's value against the mean ``m`` implies for the images not yet
seen; her capital is a nonnegative martingale when ``m`` is the true mean, so by Ville's inequality it ever reaches
``1/α`` with probability at most ``α``. The candidates at which it did are excluded; the bound is the edge of what is
left. This holds at every sample size at once, so the stages can be as fine as the engine likes with no correction
for the number of looks. It needs the range of a per-image value: a top-1/top-5 change lies in ``[−1, 1]``; a
per-image Δloss lies in ``[−loss_i, clip]``: ``−loss_i`` because a loss is never negative, and ``clip`` is declared
(``delta_loss_clip``). Values above the clip are clipped for the bound only (reported scores are never clipped);
the test records the largest value it saw and calls its guarantee void if any value exceeded the clip.

``normal`` (opt-in; nominal). Normal intervals for a mean estimated from a simple random sample without replacement,
with the finite-population correction ``(n − m) / (n − 1)``, at fixed doubling stages; Bonferroni over
``units × tests``. With a control variate ``x`` whose full-set mean is known (the unit's per-image first-order
Taylor estimate), the regression estimator ``ȳ + b (X̄ − x̄)`` replaces the plain mean and its standard error is that
of the residuals. These are large-sample (Cochran) results used far in the tail (a few 1e-6 per bound), where
per-image Δloss is heavy-tailed, so the stated level is nominal: a unit whose damage sits on a rare 1 % of the
images can be eliminated with none of them seen (``bench/topk_coverage.py`` measures how often).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

#: Images in the first stage.
FIRST_STAGE = 256
#: Recorded in resume fingerprints: partial results of another version of the test are never resumed.
TEST_VERSION = 3
#: The default family-wise probability that the reported top k is the exact full-set top k.
TOP_K_CONFIDENCE = 0.99
#: The default largest per-image loss (nats) of a perturbed network that the ``betting`` bound declares: the
#: network gives the true class a probability of at least e^-LOSS_CLIP on every image. A run that sees a larger loss
#: says its guarantee is void (raise the clip then: the test only gets slower).
LOSS_CLIP = 40.0
#: The largest fraction of the capital a betting bound stakes on one image (``c`` in Waudby-Smith & Ramdas): bold,
#: because the bets that matter most are those against units that change almost nothing.
BET_TRUNCATION = 0.95
#: The bets are sized for a bound after this share of the images (the plug-in bet of Waudby-Smith & Ramdas for a
#: fixed sample size), where most eliminations fall.
BET_HORIZON = 0.125
#: The per-image values one group of the betting test's upper gamblers holds at once (each a few float64 tensors).
GAMBLER_ELEMENTS = 2_000_000
#: Each betting stage holds this many times the images of the one before, rounded to whole 128s and at least 128
#: more: fine stages cost the bound nothing (it is time-uniform) and let a unit go soon after its bound allows.
BETTING_GROWTH = 1.15


def stage_sizes(samples: int, first: int = FIRST_STAGE, growth: float = 2.0) -> list[int]:
    """Cumulative images per stage: ``first``, growing by ``growth``, then the whole set (a set of at most
    ``first`` images is one stage).

    >>> stage_sizes(10_000, 256)
    [256, 512, 1024, 2048, 4096, 10000]
    >>> stage_sizes(4_000, 256, growth=1.5)
    [256, 384, 512, 768, 1152, 1792, 4000]
    """
    sizes = []
    size = first
    while size * growth <= samples:  # the last stage takes the remainder, at least growth × the one before
        sizes.append(size)
        grown = size * growth
        size = int(grown) if growth == 2.0 else max(size + 128, int(round(grown / 128)) * 128)
    return sizes + [samples]


def sample_order(samples: int, seed: int = 0) -> Tensor:
    """A seeded random order of the image positions: stage ``j`` evaluates ``order[sizes[j-1]:sizes[j]]``."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(samples, generator=generator)


def critical_z(units: int, tests: int, confidence: float = TOP_K_CONFIDENCE) -> float:
    """The one-sided normal quantile of each ``normal`` bound: Bonferroni over ``units × tests`` bounds.

    >>> round(critical_z(698, 5, 0.99), 2)
    4.54
    """
    if tests == 0 or units == 0:
        return 0.0
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / (units * tests))


def normal_bounds(values: Tensor, population: int, z: float, covariate: Tensor | None = None,
                  covariate_mean: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Nominal normal estimates of every unit's full-set mean with lower and upper bounds.

    Args:
        values: ``(units, m)`` per-image paired differences on the same ``m`` images drawn without replacement
            from ``population`` images (larger = more critical).
        population: the number of images of the whole set.
        z: the quantile of each bound (:func:`critical_z`).
        covariate: ``(units, m)`` a control variate on the same images, e.g. the per-image Taylor estimates.
        covariate_mean: ``(units,)`` its mean over the whole set. A unit whose covariate or covariate mean is not
            finite gets the plain bound.

    Returns:
        ``(estimate, lower, upper)``, float64. A unit with a non-finite value gets infinite bounds (a broken
        network is never eliminated).

    >>> values = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> [[round(v, 3) for v in t.tolist()] for t in normal_bounds(values, population=10, z=2.0)]
    [[2.0, 0.0], [0.982, 0.0], [3.018, 0.0]]
    """
    values = values.double()
    units, m = values.shape
    finite = torch.isfinite(values).all(dim=1)
    y = torch.where(finite[:, None], values, torch.zeros_like(values))
    estimate = y.mean(dim=1)
    if m < 2:
        spread = torch.full_like(estimate, math.inf)
    else:
        spread = y.std(dim=1)
    if covariate is not None and m > 2:
        x = covariate.double()
        usable = torch.isfinite(x).all(dim=1) & torch.isfinite(covariate_mean.double())
        x = torch.where(usable[:, None], x, torch.zeros_like(x))
        dx, dy = x - x.mean(dim=1, keepdim=True), y - estimate[:, None]
        sxx, sxy = dx.square().sum(dim=1), (dx * dy).sum(dim=1)
        slope = torch.where(usable & (sxx > 0), sxy / sxx.clamp_min(1e-300), torch.zeros_like(sxx))
        shift = torch.where(usable, covariate_mean.double() - x.mean(dim=1), torch.zeros_like(sxx))
        residual = dy - slope[:, None] * dx
        estimate = torch.where(usable, estimate + slope * shift, estimate)
        spread = torch.where(usable, (residual.square().sum(dim=1) / (m - 2)).sqrt(), spread)
    correction = max(population - m, 0) / max(population - 1, 1)
    margin = z * spread * math.sqrt(correction / m)
    lower = torch.where(finite, estimate - margin, torch.full_like(estimate, math.inf))
    upper = torch.where(finite, estimate + margin, torch.full_like(estimate, math.inf))
    return estimate, lower, upper


def betting_bounds(values: Tensor, population: int, alpha: float, low: float, high: float,
                   truncation: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Finite-sample estimates of every unit's full-set mean, with lower and upper bounds that each hold with
    probability at least ``1 − alpha`` at every sample size at once (betting confidence sequences for sampling
    without replacement).

    Args:
        values: ``(units, m)`` per-image values of ``m`` images drawn without replacement from ``population``
            images, **in the order they were drawn** (each bet uses only the images before it).
        population: the number of images of the whole set.
        alpha: the error probability of each one-sided bound.
        low: the lowest value any image of the population can take; values below are clipped to it.
        high: the highest; values above are clipped to it.
        truncation: the largest fraction of the capital staked on one image, below 1 (default
            :data:`BET_TRUNCATION`).

    Returns:
        ``(estimate, lower, upper)``, float64: the plain (unclipped) mean, and the bounds. A unit with a
        non-finite value gets infinite bounds (a broken network is never eliminated).

    >>> values = torch.zeros(1, 400)  # 400 images drawn from 1,000, every one unchanged
    >>> _, lower, upper = betting_bounds(values, population=1000, alpha=0.001, low=-1.0, high=1.0)
    >>> round(lower.item(), 2), round(upper.item(), 2)
    (-0.01, 0.01)
    """
    gamblers = Gamblers(values, population, alpha, low, high, truncation)
    return gamblers.estimate, gamblers.edge(+1), gamblers.edge(-1)


class Gamblers:
    """The two gamblers of every unit's betting confidence sequence, on the values seen so far.

    For a candidate full-set mean ``m``, the mean of the images not yet drawn is known at every draw; one gambler
    bets that each new value lies above it (side +1), the other below (side −1). Each stakes the predictable
    plug-in fraction of Waudby-Smith & Ramdas (sized by the spread of the values before, eq. 26 of the 2024
    paper), at most ``truncation`` of what the next value could cost her. When ``m`` is the true mean her capital
    is a nonnegative martingale, so it ever reaches ``1/alpha`` with probability at most ``alpha`` (Ville).

    Values are bet on after mapping ``[low, high]`` to ``[0, 1]``; candidates and bounds are in the values' units.
    """

    def __init__(self, values: Tensor, population: int, alpha: float, low: float, high: float,
                 truncation: float | None = None) -> None:
        if not high > low:
            raise ValueError(f"betting bounds: the range [{low}, {high}] is empty")
        y = values.double()
        units, m = y.shape
        self.population, self.low, self.span = population, low, high - low
        self.truncation = BET_TRUNCATION if truncation is None else truncation
        self.threshold = math.log(1.0 / alpha)
        self.finite = torch.isfinite(y).all(dim=1)
        mean = y.nan_to_num(0.0).mean(dim=1) if m else torch.zeros(units, dtype=y.dtype)
        self.estimate = torch.where(self.finite, mean, torch.full_like(mean, math.nan))
        x = (y.nan_to_num(0.0).clamp(low, high) - low) / self.span
        self.x = x
        position = torch.arange(1, m + 1, dtype=x.dtype)
        running = x.cumsum(dim=1)
        mean_so_far = (0.5 + running) / (position + 1)
        spread_so_far = (0.25 + (x - mean_so_far).square().cumsum(dim=1)) / (position + 1)
        spread_before = torch.cat([torch.full((units, 1), 0.25, dtype=x.dtype), spread_so_far[:, :-1]], dim=1)
        # sized for a bound at BET_HORIZON of the population, where the test's decisions fall, rather than for
        # every sample size alike (t log t in the paper): any predictable bet keeps the guarantee
        horizon = max(1.0, BET_HORIZON * population)
        self.bet = (2.0 * self.threshold / (spread_before * horizon)).sqrt()
        self.seen_before = torch.cat([torch.zeros(units, 1, dtype=x.dtype), running[:, :-1]], dim=1)
        self.seen_total = running[:, -1] if m else torch.zeros(units, dtype=x.dtype)
        self.left = population - position + 1  # images not yet drawn when each image is drawn

    def log_capital(self, candidate: Tensor, side: int) -> Tensor:
        """Each gambler's log capital at a candidate mean (values' units, one per row); +inf where the values
        seen rule the candidate out on her side (the images left would need a mean outside the range). The other
        side's impossible candidates are left to the other gambler, so that each side's excluded candidates stay
        one interval at its end."""
        scaled = (candidate.double() - self.low) / self.span
        rest = (self.population * scaled[:, None] - self.seen_before) / self.left
        # the images left after the last one seen must hold a possible mean too (at the whole set: only the mean)
        after = self.population * scaled - self.seen_total
        unseen = self.population - self.x.shape[1]
        # rounding of sums over up to `population` values, divided by the images left: a relative allowance
        slack = 1e-9 * self.population / self.left
        possible = ((rest >= -slack).all(dim=1) & (after >= -1e-9 * self.population) if side > 0
                    else (rest <= 1 + slack).all(dim=1) & (after <= unseen + 1e-9 * self.population))
        rest = rest.clamp(0.0, 1.0)
        room = rest if side > 0 else 1.0 - rest  # how far the next value can move against the bet
        stake = torch.minimum(self.bet, self.truncation / room.clamp_min(1e-300))
        log_capital = torch.log1p(stake * side * (self.x - rest)).sum(dim=1)
        return torch.where(possible, log_capital, torch.full_like(log_capital, math.inf))

    def excluded(self, candidate: Tensor, side: int) -> Tensor:
        """Whether each row's gambler excludes its candidate: side −1, the full-set mean is below it; side +1,
        above it (each with probability of error at most ``alpha``)."""
        return self.log_capital(candidate, side) >= self.threshold

    def edge(self, side: int, iterations: int = 40) -> Tensor:
        """The lower (side +1) or upper (side −1) bound of each row: the edge of the candidates its gambler has
        not excluded, by bisection (her capital is monotone in the candidate, because a smaller stake where the
        room is small keeps each factor monotone). Conservative by at most ``2^-iterations`` of the range;
        +inf for a row with a non-finite value."""
        count = len(self.x)
        start, end = (self.low, self.low + self.span) if side > 0 else (self.low + self.span, self.low)
        excluded = torch.full((count,), start, dtype=torch.float64)
        kept = torch.full((count,), end, dtype=torch.float64)
        none = ~self.excluded(excluded, side)
        for _ in range(iterations):
            middle = (excluded + kept) / 2
            out = self.excluded(middle, side)
            excluded = torch.where(out, middle, excluded)
            kept = torch.where(out, kept, middle)
        bound = torch.where(none, torch.full_like(excluded, start), excluded)
        return torch.where(self.finite, bound, torch.full_like(bound, math.inf))


def survivors(lower: Tensor, upper: Tensor, top_k: int) -> Tensor:
    """Which units may still be among the ``top_k``: those whose upper bound reaches the ``top_k``-th largest
    lower bound, and always the ``top_k`` units with the largest lower bounds (all units when at most ``top_k``
    remain). NaN bounds count as the widest (lower −inf, upper +inf).

    >>> survivors(torch.tensor([5.0, 3.0, 0.0]), torch.tensor([6.0, 4.0, 2.9]), 2).tolist()
    [True, True, False]
    """
    if len(lower) <= top_k:
        return torch.ones(len(lower), dtype=torch.bool)
    lower = torch.where(torch.isnan(lower), torch.full_like(lower, -math.inf), lower)
    upper = torch.where(torch.isnan(upper), torch.full_like(upper, math.inf), upper)
    leaders = lower.topk(top_k)
    keep = upper >= leaders.values[-1]
    keep[leaders.indices] = True
    return keep


def per_image_range(score: str, reference: tuple[Tensor, Tensor, Tensor], loss_clip: float) -> tuple[Tensor, float]:
    """The range of each image's value of ``score``, from the unperturbed per-image results ``reference``:
    ``(floor, width)``, each image's value lying in ``[floor_i, floor_i + width]``.

    A per-image Δloss lies in ``[−loss_i, loss_clip − loss_i]``: a loss is never negative, and ``loss_clip`` is the
    declared largest loss of a perturbed network on one image. A top-1/top-5 change lies in ``[hit_i − 1, hit_i]``.
    The value minus its floor is the perturbed network's own per-image loss (or miss), in ``[0, width]``: a value
    outside that voids the guarantee. The bounds themselves bet on the paired difference over the range that holds
    every image's, ``[min floor, max floor + width]`` (an image the perturbation leaves alone is 0 there, whatever
    its loss).

    >>> reference = (torch.tensor([0.25, 3.0]), torch.tensor([True, False]), torch.tensor([True, True]))
    >>> floor, width = per_image_range("delta_loss", reference, 40.0)
    >>> floor.tolist(), width, per_image_range("top1_drop", reference, 40.0)[0].tolist()
    ([-0.25, -3.0], 40.0, [0.0, -1.0])
    """
    losses, top1, top5 = reference
    if score in ("loss", "delta_loss"):
        return -losses.double().cpu(), float(loss_clip)
    hits = top1 if score == "top1_drop" else top5
    return hits.double().cpu() - 1.0, 1.0


@dataclass
class Stage:
    """What one stage of the test saw and decided."""

    images: int
    units: int
    eliminated: int = 0


@dataclass
class SequentialTestRecord:
    """How halving's test went: its settings, guarantee and what each stage decided (``ranking.json``'s
    ``top_k_test``)."""

    bound: str
    #: ``finite-sample``, ``nominal`` (the normal bound), or ``void: …`` (a value fell outside the declared range).
    guarantee: str
    top_k: int
    top_k_confidence: float
    correction: str
    order_seed: int
    first_stage: int
    tests: int
    stages: list[Stage] = field(default_factory=list)
    #: ``normal``: the quantile of each bound.
    z: float | None = None
    #: ``betting``: the error probability of each one-sided bound; the declared range of the perturbed network's
    #: per-image loss (or miss), ``[0, range_width]``; the largest one seen and how many fell outside.
    alpha: float | None = None
    range_width: float | None = None
    loss_clip: float | None = None
    largest_value: float | None = None
    values_outside_range: int = 0
    control_variate: str | None = None
    unit_images: int = 0
    units_at_full_set: int = 0
    ties_at_boundary: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sequential_test(
    units: int,
    samples: int,
    top_k: int,
    evaluate: Callable[[int, list[int], list[int]], Tensor],
    *,
    bound: str = "betting",
    confidence: float = TOP_K_CONFIDENCE,
    floor: Tensor | None = None,
    width: float | None = None,
    loss_clip: float | None = None,
    seed: int = 0,
    first_stage: int = FIRST_STAGE,
    covariate: Callable[[int, list[int], list[int]], Tensor] | None = None,
    covariate_mean: Tensor | None = None,
    agree: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[int], list[int], SequentialTestRecord]:
    """Run the test: which units reach the whole set, and where each eliminated unit stopped.

    Args:
        units: how many units race.
        samples: the images of the whole set.
        top_k: how many units must come out exactly right.
        evaluate: ``evaluate(stage, remaining, positions)`` → ``(len(remaining), len(positions))`` float64
            per-image values (larger = more critical) of the units ``remaining`` (indices) on the images at
            ``positions`` (sorted). The engine evaluates the network there; a replay reads a matrix.
        bound: ``betting`` (finite-sample) or ``normal`` (nominal).
        confidence: the probability that the top ``top_k`` is the exact full-set top ``top_k``.
        floor: ``betting``: ``(samples,)`` each image's lowest possible value (:func:`per_image_range`).
        width: ``betting``: every image's value lies in ``[floor[i], floor[i] + width]``.
        loss_clip: recorded with the range when the width is a declared largest per-image loss.
        seed: the random order of the images.
        first_stage: images in the first stage.
        covariate: ``normal`` only: per-image control-variate values, called like ``evaluate``.
        covariate_mean: ``(units,)`` the covariate's mean over the whole set.
        agree: makes every process take the same decision (under DDP, rank 0's keep mask); identity by default.

    Returns:
        ``(survivors, images_seen, record)``: the units evaluated on every image, how many images (the first of
        the order) each unit saw, and the :class:`SequentialTestRecord`.

    >>> matrix = torch.zeros(50, 2000); matrix[:3] = 1.0  # three units flip every image, 47 none
    >>> kept, seen, record = sequential_test(50, 2000, 3, lambda stage, rest, at: matrix[rest][:, at],
    ...                                      floor=torch.zeros(2000), width=1.0)
    >>> kept, record.guarantee, sum(seen) < 50 * 2000
    ([0, 1, 2], 'finite-sample', True)
    """
    if bound == "betting":
        if floor is None or width is None:
            raise ValueError("sequential_test: the betting bound needs each image's range (floor, width)")
        sizes = stage_sizes(samples, first_stage, BETTING_GROWTH)
        alpha = (1.0 - confidence) / units
        # the bounds bet on the paired difference itself (an image a perturbation leaves alone is 0 whatever its
        # loss), over the range every image's value shares
        low, high = float(floor.min()), float(floor.max()) + float(width)
        record = SequentialTestRecord(bound=bound, guarantee="finite-sample", top_k=top_k, top_k_confidence=confidence,
                            correction="bonferroni over units (time-uniform bounds)", order_seed=seed,
                            first_stage=sizes[0], tests=len(sizes) - 1, alpha=alpha, range_width=float(width),
                            loss_clip=loss_clip, largest_value=-math.inf)
    elif bound == "normal":
        sizes = stage_sizes(samples, first_stage)
        z = critical_z(units, len(sizes) - 1, confidence)
        record = SequentialTestRecord(bound=bound, guarantee="nominal", top_k=top_k, top_k_confidence=confidence,
                            correction="bonferroni over units × tests", order_seed=seed, first_stage=sizes[0],
                            tests=len(sizes) - 1, z=z,
                            control_variate="first-order Taylor per image" if covariate is not None else None)
    else:
        raise ValueError(f"bound: {bound!r} is not one of betting, normal")
    order = sample_order(samples, seed)
    remaining = list(range(units))
    seen_by = [0] * units
    values = torch.zeros(units, 0, dtype=torch.float64)  # rows: remaining units; columns: images in draw order
    covariates = torch.zeros(units, 0, dtype=torch.float64)
    lower_so_far = torch.full((units,), -math.inf, dtype=torch.float64)
    evaluated = 0
    for j, size in enumerate(sizes):
        last = j == len(sizes) - 1
        if len(remaining) <= top_k and not last:
            continue  # nothing left to decide: only the full-set scores are missing
        drawn = order[evaluated:size]
        positions, placement = drawn.sort()
        new = _in_draw_order(evaluate(j, remaining, positions.tolist()), placement)
        evaluated = size
        record.unit_images += len(remaining) * len(drawn)  # the work done, against units × images for exact
        stage = Stage(images=size, units=len(remaining))
        record.stages.append(stage)
        for i in remaining:
            seen_by[i] = size
        if bound == "betting":
            finite = (new - floor.double()[drawn][None])  # the perturbed network's own per-image loss (or miss)
            finite = finite[torch.isfinite(finite)]
            if finite.numel():
                record.largest_value = max(record.largest_value, float(finite.max()))
                # a loss rounded to a hair below 0 is no evidence against the range
                record.values_outside_range += int((finite > width).sum()) + int((finite < -1e-6).sum())
        if last:
            break
        values = torch.cat([values, new], dim=1)
        if bound == "betting":
            keep = _betting_survivors(values, samples, alpha, low, high, remaining, top_k, lower_so_far)
        else:
            if covariate is not None:
                covariates = torch.cat([covariates, _in_draw_order(covariate(j, remaining, positions.tolist()),
                                                                   placement)], dim=1)
                _, lower, upper = normal_bounds(values, samples, record.z, covariates, covariate_mean[remaining])
            else:
                _, lower, upper = normal_bounds(values, samples, record.z)
            keep = survivors(lower, upper, top_k)
        if agree is not None:
            keep = agree(keep)
        stage.eliminated = int((~keep).sum())
        values, covariates = values[keep], covariates[keep] if covariates.numel() else covariates
        remaining = [i for i, kept in zip(remaining, keep.tolist()) if kept]
    record.units_at_full_set = len(remaining)
    if bound == "betting":
        if record.values_outside_range:
            record.guarantee = (f"void: {record.values_outside_range} per-image values fell outside the declared "
                                f"range [0, {width:g}] (largest {record.largest_value:.4g})"
                                + ("; raise loss_clip" if loss_clip is not None else ""))
        if not math.isfinite(record.largest_value):
            record.largest_value = None
    return remaining, seen_by, record


def _betting_survivors(values: Tensor, population: int, alpha: float, low: float, high: float,
                       remaining: list[int], top_k: int, lower_so_far: Tensor) -> Tensor:
    """The betting test's decision: the ``top_k`` largest lower bounds set the bar, and a unit is eliminated when
    its upper gambler excludes the bar (its full-set mean is below it).

    Only the units that can hold the largest lower bounds get one (the ``2 top_k + 8`` with the largest means so
    far); any ``top_k`` units' valid lower bounds make a valid bar, so this costs power at most, never the guarantee.
    Every earlier stage's lower bound still holds (the bounds are time-uniform), so each unit keeps its largest.
    The upper gamblers are asked in groups of rows, so that their working tensors stay a few times one group's
    values, however many units remain.
    """
    count, seen = values.shape
    if count <= top_k:
        return torch.ones(count, dtype=torch.bool)
    finite = torch.isfinite(values).all(dim=1)
    means = torch.where(finite, values.nan_to_num(0.0).mean(dim=1), torch.full((count,), math.inf,
                                                                                   dtype=torch.float64))
    contenders = means.topk(min(count, 2 * top_k + 8)).indices
    index = torch.tensor(remaining)
    lower = lower_so_far[index]
    leading = Gamblers(values[contenders], population, alpha, low, high)
    lower[contenders] = torch.maximum(lower[contenders], leading.edge(+1))
    lower_so_far[index] = lower
    leaders = lower.topk(top_k)
    bar = leaders.values[-1]
    keep = torch.ones(count, dtype=torch.bool)
    if bar == -math.inf:
        return keep
    rows = max(1, GAMBLER_ELEMENTS // max(seen, 1))
    for start in range(0, count, rows):
        group = Gamblers(values[start : start + rows], population, alpha, low, high)
        keep[start : start + rows] = ~group.excluded(bar.expand(len(group.x)), -1) | ~group.finite
    keep[leaders.indices] = True
    return keep


def _in_draw_order(values: Tensor, placement: Tensor) -> Tensor:
    """Columns given for sorted positions, put back in the order the images were drawn."""
    values = values.double()
    ordered = torch.empty_like(values)
    ordered[:, placement] = values
    return ordered
