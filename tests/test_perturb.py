"""Units and perturbations: selection, every perturbation against hand-computed values, exact restore."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from critnet.perturb import PERTURBATION_KINDS, Perturbation, Unit, perturbed, unit_seed
from critnet.selection import select_units


def state_checksum(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=True)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))


# ---------------------------------------------------------------- selection


def test_tensor_default_is_the_original_selection(resnet20_cifar):
    expected = [name for name, _ in resnet20_cifar.named_parameters() if "weight" in name]
    units = select_units(resnet20_cifar)
    assert [u.name for u in units] == expected
    assert all(u.kind == "tensor" and u.index is None and u.label == u.name for u in units)
    assert any(".bn" in u.name for u in units)  # BatchNorm weights are part of the original selection


def test_channel_and_activation_cover_every_output_channel_of_resnet20(resnet20_cifar):
    channels = select_units(resnet20_cifar, "channel")
    assert len(channels) == 698
    expected = [
        (f"{name}.weight", c)
        for name, m in resnet20_cifar.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for c in range(m.weight.shape[0])
    ]
    assert [(u.name, u.index) for u in channels] == expected
    assert channels[0].label == "conv1.weight[0]" and channels[0].layer == "conv1"
    activations = select_units(resnet20_cifar, "activation")
    assert [(u.name + ".weight", u.index) for u in activations] == expected
    assert activations[-1].label == "linear[9]" and activations[-1].layer == "linear"


def test_include_exclude_and_module_types():
    model = Tiny()
    assert [u.label for u in select_units(model, "tensor", include=["conv|fc"], exclude=["bias"])] == [
        "conv.weight",
        "fc.weight",
    ]
    assert [u.label for u in select_units(model, "tensor", include=[".*"], module_types=["BatchNorm2d"])] == [
        "bn.weight",
        "bn.bias",
    ]
    assert len(select_units(model, "channel", module_types=["Linear"])) == 4
    # ReLU declares no channel count: an example input lets the selection read it from a forward pass.
    with pytest.raises(ValueError, match="example_input"):
        select_units(model, "activation", module_types=["ReLU"])
    relu = select_units(model, "activation", module_types=["ReLU"], example_input=torch.zeros(1, 2, 2, 2))
    assert [u.label for u in relu] == ["relu[0]", "relu[1]", "relu[2]"]
    assert hooks_left(model) == 0
    # that forward pass runs in eval mode: a model in training mode keeps its BatchNorm statistics and its mode
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    select_units(model, "activation", module_types=["ReLU"], example_input=torch.randn(4, 2, 2, 2))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "neuron"}, "kind"),
        ({"include": ["("]}, "include"),
        ({"exclude": ["[a"]}, "exclude"),
        ({"module_types": ["Conv9d"]}, "module_types"),
        ({"include": ["no_such_name"]}, "empty"),
        ({"kind": "channel", "module_types": ["LSTM"]}, "empty"),
    ],
)
def test_bad_selection_names_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_units(Tiny(), **kwargs)


def test_unit_validation_and_order():
    with pytest.raises(ValueError):
        Unit("tensor", "a.weight", 3)
    with pytest.raises(ValueError):
        Unit("channel", "a.weight")
    with pytest.raises(ValueError):
        Unit("filter", "a.weight", 1)
    assert Unit("tensor", "weight").layer == ""
    assert sorted([Unit("channel", "b.weight", 1), Unit("channel", "a.weight", 2)])[0].name == "a.weight"


# ---------------------------------------------------------------- perturbations against hand-computed values

VALUES = torch.tensor([3.0, -1.0, 2.0, -5.0, 0.5, 0.0])
UNIT = Unit("tensor", "w.weight")


@pytest.mark.parametrize(
    "perturbation, expected",
    [
        (Perturbation("add", 0.1), [3.1, -0.9, 2.1, -4.9, 0.6, 0.1]),
        (Perturbation("scale", -2.0), [-6.0, 2.0, -4.0, 10.0, -1.0, -0.0]),
        (Perturbation("zero"), [0.0] * 6),
        (Perturbation("sign_flip"), [-3.0, 1.0, -2.0, 5.0, -0.5, -0.0]),
        # 1/2 of 6 values = the 3 smallest magnitudes: 0.0, 0.5, -1.0
        (Perturbation("prune", 0.5), [3.0, 0.0, 2.0, -5.0, 0.0, 0.0]),
        (Perturbation("prune", 0.0), [3.0, -1.0, 2.0, -5.0, 0.5, 0.0]),
        (Perturbation("prune", 1.0), [0.0] * 6),
        # floor(0.34 * 6) = 2 values: 0.0 and 0.5
        (Perturbation("prune", 0.34), [3.0, -1.0, 2.0, -5.0, 0.0, 0.0]),
    ],
)
def test_perturbation_values(perturbation, expected):
    before = VALUES.clone()
    out = perturbation.apply(VALUES, UNIT)
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(VALUES, before)  # pure


def test_prune_ties_are_broken_by_position():
    out = Perturbation("prune", 0.5).apply(torch.tensor([1.0, -1.0, 1.0, 1.0]), UNIT)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "value, bit, expected",
    [
        (1.0, 31, -1.0),  # sign bit
        (1.0, 23, 0.5),  # lowest exponent bit: 2^0 -> 2^-1
        (1.0, 30, float("inf")),  # highest exponent bit: exponent 127 -> 255, mantissa 0
        (1.0, 22, 1.5),  # highest mantissa bit
        (0.0, 0, 1.401298464324817e-45),  # smallest subnormal
    ],
)
def test_bitflip_hand_computed(value, bit, expected):
    out = Perturbation("bitflip", bit).apply(torch.tensor([value]), UNIT)
    assert out.item() == expected


def test_bitflip_matches_int32_xor_on_every_bit():
    values = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for bit in range(32):
        out = Perturbation("bitflip", bit).apply(values, UNIT)
        flipped = out.view(torch.int32) ^ values.view(torch.int32)
        assert torch.all(flipped == torch.tensor(1, dtype=torch.int32) << bit)


def test_noise_is_seeded_per_unit_only():
    a, b = Unit("channel", "x.weight", 0), Unit("channel", "x.weight", 1)
    values = torch.zeros(1000)
    p = Perturbation("noise", 0.5, seed=7)
    draw_a = p.apply(values, a)
    # the reference: a fresh generator seeded from (seed, label) only
    reference = 0.5 * torch.randn(1000, generator=torch.Generator().manual_seed(unit_seed(7, a)))
    assert torch.equal(draw_a, reference)
    torch.manual_seed(123)  # global RNG state must not matter
    p.apply(values, b)
    assert torch.equal(p.apply(values, a), draw_a)
    assert not torch.equal(p.apply(values, b), draw_a)
    assert not torch.equal(Perturbation("noise", 0.5, seed=8).apply(values, a), draw_a)
    assert abs(draw_a.std().item() - 0.5) < 0.05


def test_noise_relative_uses_the_unit_std():
    values = torch.arange(10, dtype=torch.float32)
    unit = Unit("tensor", "w")
    absolute = Perturbation("noise", 1.0, seed=3).apply(torch.zeros(10), unit)
    relative = Perturbation("noise", 0.2, relative=True, seed=3).apply(values, unit)
    population_std = (values - values.mean()).pow(2).mean().sqrt()  # 2.8723, not the sample std 3.0277
    torch.testing.assert_close(relative, values + 0.2 * population_std * absolute, rtol=0, atol=1e-6)
    single = Perturbation("noise", 0.2, relative=True).apply(torch.tensor([4.0]), unit)
    assert single.tolist() == [4.0]  # one value: no spread, no noise (never NaN)


def test_noise_draw_is_the_same_in_another_process(gloo_runs):
    """The other process: rank 0 of tests/gloo_runs.py, which seeds torch with 999 and runs with PYTHONHASHSEED=12345,
    then draws Perturbation('noise', 1.0, seed=11) on zeros(8) for this unit."""
    import json

    unit = Unit("channel", "layer1.0.conv1.weight", 5)
    here = Perturbation("noise", 1.0, seed=11).apply(torch.zeros(8), unit)
    there = json.loads((gloo_runs / "fresh_process.json").read_text())["noise_int32"]
    assert there == here.view(torch.int32).tolist()


def test_activation_noise_is_shared_by_every_sample():
    unit = Unit("activation", "conv", 0)
    out = Perturbation("noise", 1.0).apply(torch.zeros(3, 4, 4), unit)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    with pytest.raises(ValueError, match="relative"):
        Perturbation("noise", 1.0, relative=True).check_unit_kind("activation")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "dropout"}, "perturbation"),
        ({"kind": "bitflip", "level": 32}, "bit index"),
        ({"kind": "bitflip", "level": 1.5}, "bit index"),
        ({"kind": "prune", "level": 1.5}, "fraction"),
        ({"kind": "add", "level": float("nan")}, "finite"),
        ({"kind": "add", "relative": True}, "relative"),
        ({"kind": "noise", "level": -1.0}, "non-negative"),
    ],
)
def test_bad_perturbation_names_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Perturbation(**kwargs)


def test_labels():
    assert Perturbation().label == "add(0.1)"
    assert Perturbation("zero").label == "zero"
    assert Perturbation("bitflip", 30).label == "bitflip(30)"
    assert Perturbation("prune", 0.25).label == "prune(0.25)"
    assert Perturbation("noise", 0.1, relative=True, seed=2).label == "noise(rel 0.1, seed=2)"


# ---------------------------------------------------------------- perturbed(): in-model effect and exact restore

ALL_PERTURBATIONS = [
    Perturbation("add", 0.1),
    Perturbation("scale", 3.0),
    Perturbation("noise", 0.2, relative=True, seed=1),
    Perturbation("zero"),
    Perturbation("sign_flip"),
    Perturbation("bitflip", 30),
    Perturbation("prune", 0.5),
]
assert {p.kind for p in ALL_PERTURBATIONS} == set(PERTURBATION_KINDS)


@pytest.mark.parametrize("perturbation", ALL_PERTURBATIONS, ids=lambda p: p.label)
def test_weight_units_are_written_and_restored_bit_identically(resnet20_cifar, perturbation):
    model = resnet20_cifar
    checksum = state_checksum(model)
    for unit in [Unit("tensor", "layer2.1.bn1.weight"), Unit("channel", "layer3.0.conv2.weight", 7)]:
        param = dict(model.named_parameters())[unit.name]
        original = param.detach().clone()
        with perturbed(model, unit, perturbation):
            inside = param.detach().clone()
        expected = original.clone()
        if unit.index is None:
            expected = perturbation.apply(original, unit)
        else:
            expected[unit.index] = perturbation.apply(original[unit.index], unit)
        assert torch.equal(inside.view(torch.int32), expected.view(torch.int32))
        assert state_checksum(model) == checksum
    assert hooks_left(model) == 0


def test_add_on_a_tensor_unit_equals_the_original_in_place_add(resnet20_cifar, cifar_test_256):
    model, (x, _) = resnet20_cifar, cifar_test_256[0]
    x = x[:16]
    unit = Unit("tensor", "layer1.0.conv1.weight")
    param = dict(model.named_parameters())[unit.name]
    with torch.no_grad():
        with perturbed(model, unit, Perturbation("add", 0.1)):
            ours = model(x)
        original = param.data.clone()
        param.data += 0.1
        reference = model(x)
        param.data = original
    assert torch.equal(ours, reference)


def test_restore_on_exception_including_nan_payloads_and_signed_zeros(resnet20_cifar):
    model = resnet20_cifar
    param = dict(model.named_parameters())["linear.weight"]
    with torch.no_grad():
        bits = param.view(torch.int32)
        bits[0, 0] = 0x7FC00123  # a NaN with a payload
        bits[0, 1] = -(1 << 31)  # -0.0
    checksum = state_checksum(model)
    for unit in [Unit("tensor", "linear.weight"), Unit("channel", "linear.weight", 0)]:
        for perturbation in ALL_PERTURBATIONS:
            with pytest.raises(RuntimeError, match="injected"):
                with perturbed(model, unit, perturbation):
                    raise RuntimeError("injected")
            assert state_checksum(model) == checksum, (unit, perturbation)


def test_activation_unit_changes_only_its_channel_and_leaves_no_hook(resnet20_cifar, cifar_test_256):
    model, (x, _) = resnet20_cifar, cifar_test_256[0]
    x = x[:8]
    checksum = state_checksum(model)
    with torch.no_grad():
        baseline = model(x)
        with perturbed(model, Unit("activation", "linear", 3), Perturbation("add", 0.5)):
            shifted = model(x)
        expected = baseline.clone()
        expected[:, 3] += 0.5
        assert torch.equal(shifted, expected)

        # a zeroed conv channel equals zeroing that filter's weights (the conv has no bias)
        with perturbed(model, Unit("activation", "layer2.0.conv1", 4), Perturbation("zero")):
            via_hook = model(x)
        with perturbed(model, Unit("channel", "layer2.0.conv1.weight", 4), Perturbation("zero")):
            via_weight = model(x)
        torch.testing.assert_close(via_hook, via_weight, rtol=0, atol=1e-5)

        with pytest.raises(RuntimeError, match="injected"):
            with perturbed(model, Unit("activation", "layer1.0.conv1", 0), Perturbation("zero")):
                raise RuntimeError("injected")
    assert hooks_left(model) == 0
    assert state_checksum(model) == checksum


def test_unknown_unit_names_the_unit(resnet20_cifar):
    with pytest.raises(ValueError, match="nope.weight"):
        with perturbed(resnet20_cifar, Unit("tensor", "nope.weight"), Perturbation()):
            pass
    with pytest.raises(ValueError, match=r"conv1.weight\[99\]"):
        with perturbed(resnet20_cifar, Unit("channel", "conv1.weight", 99), Perturbation()):
            pass
    with pytest.raises(ValueError, match="nope"):
        with perturbed(resnet20_cifar, Unit("activation", "nope", 0), Perturbation()):
            pass
