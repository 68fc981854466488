"""Approximate engine modes (taylor, hybrid, halving) and DDP sharding, against independent references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_engine import state_checksum

from conftest import KERNEL_REL, f32_close
from critnet.evaluation_set import EvaluationSet
from critnet.engine import evaluate_baseline, evaluate_units
from critnet.perturb import Perturbation
from critnet.selection import select_units
from critnet.scoring import criticality_key, score_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def data(cifar_test_256):
    return EvaluationSet.from_batches(cifar_test_256)


def reference_gradients(model, batches):
    """∂(mean loss)/∂parameter by plain backward passes on a copy of the model."""
    clone = copy.deepcopy(model)
    clone.zero_grad()
    n = sum(len(y) for _, y in batches)
    for x, y in batches:
        (F.cross_entropy(clone(x), y, reduction="sum") / n).backward()
    return {name: p.grad.double() for name, p in clone.named_parameters()}


def test_taylor_is_the_first_order_term(resnet20_cifar, cifar_test_256, data):
    grads = reference_gradients(resnet20_cifar, cifar_test_256)
    params = dict(resnet20_cifar.named_parameters())
    units = select_units(resnet20_cifar, "channel", include=[r"layer1\.1\.conv1", r"linear"])
    units += select_units(resnet20_cifar, "tensor", include=[r"layer2\.2\.bn2\.weight"])
    before = state_checksum(resnet20_cifar)
    for perturbation in (Perturbation("zero"), Perturbation("add", 0.1)):
        outcomes = evaluate_units(resnet20_cifar, units, perturbation, data, method="taylor")
        for unit, outcome in zip(units, outcomes):
            w, g = params[unit.name].detach().double(), grads[unit.name]
            if unit.index is not None:
                w, g = w[unit.index], g[unit.index]
            expected = (-(w * g)).sum().item() if perturbation.kind == "zero" else 0.1 * g.sum().item()
            assert not outcome.exact and outcome.total.samples == 0
            assert outcome.estimate == pytest.approx(expected, rel=1e-4, abs=1e-7), unit.label
    assert state_checksum(resnet20_cifar) == before
    assert all(p.grad is None for p in resnet20_cifar.parameters())


def test_second_order_adds_half_the_squared_per_sample_derivatives(resnet20_cifar, cifar_test_256):
    """Against per-sample gradients from one backward pass per image on a copy of the model."""
    from critnet.engine.taylor_terms import taylor_estimates

    batches = [(cifar_test_256[0][0][:12], cifar_test_256[0][1][:12]), (cifar_test_256[1][0][:7], cifar_test_256[1][1][:7])]
    data = EvaluationSet.from_batches(batches)
    clone = copy.deepcopy(resnet20_cifar).eval()
    params = dict(clone.named_parameters())
    units = select_units(resnet20_cifar, "channel", include=[r"layer2\.0\.conv1", r"linear"])[::5]
    units += select_units(resnet20_cifar, "tensor", include=[r"layer3\.1\.bn1", r"layer1\.0\.conv2"])
    acts = select_units(resnet20_cifar, "activation", include=[r"layer2\.2\.conv2"])[:3]
    modules = dict(clone.named_modules())
    for perturbation in (Perturbation("zero"), Perturbation("add", 0.1)):
        first = taylor_estimates(resnet20_cifar, units + acts, perturbation, data, order=1)
        second = taylor_estimates(resnet20_cifar, units + acts, perturbation, data, order=2)
        fisher = [0.0] * len(units + acts)
        for x, y in batches:
            for i in range(len(y)):
                captured = {}
                handles = [modules[u.name].register_forward_hook(
                    lambda m, a, out, name=u.name: captured.__setitem__(name, out)) for u in acts]
                loss = F.cross_entropy(clone(x[i : i + 1]), y[i : i + 1])
                for h in handles:
                    h.remove()
                wrt = [params[u.name] for u in units] + [captured[u.name] for u in acts]
                grads = torch.autograd.grad(loss, wrt)
                for k, (unit, g) in enumerate(zip(units + acts, grads)):
                    if unit.kind == "activation":
                        v = captured[unit.name][:, unit.index].detach()
                        d = ((perturbation.apply(v, unit) - v) * g[:, unit.index]).sum()
                    else:
                        v = params[unit.name].detach()
                        if unit.index is not None:
                            v, g = v[unit.index], g[unit.index]
                        d = ((perturbation.apply(v.clone(), unit) - v) * g).sum()
                    fisher[k] += 0.5 * d.double().item() ** 2
        n = sum(len(y) for _, y in batches)
        for unit, a, b, f in zip(units + acts, first, second, fisher):
            assert b - a == pytest.approx(f / n, rel=1e-3, abs=1e-9), (perturbation.kind, unit.label)
            assert f > 0, unit.label  # a check that could not fail on zeros


class _SharedLayer(torch.nn.Module):
    """The same Linear applied twice: its per-sample derivative is the sum over both calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_second_order_of_a_module_called_twice_sums_its_calls_first():
    from critnet.engine.taylor_terms import taylor_estimates

    model = _SharedLayer().eval()
    x, y = torch.randn(9, 6, generator=torch.Generator().manual_seed(1)), torch.arange(9) % 4
    data = EvaluationSet.from_batches([(x[:5], y[:5]), (x[5:], y[5:])])
    units = select_units(model, "channel", include=[r"inner\.weight"]) + select_units(model, "tensor")
    perturbation = Perturbation("add", 0.05)
    gap = [b - a for a, b in zip(taylor_estimates(model, units, perturbation, data, order=1),
                                 taylor_estimates(model, units, perturbation, data, order=2))]
    params = dict(model.named_parameters())
    expected = [0.0] * len(units)
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [params[u.name] for u in units])
        for k, (unit, g) in enumerate(zip(units, grads)):
            v = params[unit.name].detach()
            if unit.index is not None:
                v, g = v[unit.index], g[unit.index]
            expected[k] += 0.5 * ((perturbation.apply(v.clone(), unit) - v) * g).sum().item() ** 2 / len(y)
    assert gap == pytest.approx(expected, rel=1e-4, abs=1e-10)


