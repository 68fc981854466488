"""Approximate engine modes (taylor, hybrid, halving) and DDP sharding, against independent references."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from critnet.engine import EvaluationSet, evaluate_baseline, evaluate_units
from critnet.perturb import Perturbation, select_units
from critnet.tally import criticality_key, score_of
from test_engine import one_thread, state_checksum  # noqa: F401 - the fixture applies here too

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


def test_taylor_activation_estimate_tracks_small_exact_changes(resnet20_cifar, data):
    units = select_units(resnet20_cifar, "activation", include=[r"layer2\.1\.conv2"])[:6]
    perturbation = Perturbation("add", 1e-2)
    baseline = evaluate_baseline(resnet20_cifar, data)
    estimates = evaluate_units(resnet20_cifar, units, perturbation, data, method="taylor")
    exact = evaluate_units(resnet20_cifar, units, perturbation, data, method="exact")
    for e, x in zip(estimates, exact):
        delta = x.total.loss - baseline.total.loss
        assert e.estimate == pytest.approx(delta, rel=0.1, abs=2e-6), e.unit.label


def exact_top(outcomes, baseline, score, k):
    ids = [i for i, o in enumerate(outcomes) if o.exact]
    return sorted(ids, key=lambda i: (criticality_key(score_of(outcomes[i].total, baseline.total, score)), i))[:k]


@pytest.mark.parametrize("method", ["hybrid", "halving"])
def test_top_k_of_hybrid_and_halving_is_the_exact_top_k(resnet20_cifar, data, method):
    units = select_units(resnet20_cifar, "channel", include=[r"layer1\.0\.conv1", r"layer3\.1\.conv1"])
    baseline = evaluate_baseline(resnet20_cifar, data)
    exact = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method="exact")
    fast = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method=method, top_k=5)
    top = exact_top(exact, baseline, "loss", 5)
    assert exact_top(fast, baseline, "loss", 5) == top
    assert all(fast[i].total == exact[i].total and fast[i].halves == exact[i].halves for i in top)
    assert sum(o.exact for o in fast) < len(units)  # it did skip work
    for o in fast:
        if not o.exact:
            assert o.total.samples < baseline.total.samples
    if method == "hybrid":
        assert all(o.estimate is not None for o in fast)


class ThreadGather:
    """An all_gather among threads standing in for ranks (each with its own copy of the model)."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def for_rank(self, rank: int):
        def all_gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            gathered = list(self.slots)
            self.barrier.wait()
            return gathered

        return all_gather


def run_ranks(model, units, perturbation, data, world_size, **kwargs):
    gather = ThreadGather(world_size)
    results, errors = [None] * world_size, []
    counts = [0] * world_size

    def work(rank):
        def progress(done, total):
            counts[rank] = total

        try:
            results[rank] = evaluate_units(
                copy.deepcopy(model), units, perturbation, data, rank=rank, world_size=world_size,
                all_gather=gather.for_rank(rank), progress=progress, **kwargs,
            )
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
            gather.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results, counts


@pytest.mark.parametrize("world_size, method", [(2, "exact"), (3, "halving")])
def test_sharded_outcomes_do_not_depend_on_world_size(resnet20_cifar, data, world_size, method):
    units = select_units(resnet20_cifar, "channel", include=[r"layer1\.2\.conv2", r"layer3\.2\.conv2"])[::3]
    single = evaluate_units(resnet20_cifar, units, Perturbation("zero"), data, method=method, top_k=3)
    results, counts = run_ranks(resnet20_cifar, units, Perturbation("zero"), data, world_size, method=method, top_k=3)
    for outcomes in results:
        assert [(o.unit, o.total, o.halves, o.exact) for o in outcomes] == [
            (o.unit, o.total, o.halves, o.exact) for o in single
        ]
    assert all(c > 0 for c in counts) and sum(counts) >= len(units)
