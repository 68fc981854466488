"""Fault-injection campaigns against an independent reference: flip the bit through an int32 view, run the whole
model, compare with the golden logits. Logic tests use a tiny CNN on random data; one test uses ResNet20 on real
images."""

from __future__ import annotations

import csv
import hashlib
import math
import struct

import pytest
import torch
from tiny_nets import tiny_data, tiny_model
from torch import nn

from conftest import PRESETS, first_test_images, requires_shared
from fault_reference import outcomes
from critnet.analyses.campaign import fault_campaign
from critnet.choices import SettingError
from critnet.faults.injection import (
    Fault,
    FaultListError,
    Site,
    injected,
)
from critnet.formats import FORMATS
from critnet.faults.stats import achieved_margin, leveugle_sample_size, wilson_interval


FLOAT32 = FORMATS["float32"]


def state_bytes(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def reference_counts(model, batches, sites, fault_model="bitflip", target="weights"):
    """The independent loop: write the faulty bits through ``Tensor.view(torch.int32)`` (or a hook for activations),
    full forward passes, compare every image with the golden logits, restore."""
    with torch.no_grad():
        golden = [model(x) for x, _ in batches]
        saved, handles = [], []
        for parameter, index, bit in sites:
            mask = -(1 << 31) if bit == 31 else 1 << bit
            if target == "weights":
                flat = dict(model.named_parameters())[parameter].detach().view(-1).view(torch.int32)
                old = int(flat[index])
                new = {"bitflip": old ^ mask, "stuck_at_0": old & ~mask, "stuck_at_1": old | mask}[fault_model]
                flat[index] = struct.unpack("<i", struct.pack("<I", new & 0xFFFFFFFF))[0]
                saved.append((flat, index, old))
            else:
                def hook(_m, _i, out, index=index, mask=mask):
                    out = out.clone()
                    rows = out.view(out.shape[0], -1).view(torch.int32)
                    rows[:, index] ^= mask
                    return out
                handles.append(dict(model.named_modules())[parameter].register_forward_hook(hook))
        try:
            faulty = [model(x) for x, _ in batches]
        finally:
            for flat, index, old in reversed(saved):
                flat[index] = old
            for handle in handles:
                handle.remove()
    return outcomes(golden, faulty)


def same(rows_a, rows_b) -> bool:
    """Row lists equal, NaN included (a fault whose logits turn NaN has a NaN Δloss)."""
    return repr(rows_a) == repr(rows_b)


def sites_of(row):
    split = [str(row[c]).split(";") for c in ("parameter", "index", "bit")]
    return [(p, int(i), int(b)) for p, i, b in zip(*split)]


OUTCOMES = ("images", "masked", "noncritical", "sdc1", "sdc5", "nonfinite")


def assert_matches_reference(model, batches, campaign, fault_model="bitflip", target="weights"):
    for row in campaign.faults:
        expected = reference_counts(model, batches, sites_of(row), fault_model, target)
        assert {k: row[k] for k in OUTCOMES} == expected, row


def test_bit_flips_equal_an_independent_full_forward_loop():
    model, batches = tiny_model(), tiny_data()
    before = state_bytes(model)
    # every weight of conv1 in its sign bit (0.0 -> -0.0 included), plus a random draw over all bits and layers
    sign_flips = fault_campaign(model, batches, layers=[r"^conv1\.weight$"], bits=[31], faults="exhaustive")
    drawn = fault_campaign(model, batches, layers=[".*"], module_types=None, faults=80, seed=3)
    exponent = fault_campaign(model, batches, bits=[30], faults=8, seed=2)  # the top exponent bit: inf and NaN
    assert state_bytes(model) == before and hooks(model) == 0
    zero = next(r for r in sign_flips.faults if r["index"] == 0)
    assert zero["original"] == 0.0 and zero["masked"] == zero["images"] == 24
    assert {r["parameter"] for r in drawn.faults} >= {"conv1.weight", "conv2.weight", "bn1.weight", "fc.bias"}
    rows = drawn.faults + exponent.faults
    outcomes = {k: sum(r[k] for r in rows) for k in ("masked", "noncritical", "sdc1", "sdc5", "nonfinite")}
    assert all(outcomes.values()), outcomes  # the draws exercise every outcome
    for campaign in (sign_flips, drawn, exponent):
        assert_matches_reference(model, batches, campaign)
    assert state_bytes(model) == before


def test_stuck_at_ber_and_activation_faults_equal_the_loop():
    model, batches = tiny_model(), tiny_data()
    before = state_bytes(model)
    for fault_model in ("stuck_at_0", "stuck_at_1"):
        campaign = fault_campaign(model, batches, fault_model=fault_model, faults=40, seed=5)
        assert_matches_reference(model, batches, campaign, fault_model)
    ber = fault_campaign(model, batches, fault_model="ber", ber=2e-4, faults=15, seed=2)
    assert max(len(sites_of(r)) for r in ber.faults if r["parameter"]) >= 2  # several flips per inference
    assert_matches_reference(model, batches, ber)
    activations = fault_campaign(model, batches, target="activations", faults=40, seed=4)
    assert {r["parameter"] for r in activations.faults} <= {"conv1", "conv2", "fc"}
    assert all(r["original"] == "" for r in activations.faults)
    assert_matches_reference(model, batches, activations, target="activations")
    assert state_bytes(model) == before and hooks(model) == 0


def test_stuck_at_semantics():
    one, two = 0x3F800000, 0x40000000  # 1.0 and 2.0
    assert FLOAT32.apply(one, 31, "stuck_at_1") == struct.unpack("<i", struct.pack("<f", -1.0))[0]
    assert FLOAT32.apply(two, 30, "stuck_at_0") == 0  # 2.0 -> 0.0
    assert FLOAT32.apply(two, 30, "stuck_at_1") == two  # already 1: no change
    assert FLOAT32.apply(one, 0, "bitflip") == one + 1
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 1.0]]))
    with injected(model, Fault(0, "stuck_at_0", "weights", (Site("weight", 0, 30),))):
        assert model.weight[0, 0].item() == 0.0
    assert model.weight[0, 0].item() == 2.0
    # stuck-at on a bit that already holds the value changes nothing: masked on every image, bit for bit
    small, batches = tiny_model(), tiny_data()
    campaign = fault_campaign(small, batches, fault_model="stuck_at_1", bits=[29], faults=30, seed=0)
    identity = [r for r in campaign.faults if r["original"] == r["faulty"]]
    assert identity and all(r["masked"] == r["images"] for r in identity)


