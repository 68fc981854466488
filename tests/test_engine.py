"""The engine against an independent reference loop (perturb, full forward, restore) on the public ResNet20."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_REL, f32_close
from critnet.evaluation_set import EvaluationSet
from critnet.engine import evaluate_baseline, evaluate_units
from critnet.perturb import Perturbation, perturbed
from critnet.selection import select_units


def state_checksum(model) -> str:
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference(model, units, perturbation, batches):
    """Per unit: (loss sum, top-1 hits, top-5 hits) over all batches, and the same for the two halves."""
    results = []
    for unit in units:
        with torch.no_grad(), perturbed(model, unit, perturbation):
            losses, hit1, hit5 = [], [], []
            for x, y in batches:
                logits = model(x)
                losses.append(F.cross_entropy(logits, y, reduction="none").double())
                hit1.append(logits.argmax(1) == y)
                hit5.append((logits.topk(5, 1).indices == y[:, None]).any(1))
            losses, hit1, hit5 = torch.cat(losses), torch.cat(hit1), torch.cat(hit5)
        results.append(
            {
                "loss": losses.sum().item(),
                "top1": int(hit1.sum()),
                "top5": int(hit5.sum()),
                "halves": [
                    (losses[s].sum().item(), int(hit1[s].sum()), int(hit5[s].sum()))
                    for s in (slice(0, None, 2), slice(1, None, 2))  # even / odd sample indices
                ],
            }
        )
    return results


def assert_matches(outcomes, expected, units, samples=256):
    """Hit counts exactly; loss sums to float32 rounding: the engine recomputes a perturbed channel with a
    one-channel convolution, another kernel than the full layer's (tensor and activation units run the very same
    ops as the reference and agree bit for bit here, but the tolerance need not tell them apart)."""
    assert [o.unit for o in outcomes] == list(units)
    for outcome, ref in zip(outcomes, expected):
        label = outcome.unit.label
        assert outcome.exact, label
        assert outcome.total.samples == samples, label
        assert outcome.total.top1_correct == ref["top1"], label
        assert outcome.total.top5_correct == ref["top5"], label
        assert f32_close(outcome.total.loss_sum, ref["loss"], rel=KERNEL_REL), label
        for half, (loss, top1, top5) in zip(outcome.halves, ref["halves"]):
            assert (half.top1_correct, half.top5_correct, half.samples) == (top1, top5, samples // 2), label
            assert f32_close(half.loss_sum, loss, rel=KERNEL_REL), label


@pytest.fixture()
def data(cifar_test_256):
    return EvaluationSet.from_batches(cifar_test_256)


@pytest.fixture(scope="module")
def two_batches(cifar_test_256):
    """The first 64 of those images in two batches of 32, for the engine-against-reference cases: still several
    batches and both halves, and a quarter of the reference loop's full forward passes over all 256."""
    x, y = cifar_test_256[0]
    return [(x[:32], y[:32]), (x[32:64], y[32:64])]


def test_baseline_is_the_plain_forward_pass(resnet20_cifar, cifar_test_256, data):
    baseline = evaluate_baseline(resnet20_cifar, data)
    with torch.no_grad():
        logits = torch.cat([resnet20_cifar(x) for x, _ in cifar_test_256])
    y = torch.cat([y for _, y in cifar_test_256])
    assert baseline.unit is None
    assert baseline.total.samples == 256
    assert baseline.total.top1_correct == int((logits.argmax(1) == y).sum())
    assert f32_close(baseline.total.loss, F.cross_entropy(logits, y).item())  # float64 sum vs float32 mean
    assert baseline.halves[0].samples == baseline.halves[1].samples == 128


def test_naive_matches_reference_and_restores(resnet20_cifar, two_batches):
    data = EvaluationSet.from_batches(two_batches)
    units = select_units(resnet20_cifar, "channel", include=[r"layer3\.2\.conv2"])[:2]
    units += select_units(resnet20_cifar, "tensor", include=[r"layer2\.0\.bn1\.weight"])
    before = state_checksum(resnet20_cifar)
    outcomes = evaluate_units(resnet20_cifar, units, Perturbation("add", 0.5), data, method="naive")
    assert state_checksum(resnet20_cifar) == before
    assert_matches(outcomes, reference(resnet20_cifar, units, Perturbation("add", 0.5), two_batches), units, 64)


