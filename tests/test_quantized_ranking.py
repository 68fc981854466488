"""Rankings on models stored in other formats than float32: int8 quantized models (the packed weights of torch.ao's
quantized layers, and their quantized activations) and float16 ones, against references written here that set the
stored values directly and run the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_nets import small_net

import critnet
from critnet.choices import SettingError
from critnet.digests import state_digest
from critnet.perturb import Perturbation, Unit, perturbed


def data(seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (20,), generator=generator)
    return [(x[:12], y[:12]), (x[12:], y[12:])]


@pytest.fixture(scope="module")
def int8_model():
    return critnet.quantize_int8(small_net(), [x for x, _ in data(seed=7)])


def loss_of(model, batches) -> float:
    """Mean cross-entropy of the whole model over the batches, float64 sum of per-image float32 losses."""
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x).float(), y, reduction="none").double().sum() for x, y in batches)
    return float(total) / sum(len(y) for _, y in batches)


def set_packed(module, integers) -> None:
    weight = module.weight()
    module.set_weight_bias(torch._make_per_channel_quantized_tensor(
        integers, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), weight.q_per_channel_axis()),
        module.bias())


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def test_int8_channel_units_are_the_packed_weights_and_zeroing_one_matches_a_direct_write(int8_model):
    before = state_digest(int8_model)
    ranking = critnet.rank(int8_model, data(), unit="channel", perturbation="zero", method="naive")
    assert {row["layer"] for row in ranking.rows} == {"conv1", "conv2", "conv3", "fc"}
    assert state_digest(int8_model) == before
    module = int8_model.conv2
    original = module.weight()
    scores = {row["unit"]: row["loss"] for row in ranking.rows}
    for channel in (0, 5):
        integers = original.int_repr().clone()
        integers[channel] = original.q_per_channel_zero_points()[channel]  # the integer that stores 0.0
        try:
            set_packed(module, integers)
            expected = loss_of(int8_model, data())
        finally:
            module.set_weight_bias(original, module.bias())
        assert close(scores[f"conv2.weight[{channel}]"], expected)
    assert state_digest(int8_model) == before


def test_int8_bitflip_flips_the_stored_integers(int8_model):
    before = state_digest(int8_model)
    ranking = critnet.rank(int8_model, data(), unit="tensor", perturbation="bitflip", levels=[6], method="naive",
                           include=["conv3"])
    module = int8_model.conv3
    original = module.weight()
    integers = original.int_repr().clone()
    flipped = (integers.view(torch.uint8) ^ (1 << 6)).view(torch.int8)
    try:
        set_packed(module, flipped)
        expected = loss_of(int8_model, data())
    finally:
        module.set_weight_bias(original, module.bias())
    assert close(ranking.rows[0]["loss"], expected)
    assert state_digest(int8_model) == before
    with pytest.raises(SettingError, match=r"^level: bit 9 is not a bit of unit conv3.weight, which holds 8-bit int8"):
        critnet.rank(int8_model, data(), unit="tensor", perturbation="bitflip", levels=[9], method="naive",
                     include=["conv3"])
    assert state_digest(int8_model) == before


@pytest.mark.parametrize("unit, perturbation, level", [("channel", "zero", 0.0), ("channel", "add", 0.05),
                                                      ("activation", "zero", 0.0), ("tensor", "bitflip", 7)])
def test_int8_exact_engine_equals_the_naive_loop(int8_model, unit, perturbation, level):
    before = state_digest(int8_model)
    runs = {method: critnet.rank(int8_model, data(), unit=unit, perturbation=perturbation, levels=[level],
                                 method=method) for method in ("naive", "exact")}
    naive = {row["unit"]: row for row in runs["naive"].rows}
    assert len(naive) == len(runs["exact"].rows) > 0
    for row in runs["exact"].rows:
        assert close(row["loss"], naive[row["unit"]]["loss"]) and row["top1"] == naive[row["unit"]]["top1"]
    assert state_digest(int8_model) == before


def test_a_quantized_activation_unit_is_perturbed_through_its_integers(int8_model):
    ranking = critnet.rank(int8_model, data(), unit="activation", perturbation="zero", method="naive",
                           include=["^conv3$"])
    output_zero_point = int8_model.conv3.zero_point

    def hook(_module, _inputs, output):
        integers = output.int_repr().contiguous().clone()
        integers[:, 4] = output_zero_point
        return torch._make_per_tensor_quantized_tensor(integers, output.q_scale(), output.q_zero_point())

    handle = int8_model.conv3.register_forward_hook(hook)
    try:
        expected = loss_of(int8_model, data())
    finally:
        handle.remove()
    assert close({row["unit"]: row["loss"] for row in ranking.rows}["conv3[4]"], expected)


def test_the_packed_weight_comes_back_when_the_block_raises(int8_model):
    before = state_digest(int8_model)
    with pytest.raises(KeyboardInterrupt):
        with perturbed(int8_model, Unit("channel", "conv1.weight", 2), Perturbation("scale", 3.0)):
            assert state_digest(int8_model) != before
            raise KeyboardInterrupt
    assert state_digest(int8_model) == before


def test_taylor_on_a_quantized_model_says_why_in_one_line(int8_model):
    with pytest.raises(SettingError, match=r"^unit conv1.weight\[0\]: conv1.weight is the int8 weight of a quantized "
                                           r"layer, which has no float parameter") as caught:
        critnet.rank(int8_model, data(), unit="channel", perturbation="zero", method="taylor")
    assert "\n" not in str(caught.value)


def test_float16_bitflip_ranking_flips_the_half_precision_bits():
    model = small_net().half()
    batches = [(x.half(), y) for x, y in data()]
    before = state_digest(model)
    ranking = critnet.rank(model, batches, unit="tensor", perturbation="bitflip", levels=[9], method="naive",
                           include=["conv2.weight"])
    weight = model.conv2.weight.detach()
    saved = weight.clone()
    try:
        weight.view(-1).view(torch.int16).bitwise_xor_(1 << 9)
        expected = loss_of(model, batches)
    finally:
        weight.copy_(saved)
    assert close(ranking.rows[0]["loss"], expected)
    assert state_digest(model) == before