def test_activation_terms_of_a_module_called_twice_cover_both_calls():
    """The perturbation's hook changes every call of the module, so each image's term sums both calls (the order-1
    estimate used to read only the last one). Reference: the float64 central difference of each image's loss."""
    from critnet.engine.taylor_terms import per_sample_estimates, taylor_estimates
    from critnet.perturb import Unit, perturbed

    model = _SharedLayer().double().eval()
    x, y = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), torch.arange(9) % 4
    data = EvaluationSet.from_batches([(x[:5], y[:5]), (x[5:], y[5:])])
    units = [Unit("activation", "inner", c) for c in (0, 3)]
    eps = 1e-5
    up, down = Perturbation("scale", 1 + eps), Perturbation("scale", 1 - eps)

    def losses(unit, perturbation):
        with torch.no_grad(), perturbed(model, unit, perturbation):
            return F.cross_entropy(model(x), y, reduction="none")

    reference = torch.stack([(losses(u, up) - losses(u, down)) / 2 for u in units])
    rounding = 4 * torch.finfo(torch.float64).eps * losses(units[0], up).max().item()
    ours = per_sample_estimates(model, units, up, data)
    for unit, mine, theirs, estimate in zip(units, ours, reference, taylor_estimates(model, units, up, data)):
        tolerance = 1e-6 * theirs.abs().max().item() + rounding
        assert (mine - theirs).abs().max().item() <= tolerance, unit.label
        assert estimate == pytest.approx(theirs.mean().item(), abs=tolerance), unit.label


def test_taylor_activation_estimate_tracks_small_exact_changes(resnet20_cifar, data):
    units = select_units(resnet20_cifar, "activation", include=[r"layer2\.1\.conv2"])[:6]
    perturbation = Perturbation("add", 1e-2)
    baseline = evaluate_baseline(resnet20_cifar, data)
    estimates = evaluate_units(resnet20_cifar, units, perturbation, data, method="taylor")
    exact = evaluate_units(resnet20_cifar, units, perturbation, data, method="exact")
    for e, x in zip(estimates, exact):
        delta = x.total.loss - baseline.total.loss
        assert e.estimate == pytest.approx(delta, rel=0.1, abs=2e-6), e.unit.label


def assert_same_tallies(a, b):
    """Equal hit and sample counts; loss sums to float32 rounding."""
    for x, y in zip((a.total, *a.halves), (b.total, *b.halves)):
        assert (x.top1_correct, x.top5_correct, x.samples) == (y.top1_correct, y.top5_correct, y.samples), a.unit.label
        assert f32_close(x.loss_sum, y.loss_sum, rel=KERNEL_REL), a.unit.label


def exact_top(outcomes, baseline, score, k):
    ids = [i for i, o in enumerate(outcomes) if o.exact]
    return sorted(ids, key=lambda i: (criticality_key(score_of(outcomes[i].total, baseline.total, score)), i))[:k]