def test_weights_come_back_bit_for_bit_when_the_campaign_raises(monkeypatch):
    import critnet.faults.evaluator as evaluate

    model, batches = tiny_model(), tiny_data()
    with torch.no_grad():  # a NaN with a payload and a negative zero must survive the restore
        model.fc.weight.view(-1).view(torch.int32)[:2] = torch.tensor([0x7FC00123, -(1 << 31)], dtype=torch.int32)
    before = state_bytes(model)
    calls = {"n": 0}
    original = evaluate.tally_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "tally_rows", failing)
    for kwargs in ({"layers": [r"fc\.weight"]}, {"layers": [".*"], "module_types": None},
                   {"target": "activations"}, {"fault_model": "ber", "ber": 1e-3}):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="injected failure"):
            fault_campaign(model, batches, faults=30, seed=1, **kwargs)
        assert state_bytes(model) == before and hooks(model) == 0, kwargs


def test_leveugle_sizing_and_wilson_intervals_against_hand_computed_values():
    assert leveugle_sample_size(1000, 0.05, 0.95) == 278  # 277.73
    assert leveugle_sample_size(36864 * 32, 0.05, 0.95) == 385  # 384.02
    assert leveugle_sample_size(36864 * 32, 0.01, 0.99) == 16358  # 16357.25
    assert leveugle_sample_size(math.inf, 0.01, 0.99) == 16588  # t = 2.5758: t²/4/e² = 16587.24
    assert leveugle_sample_size(10, 0.01, 0.99) == 10
    assert achieved_margin(278, 1000, 0.95) == pytest.approx(0.05, abs=2e-4)
    for (x, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                (0, 20): (0.0, 0.1611)}.items():  # Newcombe (1998), Table I
        assert wilson_interval(x, n) == pytest.approx((low, high), abs=6e-5)
    model, batches = tiny_model(), tiny_data(images=8)
    campaign = fault_campaign(model, batches, layers=[r"conv\d\.weight"], bits=[30, 31], error_margin=0.1,
                              confidence=0.95, stratify=("layer", "bit"))
    sizes = {row["stratum"]: (row["population"], row["leveugle_n"], row["drawn"]) for row in campaign.sizing}
    # conv1: 162 weights per bit -> 162 / (1 + 0.01·161 / (1.96²/4)) = 60.9; conv2: 324 -> 74.0
    assert sizes["conv1.weight/bit30"] == (162, 61, 61) and sizes["conv2.weight/bit31"] == (324, 75, 75)
    overall = campaign.rates["overall"]
    assert overall["faults"] == 2 * 61 + 2 * 75 and 0 <= overall["critical_low"] <= overall["critical"]
    assert overall["critical"] <= overall["critical_high"] <= 1


