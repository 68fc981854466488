"""Campaign sizing and interval estimates for fault-injection rates (pure functions, no torch).

A campaign samples faults without replacement, stratum by stratum (a layer, or a layer × bit), usually with about
the same number of faults per stratum whatever its size. Every rate is therefore estimated as it was sampled: a
drawn fault stands for ``N_h / n_h`` faults of its stratum (its design weight), rows that cover part of a stratum
(a bit under layer stratification) are domains of that design, and the intervals count faults, not images, as
the sampling units (the images of one fault are one cluster).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

from scipy.special import betaincinv


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


def clopper_pearson(successes: float, trials: float, confidence: float = 0.95) -> tuple[float, float]:
    """The Clopper–Pearson (exact binomial) interval of ``successes / trials``; (nan, nan) unless 0 < trials < inf.

    Counts need not be whole: a survey estimate enters as ``rate × effective_n`` out of ``effective_n`` (Korn and
    Graubard, 1998). Unlike Wilson's interval it keeps its level next to 0 and 1, where a campaign's rates live
    (Wilson's covers 0.84 at a rate of 0.01 with 17 faults; Brown, Cai and DasGupta, 2001).

    >>> [round(v, 4) for v in clopper_pearson(81, 263)]
    [0.2527, 0.3676]
    >>> [round(v, 4) for v in clopper_pearson(0, 17)]
    [0.0, 0.1951]
    """
    if not 0 < trials < math.inf:
        return math.nan, math.nan
    alpha = 1 - confidence
    successes = min(max(successes, 0.0), trials)
    low = 0.0 if successes <= 0 else float(betaincinv(successes, trials - successes + 1, alpha / 2))
    high = 1.0 if successes >= trials else float(betaincinv(successes + 1, trials - successes, 1 - alpha / 2))
    return low, high


def domain_estimate(strata: Sequence[Mapping], confidence: float = 0.95, bounded: bool = True) -> dict[str, float]:
    """The population ratio ``Σy / Σx`` over a domain (whole strata, or the part of each that a row covers) from
    per-stratum samples without replacement, with its interval.

    Each stratum is ``{"population": N_h, "drawn": n_h, "domain": N_hd, "y": [...], "x": [...]}``: ``N_h``
    faults in the stratum, ``n_h`` of them drawn, ``N_hd`` of the ``N_h`` in the domain (known, e.g. a layer's
    values for one bit), and ``y``, ``x`` for each drawn fault inside the domain (``x`` defaults to 1: a rate
    over faults; for a rate per image, ``y`` = the fault's images with the outcome, ``x`` = its images).

    The estimate weights each drawn fault by ``w = N_h / n_h``: ``R = Σ w·y / Σ w·x`` (the combined ratio
    estimator; for whole strata and ``x = 1``, ``Σ_h (N_h / N) ȳ_h``). Its variance is the linearised one,
    ``Σ_h N_h² (1 − n_h/N_h) s²_h(z) / n_h / X̂²`` with ``z = y − R·x`` inside the domain and 0 outside it, over
    every fault drawn from the stratum (so a bit's cell with one fault still borrows its layer's other faults).

    With ``bounded`` (``y ≤ x``: a rate) the interval is Clopper–Pearson at the effective sample size
    ``R(1−R) / Var``, capped at the effective number of faults ``(Σ w·x)² / Σ (1 − n_h/N_h) (w·x)²`` (Kish's,
    with the finite-population correction): faults are the sampling units, so a row is never worth more of them
    than it holds, however similar their values, and a row whose faults all agree (variance 0) is worth just
    that many. Without ``bounded`` (a mean change of loss) no interval is given (nan): a mean of unbounded values
    from a few faults has none that holds its level.

    A stratum of the domain from which nothing was drawn (``n_h = 0``) leaves part of the population unknown:
    the rate is then nan (not the rate of the rest), and a bounded interval spans every value that part could
    take (``(1−u)·low``, ``(1−u)·high + u`` with ``u`` its population share). No fault in the domain: nan.

    Returns ``{"rate", "low", "high", "faults", "effective_n", "kish_n", "unsampled"}``: ``faults`` drawn in the
    domain, ``effective_n`` the sample size of the interval, ``kish_n`` the effective number of faults (inf when
    every stratum was evaluated whole), ``unsampled`` the domain's faults in strata with nothing drawn.

    Two strata of 100 and 9,900 faults, 10 drawn from each, where only the small one's faults are critical: the
    population rate is 0.01 (not the pooled 0.5), and 20 faults so unequally weighted are worth about 10.

    >>> row = domain_estimate([{"population": 100, "drawn": 10, "domain": 100, "y": [1] * 10},
    ...                        {"population": 9900, "drawn": 10, "domain": 9900, "y": [0] * 10}])
    >>> round(row["rate"], 4), round(row["kish_n"], 2), [round(v, 3) for v in (row["low"], row["high"])]
    (0.01, 10.21, [0.0, 0.319])
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence!r} is not in (0, 1)")
    infinite = any(math.isinf(s["population"]) for s in strata)
    if infinite and len(strata) != 1:
        raise ValueError("an infinite population (bit-error-rate draws) is one stratum")
    unsampled = sum(s["domain"] for s in strata if s["drawn"] <= 0)
    known = sum(s["domain"] for s in strata if s["drawn"] > 0)
    used = [s for s in strata if s["drawn"] > 0]
    faults = sum(len(s["y"]) for s in used)
    empty = {"rate": math.nan, "low": math.nan, "high": math.nan, "faults": faults, "effective_n": 0.0,
             "kish_n": 0.0, "unsampled": unsampled}
    for s in used:
        if len(s["y"]) > s["drawn"] or len(s.get("x", s["y"])) != len(s["y"]):
            raise ValueError(f"a stratum lists {len(s['y'])} domain faults of {s['drawn']} drawn")
        if not infinite and s["drawn"] > s["population"]:
            raise ValueError(f"a stratum has {s['drawn']} faults drawn of {s['population']} possible")
    weighted_y = weighted_x = 0.0
    for s in used:
        weight = 1.0 if infinite else s["population"] / s["drawn"]
        weighted_y += weight * math.fsum(s["y"])
        weighted_x += weight * math.fsum(s.get("x", [1.0] * len(s["y"])))
    if faults == 0 or not weighted_x > 0:
        return empty
    rate = weighted_y / weighted_x
    variance, estimable, cap_squares = 0.0, True, 0.0
    for s in used:
        n, big_n = s["drawn"], s["population"]
        weight = 1.0 if infinite else big_n / n
        fpc = 1.0 if infinite else 1 - n / big_n
        xs = s.get("x", [1.0] * len(s["y"]))
        z = [y - rate * x for y, x in zip(s["y"], xs)]  # the faults outside the domain add zeros
        cap_squares += fpc * math.fsum((weight * x) ** 2 for x in xs)
        if fpc == 0 or not z:
            continue
        if n < 2:
            estimable = False  # one fault from a stratum that has more: its spread is unknown
            continue
        mean = math.fsum(z) / n
        spread = (math.fsum(v * v for v in z) - n * mean * mean) / (n - 1)
        variance += (weight * n) ** 2 * fpc * max(spread, 0.0) / n
    variance /= weighted_x**2
    cap = weighted_x**2 / cap_squares if cap_squares > 0 else math.inf
    if not bounded:
        return {**empty, "rate": rate if unsampled == 0 else math.nan, "kish_n": cap}
    if estimable and variance > 0:
        effective = min(rate * (1 - rate) / variance, cap)
    else:
        effective = cap
    if math.isinf(effective):  # every stratum evaluated whole: the rate is known
        low = high = rate
    else:
        low, high = clopper_pearson(rate * effective, effective, confidence)
    share = unsampled / (unsampled + known) if unsampled else 0.0
    if share:
        rate, low, high = math.nan, (1 - share) * low, (1 - share) * high + share
    return {"rate": rate, "low": low, "high": high, "faults": faults, "effective_n": effective, "kish_n": cap,
            "unsampled": unsampled}


def stratified_rate(strata: Sequence[Mapping[str, float]], confidence: float = 0.95) -> dict[str, float]:
    """The population rate from per-stratum samples, each ``{"successes", "trials", "population"}``
    (:func:`domain_estimate` over whole strata).

    >>> round(stratified_rate([{"successes": 1, "trials": 10, "population": 100},
    ...                        {"successes": 5, "trials": 10, "population": 300}])["rate"], 3)
    0.4
    """
    row = domain_estimate([{"population": s["population"], "drawn": s["trials"], "domain": s["population"],
                            "y": [1] * int(s["successes"]) + [0] * int(s["trials"] - s["successes"])}
                           for s in strata], confidence)
    return {**row, "n": row["faults"]}


def rate_with_interval(successes: int, trials: int, confidence: float = 0.95) -> dict[str, float]:
    """``{"rate", "low", "high", "n"}`` for a simple random sample of ``trials`` faults (Clopper–Pearson).

    >>> [round(v, 4) for v in rate_with_interval(0, 17).values()]
    [0.0, 0.0, 0.1951, 17]
    """
    low, high = clopper_pearson(successes, trials, confidence)
    return {"rate": successes / trials if trials else math.nan, "low": low, "high": high, "n": trials}


__all__ = ["achieved_margin", "clopper_pearson", "domain_estimate", "leveugle_sample_size",
           "normal_quantile", "rate_with_interval", "stratified_rate", "wilson_interval"]
