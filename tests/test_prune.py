"""critnet.engine.pruning_masks against an independent implementation of DWP §3.2 written here, on the public ResNet20 and real
images."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from critnet.analyses.pruning import OrderSettings, SweepSettings
from critnet.distributed import Distributed
from critnet.engine.pruning_masks import (
    LayerSelection,
    channel_count,
    channel_l1,
    channel_masks,
    channel_order,
    dwp_masks,
    layer_norms,
    prunable_layers,
    pruned,
    read_channel_ranking,
)
from critnet.evaluation import batch_tallies
from critnet.evaluation_set import as_evaluation_set


def evaluate(model, batches, rank=0, world_size=1, all_gather=None):
    """critnet's evaluation of one mask setting, as pruning runs it."""
    return batch_tallies(model, as_evaluation_set(batches), distributed=Distributed(rank, world_size, all_gather))


# ---------------------------------------------------------------- the independent reference (plain Python loops)

def reference_unit_norms(model: nn.Module, method: str, include_linear: bool = False):
    """[(module name, [(unit key, norm)])] with norms summed one weight at a time in Python floats (float64)."""
    layers = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Conv2d) or (include_linear and isinstance(module, nn.Linear))):
            continue
        w = module.weight.detach().cpu()
        units = []
        if method == "neurons":
            for o in range(w.shape[0]):
                units.append(((o,), math.fsum(abs(v) for v in w[o].flatten().tolist())))
        elif method == "connections":
            for o in range(w.shape[0]):
                for i in range(w.shape[1]):
                    units.append(((o, i), math.fsum(abs(v) for v in w[o, i].flatten().tolist())))
        else:
            for idx, v in zip(torch.cartesian_prod(*[torch.arange(s) for s in w.shape]).tolist(), w.flatten().tolist()):
                units.append((tuple(idx), abs(v)))
        layers.append((name, units))
    return layers


def reference_masks(model: nn.Module, method: str, scope: str, p_prune: float, include_linear: bool = False):
    """DWP masks at p_bern = 1: units whose norm is strictly below the sorted norm at index int(p_prune·N)."""
    layers = reference_unit_norms(model, method, include_linear)

    def threshold_of(norms):
        index = int(p_prune * len(norms))
        return math.inf if index >= len(norms) else sorted(norms)[index]

    if scope == "global":
        shared = threshold_of([n for _, units in layers for _, n in units])
    masks = {}
    for name, units in layers:
        threshold = shared if scope == "global" else threshold_of([n for _, n in units])
        mask = torch.ones_like(model.get_submodule(name).weight, dtype=torch.bool)
        for key, norm in units:
            if norm < threshold:
                mask[key] = False
        masks[name] = mask
    return masks


def reference_evaluate(model: nn.Module, batches):
    """(mean loss, top-1 %, top-5 %) with per-sample float64 losses added in sample order.

    Compared for equality: critnet prunes through a hook that multiplies by the same mask and evaluates the same
    batches, so the same kernels see the same inputs and the float64 sums are added in the same order.
    """
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            for row, label in zip(logits.tolist(), y.tolist()):
                order = sorted(range(len(row)), key=lambda c: -row[c])
                top1 += order[0] == label
                top5 += label in order[:5]
                n += 1
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="none").double().sum())
    return loss_sum / n, 100.0 * top1 / n, 100.0 * top5 / n


def masked_copy(model: nn.Module, masks) -> nn.Module:
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            clone.get_submodule(name).weight.mul_(mask)
    return clone


def snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return list(model.state_dict().keys()), state, [n for n, _ in model.named_parameters()]


def assert_identical(model: nn.Module, before) -> None:
    keys, state, param_names = before
    assert list(model.state_dict().keys()) == keys
    assert [n for n, _ in model.named_parameters()] == param_names
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype
        assert value.cpu().numpy().tobytes() == state[key].cpu().numpy().tobytes(), key
    for module in model.modules():
        assert not torch_prune.is_pruned(module)
        assert "weight_orig" not in module._parameters and "weight_mask" not in module._buffers
        assert not module._forward_pre_hooks
        assert "weight" not in module.__dict__