def test_a_leveugle_sized_campaign_weights_every_rate_by_population():
    """About the same number of faults per layer, layers of 162 to 30 weights: the overall rates are the
    population's (each fault stands for its layer's weights × bits over its layer's faults), not the pooled ones."""
    model, batches = tiny_model(), tiny_data()
    campaign = fault_campaign(model, batches, error_margin=0.2, confidence=0.9, seed=2)
    sizes = {name: p.numel() * 32 for name, p in model.named_parameters()}
    drawn = {name: sum(r["parameter"] == name for r in campaign.faults) for name in sizes}
    assert {n: d for n, d in drawn.items() if d} == {"conv1.weight": 17, "conv2.weight": 17, "fc.weight": 17}

    def weighted(numerator, denominator):
        weight = {name: sizes[name] / drawn[name] for name in drawn if drawn[name]}
        top = math.fsum(weight[r["parameter"]] * numerator(r) for r in campaign.faults)
        return top / math.fsum(weight[r["parameter"]] * denominator(r) for r in campaign.faults)

    overall = campaign.rates["overall"]
    sdc1 = weighted(lambda r: r["sdc1"], lambda r: r["images"])
    finite = lambda r: r["images"] - r["delta_loss_excluded"]  # noqa: E731
    delta = weighted(lambda r: r["delta_loss"] * finite(r) if finite(r) else 0.0, finite)
    assert overall["sdc1_per_image"] == pytest.approx(sdc1, rel=1e-12)
    assert overall["delta_loss"] == pytest.approx(delta, rel=1e-9) and math.isfinite(delta)
    pooled = sum(r["sdc1"] for r in campaign.faults) / sum(r["images"] for r in campaign.faults)
    assert abs(pooled - sdc1) > 0.01 * sdc1 > 0  # the pooled mean would fail the check on this draw
    assert overall["sdc1_per_image_low"] < sdc1 < overall["sdc1_per_image_high"]
    assert overall["population"] == sum(sizes[n] for n in drawn if drawn[n])
    # Kish's effective number of faults of 3 × 17 faults weighted 96, 192 and 17.6 each
    weights = [sizes[n] / drawn[n] for n in drawn if drawn[n] for _ in range(drawn[n])]
    kish = sum(weights) ** 2 / sum(w * w * (1 - 17 / sizes[n]) for n in drawn if drawn[n]
                                   for w in [sizes[n] / 17] * 17)
    assert overall["effective_n"] == pytest.approx(kish, rel=1e-12) and overall["effective_n"] < 51


def test_non_finite_images_are_counted_and_left_out_of_delta_loss():
    model, batches = tiny_model(), tiny_data()
    campaign = fault_campaign(model, batches, bits=[30], layers=[r"conv\d\.weight"], faults=30, seed=0)
    broken = [r for r in campaign.faults if r["nonfinite"]]
    assert broken and any(r["nonfinite"] < r["images"] for r in broken)  # partly and wholly broken faults
    for row in campaign.faults:  # a NaN/inf logit always leaves the loss out; no finite image is lost otherwise
        assert row["nonfinite"] <= row["delta_loss_excluded"] <= row["images"]
        assert math.isfinite(row["delta_loss"]) == (row["delta_loss_excluded"] < row["images"])
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        golden = nn.functional.cross_entropy(model(x), y, reduction="none").double()
        for row in campaign.faults[:6]:
            with injected(model, Fault(0, "bitflip", "weights", tuple(Site(*s) for s in sites_of(row)))):
                change = nn.functional.cross_entropy(model(x), y, reduction="none").double() - golden
            kept = change[torch.isfinite(change)]
            assert len(change) - len(kept) == row["delta_loss_excluded"]
            if len(kept):
                assert row["delta_loss"] == pytest.approx(kept.mean().item(), rel=1e-6, abs=1e-9)
    for table in ("overall", "layer", "bit", "layer_bit"):
        rows = campaign.rates[table] if table != "overall" else [campaign.rates["overall"]]
        for row in rows:
            if row["faults"]:
                assert math.isfinite(row["delta_loss"]), row
    assert campaign.rates["overall"]["delta_loss_excluded"] == sum(r["delta_loss_excluded"] for r in campaign.faults)


