"""The sequential test of ``method="halving"``: which units can no longer be among the ``top_k`` most critical.

Every unit still in the race is evaluated on a growing random sample of the evaluation set: stage sizes double from
``first_stage`` images to the whole set, and each stage adds images drawn without replacement (a seeded permutation,
so every stage is spread over the whole, class-sorted set). After each stage but the last, a unit's *full-set*
score — the mean of its per-image paired differences over all ``n`` images — gets a confidence interval from the
images seen so far, and the unit is eliminated when its upper bound falls below the ``top_k``-th largest lower
bound. Units left after the last stage have been evaluated on every image: their scores are the exact full-set
scores, and the top ``top_k`` among them is reported.

Error probability. If every bound used holds, no true top-``top_k`` unit is ever eliminated: eliminating a true top
unit ``v`` needs either ``v``'s own upper bound to fail, or ``top_k`` units with lower bounds above ``v``'s score,
one of which is not a true top unit and so has a failed lower bound. That is one one-sided event per unit and test,
``units × tests`` in all, so the Bonferroni correction gives each bound ``(1 − top_k_confidence) / (units ×
tests)``. Bonferroni is used rather than a step-down or FDR procedure because the guarantee needed is on the whole
set of eliminations (family-wise, under any dependence between units: they share the same images), and because the
count of tests is fixed before any image is seen (the stage sizes depend only on ``n``), so no union over a data-
dependent number of looks is hidden.

The intervals are normal ones for a mean estimated from a simple random sample without replacement: the standard
error carries the finite-population correction ``(n − m) / (n − 1)``, which shrinks to 0 as the sample becomes the
whole set. With a control variate ``x`` whose full-set mean is known (the unit's per-image first-order Taylor
estimate of the same difference), the regression estimator ``ȳ + b (X̄ − x̄)`` replaces the plain mean and its
standard error is that of the residuals (``1 − r²`` of the variance). Both are the textbook (Cochran) large-sample
results; the guarantee is as good as the normal approximation at the first stage's size, which is why that stage is
not tiny.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

#: Images in the first stage (the normal approximation of the first test rests on it).
FIRST_STAGE = 256
#: Recorded in resume fingerprints: partial results of another version of the test are never resumed.
TEST_VERSION = 2
#: The default family-wise probability that the reported top k is the exact full-set top k.
TOP_K_CONFIDENCE = 0.99


def stage_sizes(samples: int, first: int = FIRST_STAGE) -> list[int]:
    """Cumulative images per stage: ``first``, doubling, then the whole set (a set of at most ``first`` images
    is one stage).

    >>> stage_sizes(10_000, 256)
    [256, 512, 1024, 2048, 4096, 10000]
    """
    sizes = []
    size = first
    while size * 2 <= samples:  # the last stage takes the remainder, at least as many images as the one before
        sizes.append(size)
        size *= 2
    return sizes + [samples]


def sample_order(samples: int, seed: int = 0) -> Tensor:
    """A seeded random order of the image positions: stage ``j`` evaluates ``order[sizes[j-1]:sizes[j]]``."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(samples, generator=generator)


def critical_z(units: int, tests: int, confidence: float = TOP_K_CONFIDENCE) -> float:
    """The one-sided normal quantile of each bound: Bonferroni over ``units × tests`` bounds.

    >>> round(critical_z(698, 5, 0.99), 2)
    4.56
    """
    if tests == 0 or units == 0:
        return 0.0
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / (units * tests))


def bounds(values: Tensor, population: int, z: float, covariate: Tensor | None = None,
           covariate_mean: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Estimates of every unit's full-set mean with lower and upper confidence bounds.

    Args:
        values: ``(units, m)`` per-image paired differences on the same ``m`` images drawn without replacement
            from ``population`` images (larger = more critical).
        population: the number of images of the whole set.
        z: the quantile of each bound (:func:`critical_z`).
        covariate: ``(units, m)`` a control variate on the same images, e.g. the per-image Taylor estimates.
        covariate_mean: ``(units,)`` its mean over the whole set.

    Returns:
        ``(estimate, lower, upper)``, float64. A unit with a non-finite value gets infinite bounds (a broken
        network is never eliminated).
    """
    values = values.double()
    units, m = values.shape
    finite = torch.isfinite(values).all(dim=1)
    y = torch.where(finite[:, None], values, torch.zeros_like(values))
    estimate = y.mean(dim=1)
    if m < 2:
        spread = torch.full_like(estimate, math.inf)
    elif covariate is not None and m > 2:
        x = covariate.double()
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        dx, dy = x - x.mean(dim=1, keepdim=True), y - estimate[:, None]
        sxx, sxy = dx.square().sum(dim=1), (dx * dy).sum(dim=1)
        slope = torch.where(sxx > 0, sxy / sxx.clamp_min(1e-300), torch.zeros_like(sxx))
        estimate = estimate + slope * (covariate_mean.double() - x.mean(dim=1))
        residual = dy - slope[:, None] * dx
        spread = (residual.square().sum(dim=1) / (m - 2)).sqrt()
    else:
        spread = y.std(dim=1)
    correction = max(population - m, 0) / max(population - 1, 1)
    margin = z * spread * math.sqrt(correction / m)
    lower = torch.where(finite, estimate - margin, torch.full_like(estimate, math.inf))
    upper = torch.where(finite, estimate + margin, torch.full_like(estimate, math.inf))
    return estimate, lower, upper


def survivors(lower: Tensor, upper: Tensor, top_k: int) -> Tensor:
    """Which units may still be among the ``top_k``: those whose upper bound reaches the ``top_k``-th largest
    lower bound (all of them when at most ``top_k`` remain).

    >>> survivors(torch.tensor([5.0, 3.0, 0.0]), torch.tensor([6.0, 4.0, 2.9]), 2).tolist()
    [True, True, False]
    """
    if len(lower) <= top_k:
        return torch.ones(len(lower), dtype=torch.bool)
    threshold = lower.topk(top_k).values[-1]
    return upper >= threshold