# ---------------------------------------------------------------- masks and metrics against the reference

@pytest.mark.parametrize(
    "method,scope,p_prune",
    [("connections", "global", 0.2), ("connections", "global", 0.4), ("neurons", "global", 0.05),
     ("neurons", "layerwise", 0.3), ("weights", "global", 0.3), ("connections", "layerwise", 0.5)],
)
def test_masks_match_reference_at_p_bern_1(resnet20_cifar, method, scope, p_prune):
    ours = dwp_masks(resnet20_cifar, method, scope, p_prune, p_bern=1.0, seed=3)
    expected = reference_masks(resnet20_cifar, method, scope, p_prune)
    assert list(ours.masks) == list(expected)
    for name in expected:
        assert torch.equal(ours.masks[name], expected[name]), name
    zeroed = sum(int((~m).sum()) for m in expected.values())
    selected = sum(m.numel() for m in expected.values())
    assert ours.pruned == zeroed and ours.selected == selected
    assert ours.ratio == zeroed / selected
    assert ours.param_fraction == zeroed / sum(p.numel() for p in resnet20_cifar.parameters())
    if scope == "global":  # the threshold sits at index int(p·N): just under p of the units fall strictly below it
        assert ours.units_pruned <= int(p_prune * ours.units)


def test_linear_layers_selected_on_request(resnet20_cifar):
    ours = dwp_masks(resnet20_cifar, "connections", "global", 0.3, include_linear=True)
    expected = reference_masks(resnet20_cifar, "connections", "global", 0.3, include_linear=True)
    assert "linear" in ours.masks and "linear" not in dwp_masks(resnet20_cifar, "connections", "global", 0.3).masks
    for name in expected:
        assert torch.equal(ours.masks[name], expected[name])


@pytest.mark.parametrize("method,p_prune", [("connections", 0.3), ("neurons", 0.1)])
def test_pruned_metrics_match_reference_and_restore_is_exact(resnet20_cifar, cifar_test_256, method, p_prune):
    before = snapshot(resnet20_cifar)
    masks = dwp_masks(resnet20_cifar, method, "global", p_prune)
    expected_masks = reference_masks(resnet20_cifar, method, "global", p_prune)
    reference = reference_evaluate(masked_copy(resnet20_cifar, expected_masks), cifar_test_256)
    with pruned(resnet20_cifar, masks):
        for name, mask in masks.masks.items():  # the live weight is the masked one, zeroed in place
            original = before[1][f"{name}.weight"]
            assert torch.equal(resnet20_cifar.get_submodule(name).weight, original * mask)
        tally = evaluate(resnet20_cifar, cifar_test_256)
    assert (tally.loss, tally.top1, tally.top5) == reference
    assert tally.samples == 256
    assert_identical(resnet20_cifar, before)
    unpruned = evaluate(resnet20_cifar, cifar_test_256)
    assert (unpruned.loss, unpruned.top1, unpruned.top5) == reference_evaluate(resnet20_cifar, cifar_test_256)
    assert unpruned.top1 > tally.top1 or method == "connections"


def test_restore_is_exact_when_evaluation_raises(resnet20_cifar, cifar_test_256):
    before = snapshot(resnet20_cifar)
    masks = dwp_masks(resnet20_cifar, "neurons", "global", 0.5)
    with pytest.raises(RuntimeError, match="injected"):
        with pruned(resnet20_cifar, masks):
            resnet20_cifar(cifar_test_256[0][0][:4])
            raise RuntimeError("injected failure mid-evaluation")
    assert_identical(resnet20_cifar, before)