def test_empty_layer_bit_cells_are_reported_with_their_population():
    model, batches = tiny_model(), tiny_data(images=8)
    campaign = fault_campaign(model, batches, error_margin=0.2, confidence=0.9, seed=1)
    cells = campaign.rates["layer_bit"]
    assert len(cells) == 3 * 32  # every layer × bit, drawn or not
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    empty = [c for c in cells if c["faults"] == 0]
    assert empty and all(math.isnan(c["critical"]) and math.isnan(c["sdc1_per_image"]) for c in empty)
    assert all(c["population"] == sizes[c["layer"]] for c in cells)
    for row in campaign.rates["bit"]:  # a bit's row covers every layer's values at that bit, drawn or not
        assert row["population"] == sum(sizes[n] for n in ("conv1.weight", "conv2.weight", "fc.weight"))
        assert row["unsampled"] == 0


def test_strata_without_a_fault_leave_the_overall_rate_open():
    # 2 faults for 3 strata: fc (30 weights) gets none, so a tenth of the population is unknown
    model, batches = tiny_model(), tiny_data(images=8)
    campaign = fault_campaign(model, batches, bits=[30], faults=2, seed=0)
    overall = campaign.rates["overall"]
    assert overall["unsampled"] == 30 and math.isnan(overall["critical"])
    share = 30 / overall["population"]
    assert overall["critical_low"] <= 1 - share and overall["critical_high"] >= share
    assert repr(campaign).splitlines()[2].split()[:3] == ["overall", "2", "–"]


def test_a_total_of_at_least_one_fault_per_stratum_reaches_every_stratum():
    # in proportion to the population, fc (a tenth of it) would get none of 4 faults; each stratum gets one first
    model, batches = tiny_model(), tiny_data(images=8)
    campaign = fault_campaign(model, batches, bits=[30], faults=4, seed=0)
    assert sorted(s["drawn"] for s in campaign.sizing) == [1, 1, 2]
    overall = campaign.rates["overall"]
    assert overall["unsampled"] == 0 and 0.0 <= overall["critical"] <= 1.0


def test_seeded_draws_repeat_and_replay_from_faults_csv(tmp_path):
    model, batches = tiny_model(), tiny_data()
    first = fault_campaign(model, batches, faults=30, seed=7)
    first.report(tmp_path / "a", print_table=False)
    again = fault_campaign(model, batches, faults=30, seed=7, progress=True)  # a rich bar, as critnet.rank draws
    other = fault_campaign(model, batches, faults=30, seed=8)
    assert same(first.faults, again.faults) and not same(first.faults, other.faults)
    # a memory budget below one batch of cached values: every batch is its own segment, the counts are the same
    segmented = fault_campaign(model, batches, faults=30, seed=7, memory_budget_mb=0.01)
    assert same(segmented.faults, first.faults)
    assert repr(first).startswith("Campaign(30 faults") and "<table>" in first._repr_html_()
    assert len(first.plot().axes) == 3  # heatmap, its colour bar, per-layer bars
    replayed = fault_campaign(model, batches, fault_list=tmp_path / "a" / "faults.csv")
    assert same(replayed.faults, first.faults)
    with open(tmp_path / "a" / "faults.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["sdc1"]) for r in rows] == [r["sdc1"] for r in first.faults]
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"faults.csv", "campaign.json", "fault_rates.csv",
                                                            "fault_vulnerability.csv", "fault_heatmap.png"}
    with pytest.raises(FaultListError, match="faults.csv, line 2: the original values"):
        fault_campaign(tiny_model(seed=9), batches, fault_list=tmp_path / "a" / "faults.csv")


