"""The Lightning-free ranking math: order, NaN handling, rows, split-half and estimate agreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from critnet.perturb import Perturbation, Unit
from critnet.selection import select_units
from critnet.results.ranking_rows import (
    RANKING_COLUMNS,
    estimate_agreement,
    order_outcomes,
    ranking_rows,
    split_half_agreement,
)
from critnet.scoring import Tally, UnitOutcome


def tally(loss: float, top1: int = 0, top5: int = 0, samples: int = 10) -> Tally:
    return Tally(loss_sum=loss * samples, top1_correct=top1, top5_correct=top5, samples=samples)


def outcome(name: str, loss: float, halves=(None, None), **kwargs) -> UnitOutcome:
    first = halves[0] if halves[0] is not None else loss
    second = halves[1] if halves[1] is not None else loss
    return UnitOutcome(
        unit=Unit("tensor", name),
        total=tally(loss, **kwargs),
        halves=(tally(first, samples=5), tally(second, samples=5)),
    )


BASELINE = UnitOutcome(None, tally(1.0, top1=8, top5=10), (tally(1.0, samples=5), tally(1.0, samples=5)))


def test_descending_with_ties_in_unit_order():
    outcomes = [outcome("a", 2.0), outcome("b", 3.0), outcome("c", 2.0), outcome("d", 0.5)]
    ranked = order_outcomes(outcomes, BASELINE)
    assert [r.outcome.unit.name for r in ranked] == ["b", "a", "c", "d"]
    assert [r.rank for r in ranked] == [1, 2, 3, 4]
    assert [r.score for r in ranked] == [3.0, 2.0, 2.0, 0.5]
    # the same order the original experiment's sorted(..., reverse=True) gives
    reference = sorted([(o.unit.name, o.total.loss) for o in outcomes], key=lambda x: x[1], reverse=True)
    assert [r.outcome.unit.name for r in ranked] == [name for name, _ in reference]


def test_nan_and_inf_losses_rank_first_deterministically():
    outcomes = [
        outcome("finite", 5.0),
        outcome("inf", math.inf),
        outcome("nan1", math.nan),
        outcome("nan2", math.nan),
        outcome("small", 0.1),
    ]
    for permutation_seed in range(3):
        ranked = order_outcomes(outcomes, BASELINE)
        assert [r.outcome.unit.name for r in ranked] == ["nan1", "nan2", "inf", "finite", "small"]
    # under an accuracy score a broken network (NaN loss) still ranks above any finite loss
    accuracy = [outcome("drop", 1.0, top1=0), outcome("nan", math.nan, top1=8, top5=10)]
    assert [r.outcome.unit.name for r in order_outcomes(accuracy, BASELINE, "top1_drop")] == ["nan", "drop"]


def test_scores_and_rows():
    outcomes = [outcome("a", 1.5, top1=6, top5=9), outcome("b", 1.2, top1=2, top5=7)]
    ranked = order_outcomes(outcomes, BASELINE, "top1_drop")
    assert [r.outcome.unit.name for r in ranked] == ["b", "a"]
    assert ranked[0].score == pytest.approx(60.0)
    rows = ranking_rows(ranked, BASELINE, Perturbation("add", 0.1))
    assert list(rows[0]) == list(RANKING_COLUMNS)
    assert rows[0]["delta_loss"] == pytest.approx(0.2)
    assert rows[0]["top1"] == pytest.approx(20.0) and rows[0]["top5_drop"] == pytest.approx(30.0)
    assert rows[0]["perturbation"] == "add" and rows[0]["level"] == 0.1 and rows[0]["index"] == ""
    assert ranking_rows(ranked, BASELINE, Perturbation("zero"))[0]["level"] == ""
    with pytest.raises(ValueError, match="score"):
        order_outcomes(outcomes, BASELINE, "accuracy")


def test_sample_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="samples"):
        order_outcomes([outcome("a", 1.0, samples=7)], BASELINE)


def test_estimates_follow_exact_outcomes():
    exact = outcome("exact", 1.1)
    estimated = UnitOutcome(Unit("tensor", "est"), Tally(), (Tally(), Tally()), exact=False, estimate=5.0)
    ranked = order_outcomes([estimated, exact], BASELINE, "delta_loss")
    assert [r.outcome.unit.name for r in ranked] == ["exact", "est"]
    assert ranked[1].score == 5.0
    assert order_outcomes([estimated, exact], BASELINE, "loss")[1].score == 6.0


def test_split_half_spearman_against_scipy():
    firsts = [0.3, 2.0, 1.0, 5.0, 4.0, 0.7]
    seconds = [0.2, 1.0, 3.0, 6.0, 2.5, 0.9]
    outcomes = [outcome(f"u{i}", (f + s) / 2, halves=(f, s)) for i, (f, s) in enumerate(zip(firsts, seconds))]
    agreement = split_half_agreement(outcomes, BASELINE, top_k=2)
    assert agreement["spearman"] == pytest.approx(spearmanr(firsts, seconds).statistic)
    assert agreement["units"] == 6 and agreement["half_samples"] == [5, 5]
    # top-2 of the first half: u3, u4; of the second: u3, u2
    assert agreement["top_k_overlap"] == 0.5
    reversed_halves = [outcome(f"u{i}", 1.0, halves=(i, -i)) for i in range(5)]
    assert split_half_agreement(reversed_halves, BASELINE)["spearman"] == pytest.approx(-1.0)
    constant = [outcome(f"u{i}", 1.0) for i in range(3)]
    assert math.isnan(split_half_agreement(constant, BASELINE)["spearman"])


def test_split_half_on_a_real_model(resnet20_cifar, cifar_test_256):
    """Halves from an independent per-sample loop: Spearman of the per-half losses, computed here with scipy."""
    model = resnet20_cifar
    x, y = cifar_test_256[0]
    units = select_units(model, "tensor", include=["layer1.*conv.*weight", "linear.weight"])

    def tallies(logits, labels):
        losses = F.cross_entropy(logits, labels, reduction="none").double()
        top5 = logits.topk(5, dim=1).indices
        hits1 = (top5[:, 0] == labels).long()
        hits5 = (top5 == labels[:, None]).any(1).long()
        return [
            Tally(losses[s].sum().item(), int(hits1[s].sum()), int(hits5[s].sum()), len(labels[s]))
            for s in (slice(0, 64), slice(64, 128))
        ]

    outcomes, half_losses = [], []
    with torch.no_grad():
        base = tallies(model(x), y)
        for unit in units:
            param = dict(model.named_parameters())[unit.name]
            original = param.data.clone()
            param.data += 0.1
            halves = tallies(model(x), y)
            param.data = original
            outcomes.append(UnitOutcome(unit, halves[0] + halves[1], tuple(halves)))
            half_losses.append((halves[0].loss, halves[1].loss))
    baseline = UnitOutcome(None, base[0] + base[1], tuple(base))
    agreement = split_half_agreement(outcomes, baseline)
    expected = spearmanr([h[0] for h in half_losses], [h[1] for h in half_losses]).statistic
    assert agreement["spearman"] == pytest.approx(expected, abs=1e-12)
    assert agreement["units"] == len(units) == 7


def test_estimate_agreement():
    outcomes = [
        UnitOutcome(Unit("tensor", f"u{i}"), tally(1.0 + exact), (tally(1.0), tally(1.0)), estimate=estimate)
        for i, (exact, estimate) in enumerate([(0.1, 0.12), (0.5, 0.4), (0.3, 0.35), (0.9, 1.0)])
    ]
    outcomes.append(UnitOutcome(Unit("tensor", "only_est"), Tally(), (Tally(), Tally()), exact=False, estimate=2.0))
    agreement = estimate_agreement(outcomes, BASELINE)
    assert agreement["units"] == 4
    assert agreement["spearman"] == pytest.approx(1.0)
    assert agreement["kendall"] == pytest.approx(1.0)
    assert agreement["max_abs_error"] == pytest.approx(0.1)


def test_estimate_agreement_reports_how_deep_the_exact_top_sits_in_the_estimate_order():
    from critnet.results.ranking_rows import estimate_agreement
    from critnet.scoring import Tally, UnitOutcome

    baseline = UnitOutcome(None, Tally(10.0, 5, 9, 10), (Tally(), Tally()))
    # estimates rank units 0..5 in order; exact losses make units 4 and 1 the top two
    losses = [11.0, 30.0, 12.0, 13.0, 40.0, 10.5]
    outcomes = [UnitOutcome(None, Tally(loss, 5, 9, 10), (Tally(), Tally()), exact=i < 5, estimate=float(6 - i))
                for i, loss in enumerate(losses)]
    agreement = estimate_agreement(outcomes, baseline, "loss", top_k=2)
    assert agreement["units"] == 5 and agreement["deepest_top_k"] == 5  # unit 4 is 5th by estimate
    assert estimate_agreement(outcomes, baseline, "loss", top_k=1)["deepest_top_k"] == 5
    assert "deepest_top_k" not in estimate_agreement(outcomes, baseline)
