"""Per-unit error bars of a ranking, and halving's certified top k (critnet.engine.certify)."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

import critnet
from critnet.choices import SettingError
from critnet.engine import certify
from critnet.evaluation_set import EvaluationSet, as_evaluation_set
from critnet.scoring import Z95
from tests.conftest import KERNEL_REL, f32_close


def small_data(n: int = 96, batch: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images labelled by a fixed function of their pixels (so that a network can learn them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    signal = x[:, 0].mean((1, 2)) * 3 + x[:, 1, :4].mean((1, 2)) * 2
    y = signal.argsort().argsort() * 5 // n  # five balanced classes
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A small conv net fitted to :func:`small_data`: a few of its channels matter a lot, most little, as in a
    trained classifier (a random network's channels all matter about equally little)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    x, y = (torch.cat(parts) for parts in zip(*small_data()))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture()
def small_model(trained) -> nn.Module:
    return copy.deepcopy(trained)


def per_image(model: nn.Module, data) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain loop: per-image cross-entropy and top-1 hits."""
    losses, hits = [], []
    with torch.no_grad():
        for x, y in data:
            logits = model(x)
            losses.append(nn.functional.cross_entropy(logits, y, reduction="none").double())
            hits.append(logits.argmax(1) == y)
    return torch.cat(losses), torch.cat(hits)


def test_exact_errors_agree_with_a_plain_per_image_computation(small_model):
    model, data = small_model, small_data()
    ranking = critnet.rank(model, data, unit="channel", perturbation="zero", score="delta_loss")
    base_losses, base_hits = per_image(model, data)
    n = len(base_losses)
    by_unit = {row["unit"]: row for row in ranking.rows}
    assert len(by_unit) == 8 + 8 + 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for unit in ranking.units:
        with torch.no_grad():
            dict(model.named_parameters())[unit.name][unit.index].zero_()
        losses, hits = per_image(model, data)
        model.load_state_dict(state)
        row = by_unit[unit.label]
        d = (losses - base_losses).tolist()
        se = statistics.stdev(d) / math.sqrt(n)
        mean = statistics.fmean(d)
        # The engine recomputes the zeroed channel alone and stacks perturbed copies: another kernel than this
        # loop, so per-image losses agree to float32 rounding; the error is compared at the scale of the losses.
        scale = max(abs(x) for x in losses.tolist())
        assert f32_close(row["delta_loss_se"], se, scale=scale, rel=KERNEL_REL), unit.label
        assert f32_close(row["delta_loss_lo"], mean - Z95 * se, scale=scale, rel=KERNEL_REL), unit.label
        assert f32_close(row["delta_loss_hi"], mean + Z95 * se, scale=scale, rel=KERNEL_REL), unit.label
        flips = (base_hits.double() - hits.double()).tolist()  # counts: identical whatever the kernel
        top1_se = 100 * statistics.stdev(flips) / math.sqrt(n)
        assert row["top1_drop_se"] == pytest.approx(top1_se, rel=1e-12, abs=1e-12), unit.label
        assert row["top1_drop_lo"] == pytest.approx(100 * statistics.fmean(flips) - Z95 * top1_se, abs=1e-9)


def test_errors_are_the_same_from_the_naive_loop_and_through_resume(small_model, tmp_path):
    model, data = small_model, small_data()
    exact = critnet.rank(model, data, unit="channel", perturbation="zero", resume_dir=tmp_path)
    resumed = critnet.rank(model, data, unit="channel", perturbation="zero", resume_dir=tmp_path)
    naive = critnet.rank(model, data, unit="channel", perturbation="zero", method="naive")
    columns = ("unit", "delta_loss_se", "delta_loss_lo", "delta_loss_hi", "top1_drop_se", "top1_drop_hi")
    # the resumed run reads back the records the first one wrote: the very same numbers
    assert [[r[c] for c in columns] for r in resumed.rows] == [[r[c] for c in columns] for r in exact.rows]
    naive_rows = {r["unit"]: r for r in naive.rows}
    for row in exact.rows:
        other = naive_rows[row["unit"]]
        assert other["top1_drop_se"] == row["top1_drop_se"]
        assert f32_close(other["delta_loss_se"], row["delta_loss_se"], scale=row["loss"], rel=KERNEL_REL)