def some_units(model, kind):
    """A few units spread over the network: the stem, a residual block, the last stage and the classifier."""
    if kind == "tensor":
        return select_units(model, "tensor", include=[r"^conv1\.", r"layer1\.0\.bn1", r"layer2\.0\.conv2", r"linear"])
    layers = [r"^conv1$|^conv1\.", r"layer1\.0\.conv2", r"layer3\.2\.conv1", r"linear"]
    units = []
    for layer in layers:
        units += select_units(model, kind, include=[layer])[:2]
    return units


@pytest.mark.parametrize(
    "kind, perturbation",
    [
        ("channel", Perturbation("zero")),
        ("channel", Perturbation("noise", 0.5, relative=True, seed=3)),
        ("tensor", Perturbation("add", 0.1)),
        ("tensor", Perturbation("bitflip", 27)),
        ("activation", Perturbation("scale", -2.0)),
        ("activation", Perturbation("noise", 1.0, seed=1)),
    ],
    ids=lambda v: v if isinstance(v, str) else v.label,
)
def test_exact_equals_reference_loop(resnet20_cifar, two_batches, kind, perturbation):
    data = EvaluationSet.from_batches(two_batches)
    units = some_units(resnet20_cifar, kind)
    before = state_checksum(resnet20_cifar)
    outcomes = evaluate_units(resnet20_cifar, units, perturbation, data, method="exact")
    assert state_checksum(resnet20_cifar) == before
    assert not any(m._forward_hooks for m in resnet20_cifar.modules())
    assert_matches(outcomes, reference(resnet20_cifar, units, perturbation, two_batches), units, 64)


def test_exact_in_segments_and_streamed_data_gives_the_same_tallies(resnet20_cifar, cifar_test_256):
    units = select_units(resnet20_cifar, "channel", include=[r"layer1\.2\.conv1", r"layer3\.0\.conv2"])[::20]
    held = EvaluationSet.from_batches([(x[:64], y[:64]) for x, y in cifar_test_256])
    streamed = EvaluationSet.from_batches([(x[:32], y[:32]) for x, y in cifar_test_256] * 2, memory_budget_mb=0.5)
    assert held.in_memory and not streamed.in_memory and streamed.samples == 128
    whole = evaluate_units(resnet20_cifar, units, Perturbation("zero"), held, method="exact")
    # a budget below one batch's cached activations: every batch is its own segment
    split = evaluate_units(resnet20_cifar, units, Perturbation("zero"), held, method="exact", memory_budget_mb=1)
    assert [(o.total, o.halves) for o in split] == [(o.total, o.halves) for o in whole]
    naive = evaluate_units(resnet20_cifar, units, Perturbation("zero"), streamed, method="naive")
    fast = evaluate_units(resnet20_cifar, units, Perturbation("zero"), streamed, method="exact", memory_budget_mb=1)
    for a, b in zip(naive, fast):
        assert (a.total.top1_correct, a.total.top5_correct) == (b.total.top1_correct, b.total.top5_correct)
        assert a.total.loss == pytest.approx(b.total.loss, abs=1e-6)


class Boom(RuntimeError):
    pass


def raise_after(n):
    def progress(done, total):
        if done >= n:
            raise Boom(f"injected after {done} units")

    return progress


@pytest.mark.parametrize("method", ["naive", "exact", "hybrid", "halving"])
def test_model_is_bit_identical_after_an_exception(resnet20_cifar, two_batches, method):
    data = EvaluationSet.from_batches(two_batches)
    units = select_units(resnet20_cifar, "activation", include=[r"layer2\.1\.conv1"])[:2]
    units += select_units(resnet20_cifar, "channel", include=[r"layer3\.1\.conv2"])[:3]
    before = state_checksum(resnet20_cifar)
    with pytest.raises(Boom):
        evaluate_units(resnet20_cifar, units, Perturbation("add", 3.0), data, method=method, top_k=1,
                       progress=raise_after(3))
    assert state_checksum(resnet20_cifar) == before
    assert not any(m._forward_hooks for m in resnet20_cifar.modules())
    assert not resnet20_cifar.training


def test_bad_arguments_are_named(resnet20_cifar, data):
    from critnet.perturb import Unit

    units = select_units(resnet20_cifar, "tensor", include=["linear"])
    with pytest.raises(ValueError, match="method"):
        evaluate_units(resnet20_cifar, units, Perturbation(), data, method="fast")
    with pytest.raises(ValueError, match="score"):
        evaluate_units(resnet20_cifar, units, Perturbation(), data, score="accuracy")
    with pytest.raises(ValueError, match="all_gather"):
        evaluate_units(resnet20_cifar, units, Perturbation(), data, rank=0, world_size=2)
    with pytest.raises(ValueError, match="no parameter"):
        evaluate_units(resnet20_cifar, [Unit("tensor", "nope.weight")], Perturbation(), data)
    with pytest.raises(ValueError, match="no samples"):
        EvaluationSet.from_batches([])


