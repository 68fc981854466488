"""Fault campaigns on float16, bfloat16 and int8 models (issue #23) against an independent naive loop.

The reference writes each fault's bits where the model stores them with nothing of critnet's fault code
(``critnet.faults.*``, ``critnet.formats``): a float parameter through ``Tensor.view(torch.int16)``, an int8 weight
of a quantized layer by rebuilding its per-channel tensor from changed integers and packing it with
``set_weight_bias``, an activation in a forward hook (a quantized output through its uint8 integers); the mask
``((1 << width) - 1) << bit`` is applied in Python to the unsigned bits. Then the WHOLE model runs on every batch,
the logits (widened to float32) are compared bit for bit with the golden ones, and the outcome counts must equal the
campaign's for every fault. Logic tests use a small residual CNN on random data; one test uses ResNet20 on real
images, one a torchvision quantizable ResNet-18 with random weights.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import math

import pytest
import torch
from torch import nn

import critnet
from conftest import CIFAR_ROOT, requires_shared
from fault_reference import OUTCOMES, outcomes
from tiny_nets import small_net
from critnet.analyses.campaign import fault_campaign
from critnet.choices import SettingError
from critnet.digests import state_digest
from critnet.errors import CritnetError

# the reference's own table of the formats: bits per stored value, integer view, fields (lowest bit first)
BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "uint8": 8}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
FIELDS = {
    "float32": ((0, 22, "mantissa"), (23, 30, "exponent"), (31, 31, "sign")),
    "float16": ((0, 9, "mantissa"), (10, 14, "exponent"), (15, 15, "sign")),
    "bfloat16": ((0, 6, "mantissa"), (7, 14, "exponent"), (15, 15, "sign")),
    "int8": ((0, 6, "value"), (7, 7, "sign")),
    "uint8": ((0, 7, "value"),),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------- a small residual CNN and its data

def random_batches(sizes=(10, 8, 6), seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of different sizes (a pack mixes rows of several)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (sum(sizes),), generator=generator)
    return list(zip(x.split(list(sizes)), y.split(list(sizes))))


def model_in(number_format: str, seed: int = 0):
    """The small CNN stored in ``number_format`` and the random batches it takes (inputs cast to its dtype)."""
    batches = random_batches()
    if number_format == "int8":
        calibration = random_batches((32, 32), seed=7)
        return critnet.quantize_int8(small_net(seed), calibration), batches
    if number_format == "float32":
        return small_net(seed), batches
    dtype = DTYPES[number_format]
    return small_net(seed).to(dtype), [(x.to(dtype), y) for x, y in batches]


# ----------------------------------------------------------------- the independent reference

def own_digest(model: nn.Module) -> str:
    """sha256 over the raw bytes of the state dict, quantized tensors as their integers, scales and zero points,
    and of every quantized layer's packed weight and bias (independent of critnet.digests)."""
    digest = hashlib.sha256()

    def add(name, value):
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                add(name + ".int", value.int_repr())
                if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    add(name + ".scales", value.q_per_channel_scales())
                    add(name + ".zero_points", value.q_per_channel_zero_points())
                else:
                    digest.update(f"{value.q_scale()!r}|{value.q_zero_point()!r}".encode())
                return
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
            digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (tuple, list)):
            for position, item in enumerate(value):
                add(f"{name}[{position}]", item)
        else:
            digest.update(f"{name}|{value!r}".encode())

    for name, value in model.state_dict().items():
        add(name, value)
    for name, module in model.named_modules():
        if callable(getattr(module, "weight", None)) and hasattr(module, "set_weight_bias"):
            add(name + ".packed_weight", module.weight())
            add(name + ".packed_bias", module.bias())
    return digest.hexdigest()


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def struck(unsigned: int, bit: int, width: int, fault_model: str) -> int:
    """The unsigned bits after ``fault_model`` strikes bits ``bit``..``bit + width - 1``."""
    mask = ((1 << width) - 1) << bit
    return {"bitflip": unsigned ^ mask, "ber": unsigned ^ mask, "stuck_at_0": unsigned & ~mask,
            "stuck_at_1": unsigned | mask}[fault_model]


def as_signed(unsigned: int, size: int) -> int:
    return unsigned - (1 << size) if unsigned >= 1 << (size - 1) else unsigned


def float_value(signed: int, dtype: torch.dtype) -> float:
    return torch.tensor([signed], dtype=INT_VIEW[dtype]).view(dtype).item()