def test_the_summary_and_the_files_carry_the_errors(small_model, tmp_path):
    model, data = small_model, small_data()
    ranking = critnet.rank(model, data, unit="channel", perturbation="zero", score="delta_loss", top_k=4)
    csv_path, json_path = ranking.report(tmp_path, print_table=False)
    header = csv_path.read_text().splitlines()[0].split(",")
    for column in ("delta_loss_se", "delta_loss_lo", "delta_loss_hi", "top1_drop_se", "top1_drop_lo", "top1_drop_hi"):
        assert column in header
    boundary = ranking.summary["levels"][0]["boundary"]
    rows = ranking.rows
    fourth = rows[3]
    assert boundary["unit"] == fourth["unit"] and boundary["interval"] == [fourth["delta_loss_lo"], fourth["delta_loss_hi"]]
    overlapping = [r for r in rows if r is not fourth and r["delta_loss_lo"] <= fourth["delta_loss_hi"]
                   and r["delta_loss_hi"] >= fourth["delta_loss_lo"]]
    assert boundary["overlapping"] == {"above": sum(r["rank"] < 4 for r in overlapping),
                                       "below": sum(r["rank"] > 4 for r in overlapping)}
    # the figure draws the intervals of the top units as error bars
    figure = ranking.plot_top_k()
    lines = [c for c in figure.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(lines) == 1


# ---------------------------------------------------------------------------------------------- the sequential test


def test_stage_sizes_double_up_to_the_whole_set():
    assert certify.stage_sizes(10_000, 256) == [256, 512, 1024, 2048, 4096, 10_000]
    assert certify.stage_sizes(1000, 256) == [256, 1000]
    assert certify.stage_sizes(300, 256) == [300]
    assert certify.stage_sizes(512, 256) == [256, 512]


def test_the_correction_is_bonferroni_over_units_and_tests():
    from scipy.stats import norm

    z = certify.critical_z(698, 5, 0.99)
    assert z == pytest.approx(norm.isf(0.01 / (698 * 5)), rel=1e-9)
    assert certify.critical_z(10, 0, 0.99) == 0.0


def test_bounds_are_normal_intervals_with_the_finite_population_correction():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 40, generator=g, dtype=torch.float64) + torch.arange(6.0, dtype=torch.float64)[:, None]
    values[2, 7] = math.nan
    estimate, lower, upper = certify.normal_bounds(values, population=100, z=3.0)
    for u, row in enumerate(values.tolist()):
        if u == 2:
            assert lower[u] == upper[u] == math.inf  # a broken unit is never eliminated
            continue
        margin = 3.0 * statistics.stdev(row) / math.sqrt(40) * math.sqrt((100 - 40) / 99)
        assert estimate[u].item() == pytest.approx(statistics.fmean(row), rel=1e-12)
        assert lower[u].item() == pytest.approx(statistics.fmean(row) - margin, rel=1e-12)
        assert upper[u].item() == pytest.approx(statistics.fmean(row) + margin, rel=1e-12)
    # the whole set: the mean is known exactly
    _, lower, upper = certify.normal_bounds(values[:, :40], population=40, z=3.0)
    assert torch.equal(lower[[0, 1, 3]], upper[[0, 1, 3]])


def test_bounds_with_a_control_variate_are_the_regression_estimator():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64)
    values = 2.0 * x + 0.3 * torch.randn(3, 50, generator=g, dtype=torch.float64) + 1.0
    known = torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64)  # the covariate's mean over the whole set
    estimate, lower, upper = certify.normal_bounds(values, population=500, z=2.5, covariate=x, covariate_mean=known)
    plain = certify.normal_bounds(values, population=500, z=2.5)
    for u in range(3):
        xs, ys = x[u].tolist(), values[u].tolist()
        slope = statistics.covariance(xs, ys) / statistics.variance(xs)
        mean = statistics.fmean(ys) + slope * (known[u].item() - statistics.fmean(xs))
        residuals = [b - slope * a for a, b in zip(xs, ys)]
        spread = math.sqrt(sum((r - statistics.fmean(residuals)) ** 2 for r in residuals) / (50 - 2))
        margin = 2.5 * spread / math.sqrt(50) * math.sqrt(450 / 499)
        assert estimate[u].item() == pytest.approx(mean, rel=1e-12)
        assert (upper[u] - lower[u]).item() == pytest.approx(2 * margin, rel=1e-10)
        assert (upper[u] - lower[u]) < 0.5 * (plain[2][u] - plain[1][u])  # the covariate explains most of the spread