def test_restore_is_exact_when_applying_fails_midway(resnet20_cifar):
    before = snapshot(resnet20_cifar)
    masks = dwp_masks(resnet20_cifar, "connections", "global", 0.2)
    masks.masks["layer2.0.conv1"] = masks.masks["layer2.0.conv1"][:, :1]  # a wrong shape after several good layers
    with pytest.raises(ValueError, match="layer2.0.conv1"):
        with pruned(resnet20_cifar, masks):
            pass
    assert_identical(resnet20_cifar, before)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("method", ["connections", "neurons", "weights"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_edges_prune_nothing_or_everything(resnet20_cifar, method, scope):
    assert dwp_masks(resnet20_cifar, method, scope, p_prune=0.0).pruned == 0
    assert dwp_masks(resnet20_cifar, method, scope, p_prune=0.7, p_bern=0.0).pruned == 0
    everything = dwp_masks(resnet20_cifar, method, scope, p_prune=1.0, p_bern=1.0)
    assert everything.ratio == 1.0 and everything.units_pruned == everything.units
    assert not any(m.any() for m in everything.masks.values())


def test_p_prune_1_evaluates_and_restores(resnet20_cifar, cifar_test_256):
    before = snapshot(resnet20_cifar)
    with pruned(resnet20_cifar, dwp_masks(resnet20_cifar, "connections", "global", 1.0)):
        tally = evaluate(resnet20_cifar, cifar_test_256[:1])
    assert tally.samples == 128 and math.isfinite(tally.loss)
    assert_identical(resnet20_cifar, before)


def test_ties_at_the_threshold_survive():
    conv = nn.Conv2d(1, 5, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 2.0, -1.0, 2.0, -2.0]).reshape(5, 1, 1, 1))
    model = nn.Sequential(conv)
    # sorted norms 1, 2, 2, 2, 3: the threshold at index int(0.2·5)=1 and at int(0.6·5)=3 is 2, so only the 1 goes
    for p_prune in (0.2, 0.4, 0.6):
        masks = dwp_masks(model, "neurons", "global", p_prune)
        assert masks.masks["0"].flatten().tolist() == [True, True, False, True, True]
        assert masks.threshold == 2.0
    everything_below_3 = dwp_masks(model, "neurons", "global", 0.8).masks["0"].flatten().tolist()
    assert everything_below_3 == [True, False, False, False, False]