def same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def sites_of(row) -> list[tuple[str, int, int]]:
    split = [str(row[c]).split(";") for c in ("parameter", "index", "bit")]
    return [(p, int(i), int(b)) for p, i, b in zip(*split)]


@contextlib.contextmanager
def naive_fault(model: nn.Module, row: dict):
    """The model with the fault of campaign row ``row`` written into its stored bits (weights) or added by a hook
    (activations); everything back on exit."""
    width, fault_model, number_format = int(row["width"]), row["fault_model"], row["format"]
    size = BITS[number_format]
    undo = []
    try:
        for parameter, index, bit in sites_of(row):
            assert 0 <= bit and bit + width <= size, row
            if row["target"] == "activations":
                undo.append(model.get_submodule(parameter).register_forward_hook(
                    activation_hook(index, bit, width, fault_model, number_format)).remove)
                continue
            parameters = dict(model.named_parameters())
            if parameter in parameters:  # a float parameter: its storage as integers
                tensor = parameters[parameter]
                assert number_format == str(tensor.dtype).removeprefix("torch."), row
                flat = tensor.detach().view(-1).view(INT_VIEW[tensor.dtype])
                old = int(flat[index])
                new = as_signed(struck(old & ((1 << size) - 1), bit, width, fault_model), size)
                if len(sites_of(row)) == 1:  # what the campaign reports it wrote
                    assert same_number(row["original"], float_value(old, tensor.dtype)), row
                    assert same_number(row["faulty"], float_value(new, tensor.dtype)), row
                flat[index] = new
                undo.append(lambda flat=flat, index=index, old=old: flat.__setitem__(index, old))
                continue
            # the int8 weight of a quantized layer: new integers, the same per-channel scales, packed again
            module = model.get_submodule(parameter.removesuffix(".weight"))
            weight, bias = module.weight(), module.bias()
            assert number_format == "int8" and weight.dtype == torch.qint8, row
            assert weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric), row
            integers = weight.int_repr().clone()
            old = int(integers.view(-1)[index])
            new = as_signed(struck(old & 0xFF, bit, width, fault_model), 8)
            if len(sites_of(row)) == 1:
                assert (row["original"], row["faulty"]) == (old, new), row
            integers.view(-1)[index] = new
            faulty = torch._make_per_channel_quantized_tensor(integers, weight.q_per_channel_scales(),
                                                              weight.q_per_channel_zero_points(),
                                                              weight.q_per_channel_axis())
            module.set_weight_bias(faulty, bias)
            undo.append(lambda module=module, weight=weight, bias=bias: module.set_weight_bias(weight, bias))
        yield
    finally:
        for step in reversed(undo):
            step()


def activation_hook(index: int, bit: int, width: int, fault_model: str, number_format: str):
    def hook(_module, _inputs, out):
        if out.is_quantized:
            assert number_format == "uint8" and out.dtype == torch.quint8
            integers = out.int_repr().contiguous()
            rows = integers.view(len(integers), -1)
            for image in range(len(rows)):
                rows[image, index] = struck(int(rows[image, index]), bit, width, fault_model)
            return torch._make_per_tensor_quantized_tensor(integers, out.q_scale(), out.q_zero_point())
        assert number_format == str(out.dtype).removeprefix("torch.")
        size = BITS[number_format]
        out = out.contiguous().clone()
        rows = out.view(len(out), -1).view(INT_VIEW[out.dtype])
        for image in range(len(rows)):
            unsigned = int(rows[image, index]) & ((1 << size) - 1)
            rows[image, index] = as_signed(struck(unsigned, bit, width, fault_model), size)
        return out

    return hook


def all_logits(model: nn.Module, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x).float() for x, _ in batches]


def assert_matches_naive_loop(model: nn.Module, batches, campaign) -> dict[str, int]:
    """Every fault's counts equal the naive loop's; returns the outcomes summed over the faults."""
    golden = all_logits(model, batches)
    total = dict.fromkeys(OUTCOMES, 0)
    for row in campaign.faults:
        with naive_fault(model, row):
            expected = outcomes(golden, all_logits(model, batches))
        assert {k: row[k] for k in OUTCOMES} == expected, row
        total = {k: total[k] + expected[k] for k in OUTCOMES}
    assert torch.equal(torch.cat(all_logits(model, batches)).view(torch.int32), torch.cat(golden).view(torch.int32))
    return total