def test_per_image_estimates_add_up_to_the_taylor_estimates(small_model):
    from critnet.engine.taylor_terms import per_sample_estimates, taylor_estimates

    data = as_evaluation_set(small_data())
    units = critnet.select_units(small_model, "channel") + critnet.select_units(small_model, "activation",
                                                                                include=[r"^3$"])
    for perturbation in (critnet.Perturbation("zero"), critnet.Perturbation("add", 0.05)):
        matrix = per_sample_estimates(small_model, units, perturbation, data)
        assert matrix.shape == (len(units), 96)
        sums = per_sample_estimates(small_model, units, perturbation, data, sums=True)
        assert torch.allclose(sums, matrix.sum(1), rtol=1e-12, atol=1e-12)
        # halving's stages read the images they test from the same pass (same batches, same values)
        keep = torch.zeros(96, dtype=torch.bool)
        keep[[0, 5, 31, 32, 70, 95]] = True
        same_sums, kept = per_sample_estimates(small_model, units, perturbation, data, sums=True, keep=keep)
        assert torch.equal(same_sums, sums) and torch.equal(kept, matrix[:, keep])
        # the per-image terms of the same first-order estimate, summed in another order
        for unit, mean, estimate in zip(units, matrix.mean(1).tolist(), taylor_estimates(small_model, units, perturbation, data)):
            assert f32_close(mean, estimate, scale=matrix.abs().max().item(), rel=KERNEL_REL), unit.label


def test_survivors_keep_every_unit_whose_upper_bound_reaches_the_kth_lower_bound():
    lower = torch.tensor([5.0, 1.0, 3.0, -1.0, math.inf])
    upper = torch.tensor([6.0, 2.9, 4.0, 3.0, math.inf])
    assert certify.survivors(lower, upper, 2).tolist() == [True, False, False, False, True]
    assert certify.survivors(lower, upper, 3).tolist() == [True, False, True, True, True]
    assert certify.survivors(lower[:2], upper[:2], 2).tolist() == [True, True]


def test_a_subset_of_a_streaming_set_streams_the_same_rows():
    data = small_data(n=100, batch=32)
    held = as_evaluation_set(data)
    streaming = EvaluationSet.from_batches(data, memory_budget_mb=0.001)
    assert held.in_memory and not streaming.in_memory
    positions = [0, 5, 31, 32, 33, 64, 99] + list(range(40, 60))
    a, b = held.subset(positions), streaming.subset(positions)
    assert a.in_memory and not b.in_memory
    assert a.batch_sizes == b.batch_sizes == [27]  # regrouped into batches of at most 32
    x = torch.cat([x for x, _ in data])
    expected = x[sorted(positions)]
    assert torch.equal(torch.cat([x for x, _ in a]), expected)
    assert torch.equal(torch.cat([x for x, _ in b]), expected)
    with pytest.raises(ValueError, match="positions"):
        held.subset([100])


@pytest.fixture()
def staged(monkeypatch):
    """Stages of 16, 32, 64 and 96 images on the small set, so that several tests run."""
    monkeypatch.setattr(certify, "FIRST_STAGE", 16)


