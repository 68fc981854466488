"""Campaign sizing and interval estimates for fault-injection rates (pure Python, no torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist


def normal_quantile(confidence: float) -> float:
    """The two-sided normal quantile ``t`` of ``confidence`` (1.96 for 0.95).

    >>> round(normal_quantile(0.95), 3)
    1.96
    """
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def leveugle_sample_size(population: float, error_margin: float, confidence: float, p: float = 0.5) -> int:
    """Faults to inject so that a rate carries ``error_margin`` at ``confidence`` (Leveugle et al., DATE 2009):
    ``n = N / (1 + e²(N−1) / (t²·p(1−p)))`` with the finite-population correction; ``p = 0.5`` is the worst case.
    ``population = math.inf`` gives the uncorrected ``t²·p(1−p) / e²``.

    >>> leveugle_sample_size(1000, 0.05, 0.95)
    278
    """
    t = normal_quantile(confidence)
    if math.isinf(population):
        return math.ceil(t * t * p * (1 - p) / error_margin**2)
    n = population / (1 + error_margin**2 * (population - 1) / (t * t * p * (1 - p)))
    return min(int(population), math.ceil(n - 1e-9))


def achieved_margin(sample: int, population: float, confidence: float, p: float = 0.5) -> float:
    """The error margin ``sample`` faults out of ``population`` carry at rate ``p`` (Leveugle's formula solved for e).

    >>> round(achieved_margin(278, 1000, 0.95), 4)
    0.05
    """
    if sample <= 0:
        return math.inf
    t = normal_quantile(confidence)
    correction = 1.0 if math.isinf(population) else max(0.0, (population - sample) / max(population - 1, 1))
    return t * math.sqrt(p * (1 - p) / sample * correction)


def wilson_interval(successes: float, trials: float, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``successes / trials``; (nan, nan) without trials.

    >>> [round(v, 4) for v in wilson_interval(81, 263)]  # Newcombe (1998), Table I
    [0.2553, 0.3662]
    """
    if trials <= 0:
        return math.nan, math.nan
    z = normal_quantile(confidence)
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    # at 0 or n successes one bound equals the rate; rounding must not push it past the rate
    return max(0.0, min(rate, centre - half)), min(1.0, max(rate, centre + half))


def rate_with_interval(successes: int, trials: int, confidence: float = 0.95) -> dict[str, float]:
    """``{"rate", "low", "high", "n"}`` for a simple random sample of ``trials`` faults."""
    low, high = wilson_interval(successes, trials, confidence)
    return {"rate": successes / trials if trials else math.nan, "low": low, "high": high, "n": trials}


def stratified_rate(strata: Sequence[Mapping[str, float]], confidence: float = 0.95) -> dict[str, float]:
    """The population rate from per-stratum samples, each ``{"successes", "trials", "population"}``.

    Strata are weighted by their population share (a stratum sampled more densely than another does not count
    more). The interval is Wilson's with the effective sample size ``p(1−p) / Var`` of the stratified estimate
    (with finite-population corrections), capped at the number of faults drawn.

    >>> round(stratified_rate([{"successes": 1, "trials": 10, "population": 100},
    ...                        {"successes": 5, "trials": 10, "population": 300}])["rate"], 3)
    0.4
    """
    used = [s for s in strata if s["trials"] > 0]
    total = sum(s["population"] for s in used)
    trials = sum(s["trials"] for s in used)
    if not used or trials == 0:
        return {"rate": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    if math.isinf(total):  # an infinite population (bit-error-rate draws) is one simple random sample
        successes = sum(s["successes"] for s in used)
        return rate_with_interval(int(successes), int(trials), confidence)
    rate = sum(s["population"] / total * s["successes"] / s["trials"] for s in used)
    variance = 0.0
    for s in used:
        share, n, big_n = s["population"] / total, s["trials"], s["population"]
        p = s["successes"] / n
        correction = (big_n - n) / (big_n - 1) if big_n > 1 else 0.0
        variance += share * share * p * (1 - p) / max(n - 1, 1) * correction
    effective = rate * (1 - rate) / variance if variance > 0 else trials
    effective = min(effective, trials) if variance > 0 else trials
    low, high = wilson_interval(rate * effective, effective, confidence)
    return {"rate": rate, "low": low, "high": high, "n": int(trials), "effective_n": effective}


__all__ = ["achieved_margin", "leveugle_sample_size", "normal_quantile", "rate_with_interval", "stratified_rate",
           "wilson_interval"]