def test_a_cut_partial_file_resumes_with_the_same_outcomes(tmp_path):
    model, batches = tiny_model(), tiny_data()
    first = fault_campaign(model, batches, faults=40, seed=2, resume_dir=tmp_path)
    (partial,) = tmp_path.glob("*.jsonl")
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 40
    partial.write_text("".join(lines[:15]))  # as if stopped after 15 faults
    second = fault_campaign(model, batches, faults=40, seed=2, resume_dir=tmp_path)
    assert same(second.faults, first.faults) and second.info["resumed_faults"] == 15
    assert len(partial.read_text().splitlines()) == 40  # only the 25 missing faults were evaluated again


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": [32]}, r"bits\[0\]: 32 is not a bit position 0..31"),
    ({"fault_model": "flip"}, "fault_model: 'flip' is not one of bitflip, stuck_at_0, stuck_at_1, ber"),
    ({"faults": 0}, "faults: 0 is not null"),
    ({"error_margin": 1.5}, "error_margin: 1.5 is outside"),
    ({"stratify": ["bit"]}, "stratify: .* must contain 'layer'"),
    ({"fault_model": "ber"}, "ber: None must be a bit-error rate"),
    ({"layers": ["nothing"]}, r"include: the selection is empty: include=\('nothing',\)"),
    ({"layers": ["fc"], "include": ["fc"]}, "layers: another name of include; give one of them, not both"),
    ({"target": "activations", "exclude": ["("]}, "exclude: '\\(' is not a valid regular expression"),
])
def test_bad_settings_are_one_line_naming_the_key(kwargs, message):
    with pytest.raises(SettingError, match=message) as caught:
        fault_campaign(tiny_model(), tiny_data(images=4), faults=kwargs.pop("faults", 5), **kwargs)
    assert "\n" not in str(caught.value)


@requires_shared
def test_resnet20_outcomes_equal_the_full_forward_loop(resnet20_cifar):
    batches = first_test_images(12, batch_size=6)
    before = state_bytes(resnet20_cifar)
    campaign = fault_campaign(resnet20_cifar, batches, faults=20, seed=11, bits=list(range(20, 32)))
    assert campaign.info["shortcut_fallbacks"] == {}
    assert_matches_reference(resnet20_cifar, batches, campaign)
    assert state_bytes(resnet20_cifar) == before


def test_the_cli_preset_runs_the_campaign_and_rejects_bad_flags_in_one_line(tmp_path, capsys):
    import json

    from test_data import make_image_folder

    from critnet.cli import main

    make_image_folder(tmp_path / "data", "test", 10, 1)
    args = ["validate", "-c", str(PRESETS / "resnet20_cifar10.yaml"), "-c", str(PRESETS / "faults_resnet20.yaml"),
            "--data.root", str(tmp_path / "data"), "--data.batch_size", "5", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.callbacks.init_args.faults", "8",
            "--trainer.callbacks.init_args.bits=[29, 30, 31]"]
    main(args)
    (log_dir,) = {p.parent for p in (tmp_path / "runs").rglob("campaign.json")}
    summary = json.loads((log_dir / "campaign.json").read_text())
    assert summary["faults"] == 8 and summary["golden"]["images"] == 10
    assert {"faults.csv", "fault_rates.csv", "fault_vulnerability.csv", "fault_heatmap.png",
            "fault_layers.png"} <= {p.name for p in log_dir.iterdir()}
    assert "fault campaign" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        main([*args, "--trainer.callbacks.init_args.bits=[40]"])
    assert exit_code.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == ["error: FaultCampaign: bits[0]: 40 is not a bit position 0..31 (the widest format, float32, has 32 bits)"]


def test_two_gloo_processes_share_the_faults_and_equal_one(gloo_runs):
    """The campaign of tests/gloo_runs.py (fixture gloo_runs) over two gloo processes: layers=[".*"],
    module_types=None, faults=30, seed=6; rank 0 writes its report into gloo_runs / "faults"."""
    import json

    from gloo_runs import FAULTS

    assert FAULTS == dict(layers=[".*"], module_types=None, faults=30, seed=6)
    folder = gloo_runs / "faults"
    single = fault_campaign(tiny_model(), tiny_data(), layers=[".*"], module_types=None, faults=30, seed=6)
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["rows"] == ranks[1]["rows"] == repr(single.faults)
    assert ranks[0]["mine"] + ranks[1]["mine"] == 30 and min(ranks[0]["mine"], ranks[1]["mine"]) > 0
    assert '"devices": 2' in (folder / "campaign.json").read_text()  # written once, by rank 0