def test_halving_reports_the_exact_top_k_with_exact_full_set_scores(small_model, staged, tmp_path):
    # the normal bound eliminates units on these 96 images; the engine's bookkeeping is the same for both bounds
    model, data = small_model, small_data(n=96)
    options = dict(unit="channel", perturbation="zero", score="delta_loss", top_k=3, bound="normal")
    exact = critnet.rank(model, data, **options)
    fast = critnet.rank(model, data, method="halving", resume_dir=tmp_path, **options)
    test = fast.summary["levels"][0]["top_k_test"]
    assert [s["images"] for s in test["stages"]][-1] == 96 and test["first_stage"] == 16
    assert test["tests"] == 2 and test["correction"] == "bonferroni over units × tests"
    assert test["top_k_confidence"] == 0.99 and test["bound"] == "normal" and test["guarantee"] == "nominal"
    assert test["control_variate"] == "first-order Taylor per image"
    assert sum(s["eliminated"] for s in test["stages"]) + test["units_at_full_set"] == len(fast.units)
    assert test["units_at_full_set"] < len(fast.units)  # it did skip work
    sizes = [s["images"] for s in test["stages"]]
    new_images = [b - a for a, b in zip([0] + sizes, sizes)]
    assert test["unit_images"] == sum(s["units"] * m for s, m in zip(test["stages"], new_images))
    # Halving evaluates its stages in other batches than the exact method: per-image losses agree to float32
    # rounding (bit for bit where the kernels do not depend on the batch size), hit counts exactly.
    exact_rows = {r["unit"]: r for r in exact.rows}
    kth = exact.rows[2]["score"]
    for row in fast.top(3):
        assert row["exact"] and row["samples"] == 96
        other = exact_rows[row["unit"]]
        assert other["score"] >= kth - KERNEL_REL * other["loss"]
        assert f32_close(row["score"], other["score"], scale=other["loss"], rel=KERNEL_REL)
        assert row["top1"] == other["top1"] and row["top1_drop_se"] == other["top1_drop_se"]
    exact_units = [r for r in fast.rows if r["exact"]]
    assert len(exact_units) == test["units_at_full_set"]
    # an eliminated unit is scored on the images it saw (the first of the seeded order), paired with the unperturbed
    # model on those same images: a plain per-image loop over the zeroed channel gives the same numbers
    order = certify.sample_order(96, 0)
    base_losses, base_hits = per_image(model, data)
    units = {u.label: u for u in fast.units}
    for row in fast.rows:
        if not row["exact"]:
            assert row["samples"] < 96
            seen = order[: row["samples"]]
            zeroed = copy.deepcopy(model)
            with torch.no_grad():
                zeroed.get_parameter(units[row["unit"]].name)[row["index"]] = 0
            losses, hits = per_image(zeroed, data)
            assert f32_close(row["delta_loss"], (losses - base_losses)[seen].mean().item(),
                             scale=base_losses[seen].mean().item(), rel=KERNEL_REL)
            assert row["top1"] == pytest.approx(100 * hits[seen].double().mean().item(), rel=1e-12)
            assert math.isfinite(row["delta_loss_se"])
    # resuming reads every stage back: the same outcome, bit for bit
    again = critnet.rank(model, data, method="halving", resume_dir=tmp_path, **options)
    assert again.rows == fast.rows
    # a memory budget too small to keep the tested images' estimates from the full-set pass: each stage makes its
    # own pass over its new images (other batches, so the estimates agree to rounding): the same top k
    small = critnet.rank(model, data, method="halving", memory_budget_mb=1e-4, **options)
    assert [r["unit"] for r in small.top(3)] == [r["unit"] for r in fast.top(3)]
    assert small.levels[0].top_k_test["control_variate"] == test["control_variate"]


def test_halving_settings_are_checked():
    with pytest.raises(SettingError, match="top_k_confidence"):
        critnet.RankSettings(method="halving", top_k_confidence=1.0)
    with pytest.raises(SettingError, match="top_k_confidence"):
        critnet.RankSettings(method="halving", top_k_confidence=float("nan"))


# ------------------------------------------------------------------------- the betting bound (finite-sample)


def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("population", ["rare", "lognormal", "two_point", "uniform"])
def test_betting_bounds_hold_at_every_look_in_simulation(population):
    """Each one-sided bound is wrong, at any of several looks, at most ``alpha`` of the time: checked over 600
    random orders of hard populations (a 1 % rare effect, a heavy tail, two values far apart), against the
    error a binomial count of 600 allows. Orders are the rows of one tensor, so one call bounds them all."""
    from scipy.stats import binom

    g = torch.Generator().manual_seed(3)
    n, alpha, orders = 500, 0.1, 600
    values = {
        "rare": torch.cat([torch.full((5,), 1.0), torch.zeros(n - 5)]),
        "lognormal": (2.0 * torch.randn(n, generator=g, dtype=torch.float64)).exp().clamp(max=100.0),
        "two_point": torch.cat([torch.full((250,), -1.0), torch.full((250,), 1.0)]),
        "uniform": torch.rand(n, generator=g, dtype=torch.float64),
    }[population].double()
    low, high = float(values.min()), float(values.max())
    if population == "rare":
        low = -1.0  # a declared range wider than the values seen
    mean = values.mean().item()
    drawn = values[torch.stack([torch.randperm(n, generator=g) for _ in range(orders)])]
    above = torch.zeros(orders, dtype=torch.bool)
    below = torch.zeros(orders, dtype=torch.bool)
    for look in (10, 40, 120, 300, 499):
        _, lower, upper = certify.betting_bounds(drawn[:, :look], n, alpha, low, high)
        assert (lower <= upper).all()
        above |= lower > mean
        below |= upper < mean
    limit = binom.ppf(0.999, orders, alpha)  # a count this high happens once in 1,000 runs of a valid bound
    assert above.sum() <= limit and below.sum() <= limit, (int(above.sum()), int(below.sum()), limit)