def fields_of(number_format: str, bit: int, width: int) -> str:
    names = [name for b in range(bit, bit + width) for low, high, name in FIELDS[number_format] if low <= b <= high]
    return "+".join(dict.fromkeys(names))


def same(rows_a, rows_b) -> bool:
    """Row lists equal, NaN included."""
    return repr(rows_a) == repr(rows_b)


# ----------------------------------------------------------------- 1. outcomes equal the naive loop, every format

@pytest.mark.parametrize("number_format", ["float16", "bfloat16", "int8"])
def test_weight_faults_in_every_format_equal_the_naive_loop(number_format):
    model, batches = model_in(number_format)
    before, digest = own_digest(model), state_digest(model)
    widths = (1, 2, 3) if number_format == "bfloat16" else (1, 3)
    campaigns = [fault_campaign(model, batches, fault_model=fault_model, upset_width=width, faults=30,
                                seed=10 * width + position)
                 for width in widths for position, fault_model in enumerate(("bitflip", "stuck_at_1"))]
    # every exponent bit stuck at 1 (an inf or NaN weight), every value bit of an int8 (127, or -1)
    low, width = {"float16": (10, 5), "bfloat16": (7, 8), "int8": (0, 7)}[number_format]
    campaigns.append(fault_campaign(model, batches, bits=[low], upset_width=width, fault_model="stuck_at_1",
                                    faults=8, seed=1))
    assert own_digest(model) == before and state_digest(model) == digest and hooks(model) == 0
    stored = "int8" if number_format == "int8" else number_format
    total = dict.fromkeys(OUTCOMES, 0)
    for campaign in campaigns:
        assert {r["format"] for r in campaign.faults} == {stored}
        assert {r["parameter"] for r in campaign.faults} == {"conv1.weight", "conv2.weight", "conv3.weight",
                                                             "fc.weight"}
        # the conv layers' faults took the channel shortcut (or the engine said why not)
        engine = campaign.info["engine"]
        assert engine["packs"] + engine["images_masked_by_channel"] > 0 or campaign.info["shortcut_fallbacks"]
        counts = assert_matches_naive_loop(model, batches, campaign)
        total = {k: total[k] + counts[k] for k in OUTCOMES}
    assert all(total[k] for k in ("masked", "noncritical", "sdc1")), total  # the draws reach every outcome
    if number_format != "int8":  # (an int8 weight fault moves a logit by at most 255 steps of its scale)
        assert total["sdc5"] and total["nonfinite"], total  # exponent faults: huge, inf and NaN logits
    assert own_digest(model) == before and hooks(model) == 0


@pytest.mark.parametrize("number_format", ["float16", "bfloat16", "int8"])
def test_activation_faults_in_every_format_equal_the_naive_loop(number_format):
    model, batches = model_in(number_format)
    before = own_digest(model)
    total = dict.fromkeys(OUTCOMES, 0)
    for width, fault_model in ((1, "bitflip"), (3, "bitflip"), (2, "stuck_at_1")):
        campaign = fault_campaign(model, batches, target="activations", fault_model=fault_model, upset_width=width,
                                  faults=24, seed=width)
        assert own_digest(model) == before and hooks(model) == 0
        stored = "uint8" if number_format == "int8" else number_format  # quantized activations are quint8
        assert {r["format"] for r in campaign.faults} == {stored}
        assert {r["parameter"] for r in campaign.faults} <= {"conv1", "conv2", "conv3", "fc"}
        counts = assert_matches_naive_loop(model, batches, campaign)
        total = {k: total[k] + counts[k] for k in OUTCOMES}
    assert total["masked"] and total["sdc1"], total


def test_bit_error_rate_draws_and_every_parameter_of_a_bfloat16_model_equal_the_naive_loop():
    model, batches = model_in("bfloat16")
    before = own_digest(model)
    ber = fault_campaign(model, batches, fault_model="ber", ber=3e-3, faults=12, seed=2)
    assert max(len(sites_of(r)) for r in ber.faults if r["parameter"]) >= 2  # several flips per inference
    everything = fault_campaign(model, batches, layers=[".*"], module_types=None, faults=40, seed=4,
                                fault_model="stuck_at_0", upset_width=2)
    assert {"bn1.weight", "conv2.bias", "fc.bias"} & {r["parameter"] for r in everything.faults}
    for campaign in (ber, everything):
        assert_matches_naive_loop(model, batches, campaign)
    assert own_digest(model) == before and hooks(model) == 0