def test_bernoulli_draws_are_seeded_nested_and_near_p_bern(resnet20_cifar):
    full = dwp_masks(resnet20_cifar, "connections", "global", 0.4, p_bern=1.0, seed=7)
    half = dwp_masks(resnet20_cifar, "connections", "global", 0.4, p_bern=0.5, seed=7)
    again = dwp_masks(resnet20_cifar, "connections", "global", 0.4, p_bern=0.5, seed=7)
    other = dwp_masks(resnet20_cifar, "connections", "global", 0.4, p_bern=0.5, seed=8)
    assert half.fingerprint() == again.fingerprint() != other.fingerprint()
    norms = layer_norms(resnet20_cifar, "connections")  # precomputed once for a sweep: the same masks
    reused = dwp_masks(resnet20_cifar, "connections", "global", 0.4, 0.5, seed=7, norms=norms)
    assert reused.fingerprint() == half.fingerprint()
    for name in full.masks:  # whatever half prunes, full prunes as well
        assert not (~half.masks[name] & full.masks[name]).any()
    # one uniform number per (out, in) kernel of the whole model in model order, as one long draw of the seeded
    # generator (critnet draws layer by layer to keep memory per layer)
    kernels = [mask[:, :, 0, 0].flatten() for mask in full.masks.values()]
    draws = torch.rand(sum(len(k) for k in kernels), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for (name, mask), kept, draw in zip(half.masks.items(), kernels, draws.split([len(k) for k in kernels])):
        assert torch.equal(mask[:, :, 0, 0].flatten(), ~(~kept & (draw < 0.5))), name
    assert abs(half.units_pruned / full.units_pruned - 0.5) < 0.02  # ~ 10^4 candidate kernels
    assert abs(half.ratio - 0.5 * full.ratio) < 0.01


@pytest.mark.parametrize("key,kwargs", [("p_prune", {"p_prune": 1.5}), ("p_prune", {"p_prune": -0.1}),
                                        ("p_bern", {"p_bern": float("nan")}), ("method", {"method": "filters"}),
                                        ("scope", {"scope": "local"})])
def test_bad_arguments_name_the_key(resnet20_cifar, key, kwargs):
    with pytest.raises(ValueError, match=key):
        dwp_masks(resnet20_cifar, **kwargs)


@pytest.mark.parametrize("settings,message", [
    (lambda: SweepSettings(method="filters"), "method: 'filters' is not one of"),
    (lambda: SweepSettings(p_bern=[0.5, 2]), "p_bern[1]: 2 is outside [0, 1]"),
    (lambda: SweepSettings(repeats=0), "repeats: 0 is not an integer >= 1"),
    (lambda: SweepSettings(exclude=["("]), "exclude: '(' is not a valid regular expression"),
    (lambda: OrderSettings(orders=[]), "orders: must list at least one of criticality, l1, random"),
    (lambda: OrderSettings(orders=["l1", "size"]), "orders[1]: 'size' is not one of"),
    (lambda: OrderSettings(criticality_method="taylor"), "criticality_method: 'taylor' is not one of exact, naive"),
    (lambda: OrderSettings(ratios=[]), "ratios: must list at least one value"),
])
def test_bad_settings_are_one_line_naming_the_key(settings, message):
    with pytest.raises(ValueError) as error:
        settings()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_layer_selection_picks_the_pruned_layers(resnet20_cifar):
    def names(**selection):
        return [name for name, _ in prunable_layers(resnet20_cifar, LayerSelection(**selection))]

    convs = [name for name, module in resnet20_cifar.named_modules() if isinstance(module, nn.Conv2d)]
    assert names() == convs and names(include_linear=True) == [*convs, "linear"]
    assert names(module_types=["Linear"]) == ["linear"]  # module_types replaces the default classes
    assert names(include=["^layer3"], exclude=["conv2"]) == [c for c in convs if c.startswith("layer3") and
                                                             "conv2" not in c]
    masks = dwp_masks(resnet20_cifar, "connections", "global", 0.5, selection=LayerSelection(include=["^layer1"]))
    assert list(masks.masks) == [c for c in convs if c.startswith("layer1")]
    assert len(channel_l1(resnet20_cifar, LayerSelection(module_types=["Linear"]))) == 10
    for selection, message in [({"module_types": ["Linear"], "exclude": ["linear"]}, "no Linear layer whose name"),
                               ({"module_types": ["Gizmo"]}, "module_types: 'Gizmo' is neither"),
                               ({"module_types": ["BatchNorm2d"]}, "has no weight of shape (out, in, ...)")]:
        with pytest.raises(ValueError) as error:
            names(**selection)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_the_sweep_prunes_and_records_its_selection(resnet20_cifar, cifar_test_256):
    import critnet

    batch = (cifar_test_256[0][0][:16], cifar_test_256[0][1][:16])
    sweep = critnet.prune_sweep(resnet20_cifar, batch, method="neurons", p_prune=[1.0], module_types=["Linear"])
    assert sweep.rows[-1]["selected_weights"] == 640 and sweep.rows[-1]["ratio"] == 1.0  # the 64 → 10 linear
    assert sweep.info["module_types"] == ["Linear"] and sweep.info["include"] is None
    guided = critnet.compare_orders(resnet20_cifar, batch, orders=["l1"], ratios=[0.5], include=["^layer3"])
    assert guided.rows[0]["channels"] == 6 * 64 and guided.info["channel_ratios"] == [0.5]


def test_refuses_a_model_that_is_already_pruned(resnet20_cifar):
    torch_prune.l1_unstructured(resnet20_cifar.conv1, "weight", amount=0.1)
    with pytest.raises(ValueError, match="conv1"):
        dwp_masks(resnet20_cifar, "weights")


# ---------------------------------------------------------------- channel orders (criticality-guided pruning)

def test_channel_orders(resnet20_cifar, tmp_path):
    norms = channel_l1(resnet20_cifar)
    assert len(norms) == 688  # 16 + 6·16 + 6·32 + 6·64 conv filters
    by_l1 = channel_order(resnet20_cifar, "l1")
    assert [norms[c] for c in by_l1] == sorted(norms.values())
    random_a = channel_order(resnet20_cifar, "random", seed=1)
    assert sorted(random_a) == sorted(norms) and random_a == channel_order(resnet20_cifar, "random", seed=1)
    assert random_a != channel_order(resnet20_cifar, "random", seed=2)

    path = tmp_path / "ranking.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "unit", "layer", "index", "score"])
        for n, channel in enumerate(norms):
            layer, index = channel.layer, channel.index
            score = float("nan") if n == 5 else float((n * 37) % 101)
            writer.writerow([n, f"{layer}.weight[{index}]", layer, index, score])
        writer.writerow([9999, "linear.weight[0]", "linear", 0, 0.5])  # a layer outside the selection is ignored
    scores = read_channel_ranking(path)
    order = channel_order(resnet20_cifar, "criticality", criticality=scores)
    assert order[-1] == list(norms)[5]  # NaN = broke the network = most critical = pruned last
    values = [scores[c] for c in order[:-1]]
    assert values == sorted(values)
    for a, b in zip(order[:-2], order[1:-1]):  # ties keep model order
        if scores[a] == scores[b]:
            assert list(norms).index(a) < list(norms).index(b)
    with pytest.raises(ValueError, match="lacks"):
        channel_order(resnet20_cifar, "criticality", criticality={c: 1.0 for c in list(norms)[:10]})
    with pytest.raises(ValueError, match="criticality_csv"):
        read_channel_ranking(tmp_path / "missing.csv")


def test_channel_masks_zero_whole_filters(resnet20_cifar, cifar_test_256):
    before = snapshot(resnet20_cifar)
    order = channel_order(resnet20_cifar, "l1")
    count = channel_count(0.1, len(order))
    assert count == 69
    masks = channel_masks(resnet20_cifar, order[:count])
    assert masks.units_pruned == count
    zeroed = {}
    for channel in order[:count]:
        zeroed.setdefault(channel.layer, []).append(channel.index)
    reference = {}
    for name, module in resnet20_cifar.named_modules():
        if isinstance(module, nn.Conv2d):
            mask = torch.ones_like(module.weight, dtype=torch.bool)
            mask[zeroed.get(name, [])] = False
            reference[name] = mask
            assert torch.equal(masks.masks[name], mask)
    with pruned(resnet20_cifar, masks):
        tally = evaluate(resnet20_cifar, cifar_test_256)
    assert (tally.loss, tally.top1, tally.top5) == reference_evaluate(masked_copy(resnet20_cifar, reference),
                                                                      cifar_test_256)
    assert_identical(resnet20_cifar, before)


def test_sharded_evaluation_equals_one_process(resnet20_cifar):
    from conftest import first_test_images

    batches = first_test_images(160, batch_size=32)  # 5 batches over 2 "ranks": uneven shards
    single = evaluate(resnet20_cifar, batches)
    parts = {}

    def recorder(rank):
        def gather(obj):
            parts[rank] = obj
            return [obj]
        return gather

    alone = evaluate(resnet20_cifar, batches, rank=0, world_size=2, all_gather=recorder(0))
    assert alone.samples == 96  # batches 0, 2, 4
    merged = evaluate(resnet20_cifar, batches, rank=1, world_size=2, all_gather=lambda obj: [parts[0], obj])
    assert merged == single and single.samples == 160
    with pytest.raises(ValueError, match="all_gather"):
        evaluate(resnet20_cifar, batches, world_size=2)