def test_exact_on_a_torchvision_resnet_with_in_place_ops():
    """torchvision's ResNet adds the shortcut in place (``out += identity``) and uses ReLU(inplace=True): the
    cached values crossing a cut must survive every unit's pass."""
    from critnet.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10).eval()
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    units = select_units(model, "channel", include=[r"layer2\.0\.downsample\.0", r"layer2\.0\.conv2"])[:3]
    units += select_units(model, "channel", include=[r"layer2\.0\.downsample\.0"])[:3]
    units += select_units(model, "tensor", include=[r"layer2\.0\.bn2\.weight", r"layer3\.1\.bn1\.weight"])
    units += select_units(model, "activation", include=[r"layer3\.0\.conv1"])[:2]
    # ReLU(inplace=True) right at the cut: it would overwrite the cached BatchNorm output
    units += select_units(model, "activation", include=[r"layer2\.1\.relu"], module_types=["ReLU"],
                          example_input=batches[0][0])[:3]
    units = list(dict.fromkeys(units))
    data = EvaluationSet.from_batches(batches)
    perturbation = Perturbation("scale", 3.0)
    outcomes = evaluate_units(model, units, perturbation, data, method="exact")
    expected = reference(model, units, perturbation, batches)
    for outcome, ref in zip(outcomes, expected):
        assert outcome.total.top1_correct == ref["top1"] and outcome.total.top5_correct == ref["top5"]
        assert f32_close(outcome.total.loss_sum, ref["loss"], rel=KERNEL_REL), outcome.unit.label


def test_untraceable_model_falls_back_to_full_passes():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.linear = torch.nn.Linear(4, 6)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                h = h * 2
            return self.linear(h)

    torch.manual_seed(0)
    model = Branchy().eval()
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 6, (6,)))]
    units = select_units(model, "channel")
    data = EvaluationSet.from_batches(batches)
    with pytest.warns(UserWarning, match="cannot trace"):
        outcomes = evaluate_units(model, units, Perturbation("zero"), data, method="exact")
    naive = evaluate_units(model, units, Perturbation("zero"), data, method="naive")
    assert [(o.total, o.halves) for o in outcomes] == [(o.total, o.halves) for o in naive]


def test_in_place_ops_after_the_cut_do_not_corrupt_cached_values():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.linear = torch.nn.Linear(4, 5)

        def forward(self, x):
            h = self.conv1(x)
            a = self.conv2(h)
            h.mul_(2)  # after conv2's cut, on a value that crosses it
            return self.linear((a + h).mean((2, 3)))

    torch.manual_seed(0)
    model = InPlace().eval()
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(2)]
    units = select_units(model, "channel", include=["conv2"]) + select_units(model, "tensor", include=["conv2"])
    outcomes = evaluate_units(model, units, Perturbation("add", 0.3), EvaluationSet.from_batches(batches))
    for outcome, ref in zip(outcomes, reference(model, units, Perturbation("add", 0.3), batches)):
        assert outcome.total.loss_sum == pytest.approx(ref["loss"], rel=1e-6), outcome.unit.label


def test_tied_weights_are_cut_at_their_first_use():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(6, 6)
            self.middle = torch.nn.Linear(6, 6)
            self.second = torch.nn.Linear(6, 6)
            self.second.weight = self.first.weight  # listed as first.weight, but used first by `second`

        def forward(self, x):
            return self.first(torch.relu(self.middle(torch.relu(self.second(x)))))

    torch.manual_seed(0)
    model = Tied().eval()
    batches = [(torch.randn(10, 6), torch.randint(0, 6, (10,)))]
    units = select_units(model, "channel", module_types=["Linear"])
    assert "second.weight" not in {u.name for u in units}  # named_parameters lists the tied tensor once
    outcomes = evaluate_units(model, units, Perturbation("scale", 2.0), EvaluationSet.from_batches(batches))
    for outcome, ref in zip(outcomes, reference(model, units, Perturbation("scale", 2.0), batches)):
        assert outcome.total.loss_sum == pytest.approx(ref["loss"], rel=1e-6), outcome.unit.label


def test_the_method_registry_is_the_declared_set_of_methods():
    from critnet.choices import METHODS
    from critnet.engine.methods import REGISTRY

    assert sorted(REGISTRY) == sorted(METHODS)
    assert all(name == method.name for name, method in REGISTRY.items())