# ----------------------------------------------------------------- 2. bit-identical afterwards, also on errors

@pytest.mark.parametrize("number_format", ["bfloat16", "int8"])
def test_the_model_comes_back_bit_for_bit_when_the_campaign_raises(number_format, monkeypatch):
    import critnet.faults.evaluator as evaluator

    model, batches = model_in(number_format)
    if number_format == "bfloat16":  # a NaN with a payload and a negative zero must survive the restore
        with torch.no_grad():
            model.conv3.weight.view(-1).view(torch.int16)[:2] = torch.tensor([0x7FC3, -(1 << 15)],
                                                                             dtype=torch.int16)
    before, digest = own_digest(model), state_digest(model)
    calls = {"n": 0, "at": 0}
    tally = evaluator.tally_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise RuntimeError("injected failure")
        return tally(*args, **kwargs)

    monkeypatch.setattr(evaluator, "tally_rows", failing)
    settings = [{"layers": [r"fc\.weight"]}, {}, {"target": "activations"}, {"upset_width": 3},
                {"layers": [".*"], "module_types": None}]
    for kwargs in settings:
        for at in (1, 5, 13):
            calls.update(n=0, at=at)
            with pytest.raises(RuntimeError, match="injected failure"):
                fault_campaign(model, batches, faults=30, seed=1, **kwargs)
            assert own_digest(model) == before and state_digest(model) == digest and hooks(model) == 0, kwargs
    monkeypatch.setattr(evaluator, "tally_rows", tally)

    def stop_after(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    for target in ("weights", "activations"):
        with pytest.raises(KeyboardInterrupt):
            fault_campaign(model, batches, target=target, faults=30, seed=3, progress=stop_after)
        assert own_digest(model) == before and state_digest(model) == digest and hooks(model) == 0, target


# ----------------------------------------------------------------- 3. multi-bit upsets: drawn, named, replayed

@pytest.mark.parametrize("number_format", ["float16", "bfloat16", "int8"])
def test_multi_bit_upsets_stay_in_the_format_name_their_fields_and_replay(number_format, tmp_path):
    model, batches = model_in(number_format)
    size = BITS[number_format]
    spanning = {"float16": [9, 14], "bfloat16": [6, 14], "int8": [6]}[number_format]  # upsets across two fields
    for width in (2, 3):
        drawn = fault_campaign(model, batches, upset_width=width, faults=40, seed=width)
        across = fault_campaign(model, batches, upset_width=width, bits=[b - width + 2 for b in spanning],
                                faults=10, seed=width)
        for campaign in (drawn, across):
            for row in campaign.faults:
                assert row["width"] == width and row["format"] == number_format
                assert 0 <= row["bit"] and row["bit"] + width - 1 <= size - 1, row
                assert row["field"] == fields_of(number_format, row["bit"], width), row
        assert max(r["bit"] for r in drawn.faults) + width - 1 >= size - 3  # the draw reaches the top bits
        expected = {"float16": {"mantissa+exponent", "exponent+sign"}, "bfloat16": {"mantissa+exponent",
                    "exponent+sign"}, "int8": {"value+sign"}}[number_format]
        assert {r["field"] for r in across.faults} == expected
        assert_matches_naive_loop(model, batches, drawn)
        # the report's faults.csv replays to the same faults and the same outcomes
        drawn.report(tmp_path / f"w{width}", print_table=False)
        path = tmp_path / f"w{width}" / "faults.csv"
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert {(r["width"], r["format"]) for r in rows} == {(str(width), number_format)}
        assert [r["field"] for r in rows] == [r["field"] for r in drawn.faults]
        replayed = fault_campaign(model, batches, upset_width=width, fault_list=path)
        assert same(replayed.faults, drawn.faults)
        assert replayed.fault_list == drawn.fault_list
    # a list replayed onto the model stored in another format: one line naming the file and the line
    other = {"float16": "bfloat16", "bfloat16": "float16", "int8": "float32"}[number_format]
    for target_format in (other, "float16" if number_format == "int8" else "int8"):
        other_model, other_batches = model_in(target_format)
        with pytest.raises(CritnetError) as caught:
            fault_campaign(other_model, other_batches, fault_list=tmp_path / "w2" / "faults.csv")
        message = str(caught.value)
        assert "\n" not in message and f"{tmp_path / 'w2' / 'faults.csv'}, line 2: " in message, message
        assert f"stores {target_format} values, the list {number_format}" in message, message


# ----------------------------------------------------------------- 4. settings errors: one line naming the key

@pytest.mark.parametrize("number_format, kwargs, message", [
    ("float16", {"bits": [20]}, r"^bits: bit 20 do not fit the 16-bit float16 values of conv1\.weight "
                                r"\(bits 0-9 mantissa, 10-14 exponent, 15 sign\)$"),
    ("bfloat16", {"bits": [14], "upset_width": 3}, r"^bits: bits 14\.\.16 do not fit the 16-bit bfloat16 values "
                                                   r"of conv1\.weight \(bits 0-6 mantissa, 7-14 exponent, 15 sign\)$"),
    ("int8", {"bits": [8]}, r"^bits: bit 8 do not fit the 8-bit int8 values of conv1\.weight "
                            r"\(bits 0-6 value, 7 sign\)$"),
    ("int8", {"bits": [7], "upset_width": 2, "target": "activations"},
     r"^bits: bits 7\.\.8 do not fit the 8-bit uint8 values of conv1 \(bits 0-7 value\)$"),
    ("float16", {"upset_width": 0}, r"^upset_width: 0 is not a number of adjacent bits 1\.\.32$"),
    ("int8", {"upset_width": True}, r"^upset_width: True is not"),
    ("bfloat16", {"upset_width": 2, "fault_model": "ber", "ber": 1e-3}, r"^upset_width: 'ber' draws flip bits "
                                                                       r"independently; give upset_width 1$"),
])
def test_format_settings_errors_are_one_line_naming_the_key(number_format, kwargs, message):
    model, batches = model_in(number_format)
    before = own_digest(model)
    with pytest.raises(SettingError, match=message) as caught:
        fault_campaign(model, batches, faults=5, **kwargs)
    assert "\n" not in str(caught.value)
    assert own_digest(model) == before and hooks(model) == 0


# ----------------------------------------------------------------- 5. Leveugle's sizing counts the format's bits

def leveugle(population: int, margin: float, confidence: float) -> int:
    from statistics import NormalDist

    t = NormalDist().inv_cdf(0.5 + confidence / 2)
    return min(population, math.ceil(population / (1 + margin**2 * (population - 1) / (t * t * 0.25)) - 1e-9))


@pytest.mark.parametrize("number_format, width, bits_per_value", [
    ("float16", 1, 16), ("bfloat16", 3, 14), ("int8", 1, 8), ("int8", 2, 7)])
def test_leveugle_sizing_counts_the_bits_of_each_format(number_format, width, bits_per_value):
    model, batches = model_in(number_format)
    float_model = small_net()
    elements = {f"{name}.weight": module.weight.numel() for name, module in float_model.named_modules()
                if isinstance(module, (nn.Conv2d, nn.Linear))}
    campaign = fault_campaign(model, batches[:1], upset_width=width, error_margin=0.25, confidence=0.9, seed=0)
    assert campaign.settings["formats"] == dict.fromkeys(elements, number_format)
    assert {s.layer: (s.population, s.format) for s in campaign.strata} == {
        name: (n * bits_per_value, number_format) for name, n in elements.items()}
    for row in campaign.sizing:
        population = elements[row["layer"]] * bits_per_value
        assert row["population"] == population and row["bits"] == list(range(bits_per_value))
        assert row["leveugle_n"] == row["drawn"] == leveugle(population, 0.25, 0.9), row
    drawn = {name: sum(r["parameter"] == name for r in campaign.faults) for name in elements}
    assert drawn == {row["layer"]: row["drawn"] for row in campaign.sizing}
    # the per-bit tables cover the format's bits, every layer × bit cell with its layer's values
    assert sorted({int(r["bit"]) for r in campaign.rates["bit"]}) == list(range(bits_per_value))
    assert len(campaign.rates["layer_bit"]) == len(elements) * bits_per_value
    assert all(c["population"] == elements[c["layer"]] for c in campaign.rates["layer_bit"])


# ----------------------------------------------------------------- 6. ResNet20 on real images

def cifar_images(split: str, n: int, step: int, batch_size: int):
    """``n`` images of a shared CIFAR-10 split, every ``step``-th (the folders are sorted by class), normalised as
    conftest.first_test_images does."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torch.utils.data.Subset(datasets.ImageFolder(CIFAR_ROOT / split, tf), range(0, n * step, step))
    return list(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False))


@requires_shared
def test_resnet20_in_bfloat16_and_int8_equals_the_naive_loop(resnet20_cifar):
    images = cifar_images("test", 64, 150, 32)
    int8 = critnet.quantize_int8(resnet20_cifar, cifar_images("train", 128, 390, 64))
    bf16 = copy.deepcopy(resnet20_cifar).to(torch.bfloat16)
    for model, batches, kwargs in (
        (bf16, [(x.to(torch.bfloat16), y) for x, y in images], {}),
        (int8, images, {}),
        (int8, images, {"upset_width": 2, "fault_model": "stuck_at_1"}),
        (int8, images, {"target": "activations"}),
    ):
        before = own_digest(model)
        campaign = fault_campaign(model, batches, faults=40, seed=5, **kwargs)
        assert own_digest(model) == before and hooks(model) == 0
        assert len({r["parameter"] for r in campaign.faults}) >= 10
        assert campaign.golden["top1"] > 50  # a trained model, in either format
        assert_matches_naive_loop(model, batches, campaign)
        assert own_digest(model) == before and hooks(model) == 0


# ----------------------------------------------------------------- 7. a torchvision quantizable classifier

def test_a_torchvision_quantizable_resnet18_equals_the_naive_loop():
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    float_model = resnet18(weights=None, quantize=False, num_classes=10).eval()
    generator = torch.Generator().manual_seed(3)
    int8 = critnet.quantize_int8(float_model, torch.randn(32, 3, 32, 32, generator=generator))
    x, y = torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    before = own_digest(int8)
    campaign = fault_campaign(int8, batches, faults=20, seed=2)
    assert own_digest(int8) == before and hooks(int8) == 0
    assert {r["format"] for r in campaign.faults} == {"int8"}
    assert len({r["parameter"] for r in campaign.faults}) >= 10
    assert_matches_naive_loop(int8, batches, campaign)
    assert own_digest(int8) == before and hooks(int8) == 0


def test_faults_in_the_quantization_metadata_equal_a_direct_rebuild_of_the_weight():
    """The scales (float32 bits) and zero points (int8 bits) of the quantized weights, selected by name, against
    a reference that rebuilds the packed weight with the faulty metadata and runs the whole model."""
    import struct

    model = critnet.quantize_int8(small_net(), torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(20, 3, 8, 8, generator=generator), torch.randint(0, 10, (20,), generator=generator)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    before = state_digest(model)
    campaign = fault_campaign(model, batches, include=[r"weight_scale$", r"weight_zero_point$"], faults=40, seed=0)
    assert state_digest(model) == before
    assert {f.format for f in campaign.fault_list} == {"float32", "int8"}
    modules = dict(model.named_modules())
    with torch.no_grad():
        golden = [model(inputs) for inputs, _ in batches]
        for fault, row in zip(campaign.fault_list, campaign.faults):
            (site,) = fault.sites
            module = modules[site.parameter.rpartition(".")[0]]
            weight, bias = module.weight(), module.bias()
            scales, zero_points = weight.q_per_channel_scales().clone(), weight.q_per_channel_zero_points().clone()
            if site.parameter.endswith("weight_scale"):
                bits = struct.unpack("<I", struct.pack("<f", float(scales[site.index])))[0] ^ (1 << site.bit)
                scales[site.index] = struct.unpack("<f", struct.pack("<I", bits))[0]
            else:
                value = (int(zero_points[site.index]) & 0xFF) ^ (1 << site.bit)
                zero_points[site.index] = value - 256 if value >= 128 else value
            module.set_weight_bias(torch._make_per_channel_quantized_tensor(
                weight.int_repr(), scales, zero_points, weight.q_per_channel_axis()), bias)
            try:
                outputs = [model(inputs) for inputs, _ in batches]
            finally:
                module.set_weight_bias(weight, bias)
            masked = sum(int((o.view(torch.int32) == g.view(torch.int32)).all(1).sum()) for o, g in zip(outputs, golden))
            sdc1 = sum(int(((o.view(torch.int32) != g.view(torch.int32)).any(1) & (o.argmax(1) != g.argmax(1))).sum())
                       for o, g in zip(outputs, golden))
            assert (row["masked"], row["sdc1"]) == (masked, sdc1), row
    assert state_digest(model) == before