def test_halving_top_k_is_the_exact_top_k(resnet20_cifar, data, monkeypatch):
    from critnet.engine import certify

    monkeypatch.setattr(certify, "FIRST_STAGE", 32)  # stages of 32, 64, 128 and 256 images: three tests
    # every fourth channel of an early and a late layer: 20 units, the early ones with nearly the whole network after
    units = select_units(resnet20_cifar, "channel", include=[r"layer1\.0\.conv1", r"layer3\.1\.conv1"])[::4]
    baseline = evaluate_baseline(resnet20_cifar, data)
    exact = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method="exact")
    # the normal bound eliminates units on 256 images (the betting bound's range term needs more); the bookkeeping
    # checked here is the same for both
    fast = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method="halving", top_k=5,
                          bound="normal")
    top = exact_top(exact, baseline, "loss", 5)
    # Halving evaluates its stages (32, 32, 64 and 128 new images) in other batches than the exact method's two of
    # 128, and another batch size may take another kernel: per-sample losses, and so the full-set tallies (summed
    # batch by batch like the exact method), agree to float32 rounding, bit for bit only where the kernels do not
    # depend on the batch size. Its top 5 are the exact top 5, but for units within that rounding of the fifth.
    fifth = exact[top[-1]].total.loss_sum
    for i in exact_top(fast, baseline, "loss", 5):
        assert exact[i].total.loss_sum >= fifth * (1 - KERNEL_REL), units[i].label
        assert_same_tallies(fast[i], exact[i])
    assert 5 <= sum(o.exact for o in fast) < len(units)  # it did skip work
    for o in fast:
        if not o.exact:
            assert 0 < o.total.samples < baseline.total.samples


def test_hybrid_checks_the_estimated_top_exactly(resnet20_cifar, data):
    units = select_units(resnet20_cifar, "channel", include=[r"layer3\.1\.conv1"])
    estimates = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method="taylor")
    fast = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method="hybrid", top_k=4)
    by_estimate = sorted(range(len(units)), key=lambda i: (criticality_key(estimates[i].estimate), i))
    checked = [i for i, o in enumerate(fast) if o.exact]
    # the exactly evaluated units are the estimated most critical ones, at least two rounds of top_k
    assert sorted(checked) == sorted(by_estimate[: len(checked)]) and len(checked) >= 8
    # Bit for bit: the exact method's code on the same batches of 128, which are never stacked with other units'
    # copies on a CPU (nor on a GPU unless stacking was verified to leave the logits unchanged), so evaluating the
    # checked units alone gives what evaluating all of them would.
    exact = dict(zip(checked, evaluate_units(resnet20_cifar, [units[i] for i in checked], Perturbation("zero"), data,
                                             method="exact")))
    for i, o in enumerate(fast):
        assert o.estimate == estimates[i].estimate
        if o.exact:
            assert (o.total, o.halves) == (exact[i].total, exact[i].halves)
        else:
            assert o.total.samples == 0


def test_two_processes_give_the_single_process_outcomes(resnet20_cifar, data, gloo_runs):
    """The two gloo processes of tests/gloo_runs.py (fixture gloo_runs) shard these units over rank 0 and 1."""
    import json

    from gloo_runs import ENGINE_LAYERS

    assert ENGINE_LAYERS == [r"layer1\.2\.conv2", r"layer3\.2\.conv2"]
    units = select_units(resnet20_cifar, "channel", include=[r"layer1\.2\.conv2", r"layer3\.2\.conv2"])[::3]
    for method in ("exact", "halving"):
        single = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method=method, top_k=3,
                                **({"bound": "normal"} if method == "halving" else {}))
        expected = [[o.unit.label, o.exact] + [[t.loss_sum, t.top1_correct, t.top5_correct, t.samples]
                    for t in o.halves] for o in single]
        ranks = [json.loads((gloo_runs / "engine" / f"{r}.json").read_text()) for r in range(2)]
        for r in ranks:
            if method == "exact":
                # each unit evaluated by one rank, on the same batches of 128 with the same kernels: bit for bit
                assert r["result"][method] == expected, method
            else:
                # halving stacks as many perturbed copies into a suffix batch as a rank holds units at that layer,
                # which differs between one and two ranks: another batch size, maybe another kernel
                assert [row[:2] for row in r["result"][method]] == [row[:2] for row in expected]
                for got, want in zip(r["result"][method], expected):
                    for (loss, *counts), (ref_loss, *ref_counts) in zip(got[2:], want[2:]):
                        assert counts == ref_counts and f32_close(loss, ref_loss, rel=KERNEL_REL), got[0]
        # each rank evaluated only its share in the exact run
        assert 0 < ranks[0]["counts"]["exact"] < len(units) and 0 < ranks[1]["counts"]["exact"] < len(units)