def test_betting_bounds_shrink_to_the_mean_of_the_whole_set():
    values = torch.tensor([[0.0, 1.0, 0.0, 1.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    estimate, lower, upper = certify.betting_bounds(values, population=4, alpha=0.01, low=0.0, high=5.0)
    # every image seen: only the true mean is possible (to the bisection's precision of the range)
    assert torch.allclose(lower, torch.tensor([0.5, 5.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(upper, torch.tensor([0.5, 5.0], dtype=torch.float64), atol=1e-9)
    broken = certify.betting_bounds(torch.tensor([[0.0, math.nan]]), 10, 0.01, 0.0, 1.0)
    assert broken[1].item() == broken[2].item() == math.inf  # a broken network is never eliminated


def test_betting_halving_eliminates_units_and_keeps_the_exact_top_k():
    """A network whose five leading units hurt every image by far more than the rest: the betting bound
    eliminates the rest early, the top 5 are the exact top 5 with exact full-set scores, and an eliminated unit's
    scores are over the images it saw (the first of the seeded order), as a plain per-image loop gives them."""
    coverage = _bench("topk_coverage")
    model, data, _ = coverage.rare_effect_network(images=2000, share=0.0)  # no rare unit: a wide gap
    options = dict(unit="channel", perturbation="zero", include=["features.weight"], score="delta_loss", top_k=4)
    exact = critnet.rank(model, data, **options)
    fast = critnet.rank(model, data, method="halving", **options)
    test = fast.levels[0].top_k_test
    assert test["bound"] == "betting" and test["guarantee"] == "finite-sample" and test["control_variate"] is None
    assert test["range_width"] == certify.LOSS_CLIP and 0 < test["largest_value"] < certify.LOSS_CLIP
    assert test["units_at_full_set"] < len(fast.units)  # it did skip work
    assert [r["unit"] for r in fast.top(4)] == [r["unit"] for r in exact.top(4)]
    for row, reference in zip(fast.top(4), exact.top(4)):
        assert row["exact"] and row["samples"] == 2000
        assert f32_close(row["score"], reference["score"], scale=reference["loss"], rel=KERNEL_REL)
    order = certify.sample_order(2000, 0)
    base, _ = per_image(model, data)
    x = torch.cat([x for x, _ in data])
    for row in fast.rows:
        if not row["exact"]:
            unit = int(row["index"])
            cut = x.clone()
            cut[:, unit] = 0  # the identity features: zeroing the channel zeroes this contribution
            losses, _ = per_image(model, [(cut, torch.zeros(len(cut), dtype=torch.long))])
            seen = order[: row["samples"]]
            assert f32_close(row["delta_loss"], (losses - base)[seen].mean().item(), scale=1.0, rel=KERNEL_REL)


def test_a_rare_effect_unit_defeats_the_normal_bound_but_not_the_betting_bound():
    """The fifth most critical unit does all its damage on 1 % of the images. The normal bound eliminates it
    exactly when the first stage holds none of those images (its spread there is 0); the betting bound never
    does, because the declared range says what the images not yet seen could still hold."""
    coverage = _bench("topk_coverage")
    model, data, truth = coverage.rare_effect_network()
    x = torch.cat([x for x, _ in data])
    rare_images = set((x[:, 4] > 0).nonzero().squeeze(1).tolist())
    first_stage = certify.stage_sizes(2000)[0]
    options = dict(unit="channel", perturbation="zero", include=["features.weight"], score="delta_loss",
                   method="halving", top_k=5)
    for seed in range(12):
        missed = not rare_images & set(certify.sample_order(2000, seed)[:first_stage].tolist())
        normal = critnet.rank(model, data, seed=seed, bound="normal", **options)
        betting = critnet.rank(model, data, seed=seed, **options)
        assert (sorted(r["unit"] for r in normal.top(5)) != sorted(truth)) == missed, seed
        assert sorted(r["unit"] for r in betting.top(5)) == sorted(truth), seed


def test_a_loss_beyond_the_clip_voids_the_guarantee_and_says_so(capsys):
    from critnet.results.ranking_result import top_k_test_note

    coverage = _bench("topk_coverage")
    model, data, _ = coverage.rare_effect_network(images=600)
    ranking = critnet.rank(model, data, unit="channel", perturbation="zero", include=["features.weight"],
                           score="delta_loss", method="halving", top_k=5, loss_clip=10.0)
    test = ranking.levels[0].top_k_test
    assert test["guarantee"].startswith("void") and test["largest_value"] > 10.0 and test["values_outside_range"] > 0
    assert top_k_test_note(test, ranking.rows).startswith("halving: NO GUARANTEE (void")
    normal = critnet.rank(model, data, unit="channel", perturbation="zero", include=["features.weight"],
                          score="delta_loss", method="halving", top_k=5, bound="normal")
    assert "nominal" in top_k_test_note(normal.levels[0].top_k_test, normal.rows)
    assert normal.summary["levels"][0]["top_k_test"]["guarantee"] == "nominal"


def test_a_non_finite_covariate_falls_back_to_the_plain_normal_bound():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(3, 30, generator=g, dtype=torch.float64) + 1.0
    covariate = values + 0.1 * torch.randn(3, 30, generator=g, dtype=torch.float64)
    covariate[0, 5] = math.inf
    known = torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)
    with_cv = certify.normal_bounds(values, 100, 3.0, covariate, known)
    plain = certify.normal_bounds(values, 100, 3.0)
    for u in (0, 1):  # the broken covariate and the broken mean: the plain bound, finite
        assert all(t[u].item() == p[u].item() for t, p in zip(with_cv, plain)), u
    assert (with_cv[2][2] - with_cv[1][2]) < (plain[2][2] - plain[1][2])  # the usable one still narrows


def test_survivors_always_keep_top_k_units_even_with_nan_bounds():
    lower = torch.tensor([math.nan, 1.0, math.nan, 0.5])
    upper = torch.tensor([math.nan, 0.9, 0.2, 0.6])
    keep = certify.survivors(lower, upper, 2)
    assert int(keep.sum()) >= 2 and keep[1] and keep[3]


def test_bound_settings_are_checked():
    with pytest.raises(SettingError, match="bound"):
        critnet.RankSettings(method="halving", bound="hoeffding")
    with pytest.raises(SettingError, match="loss_clip"):
        critnet.RankSettings(method="halving", loss_clip=0.0)
    assert critnet.RankSettings().as_dict(resume=False)["bound"] == "betting"


@pytest.mark.slow
def test_the_coverage_benchmark_in_small():
    """``bench/topk_coverage.py`` on 200 seeds of each synthetic scenario and 100 of the network: the betting
    bound's top k is never wrong, and the last line says so."""
    coverage = _bench("topk_coverage")
    rows = coverage.run({name: coverage.synthetic(name) for name in ("gaussian", "lognormal2", "rare1", "rare05")},
                        ["betting", "normal"], 200, 0.99)
    rows += coverage.network_run(100)
    assert all(r["wrong"] == 0 for r in rows if r["bound"] == "betting")
    assert any(r["wrong"] > 0 for r in rows if r["bound"] == "normal" and r["scenario"] == "rare05")
    assert coverage.last_line(rows).startswith("worst_wrong_rate=0.0000 ")


def test_betting_bounds_keep_the_mean_when_almost_every_image_is_seen():
    """Near the whole set the mean of the images left is a ratio of large sums over very few images, and only
    rounding separates the true mean from the candidates the values seen rule out: the bounds must still hold it."""
    g = torch.Generator().manual_seed(5)
    values = torch.rand(20, 50_000, generator=g, dtype=torch.float64)
    mean = values.mean(dim=1)
    for seen in (49_999, 50_000):
        _, lower, upper = certify.betting_bounds(values[:, :seen], 50_000, 0.01, 0.0, 1.0)
        assert (lower <= mean).all() and (mean <= upper).all(), seen
