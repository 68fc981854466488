"""The exact engine on one tiny model per torchvision family: exact == naive, heads against a hand-written
attention with the head masked, grouped convolutions, token activations, prune sweeps on transformers."""

from __future__ import annotations

import copy
import hashlib
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.densenet import DenseNet
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.maxvit import MaxVit
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from conftest import KERNEL_REL
from critnet.evaluation_set import EvaluationSet
from critnet.engine import evaluate_units
from critnet.engine.pruning_masks import dwp_masks, pruned
from critnet.evaluation import batch_tallies
from critnet.evaluation_set import as_evaluation_set
from critnet.modes import evaluation_mode
from critnet.perturb import Perturbation, Unit, activation_channel_dim, attention_heads, perturbed
from critnet.selection import select_units


def evaluate(model, batches):
    """critnet's evaluation of one pruning setting (sums per batch, in eval mode), as the prune sweep runs it."""
    with evaluation_mode(model):
        return batch_tallies(model, as_evaluation_set(batches))

CLASSES = 5


def state_checksum(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tiny_vit() -> nn.Module:
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32,
                              num_classes=CLASSES)
    # torchvision starts the classifier at zero: every logit equal, every top-1 a tie
    nn.init.normal_(model.heads.head.weight)
    return model


# One tiny member of each family (widths and depths cut down; the layer types are the family's own).
FAMILIES = {
    "mobilenet_v3": lambda: torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=CLASSES),
    "efficientnet": lambda: EfficientNet(_efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)[0],
                                         0.2, num_classes=CLASSES),
    "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=CLASSES),
    "densenet": lambda: DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=CLASSES),
    "regnet": lambda: RegNet(BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=4,
                                                          se_ratio=0.25), stem_width=8, num_classes=CLASSES),
    "vit": tiny_vit,
    "swin": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                    window_size=[2, 2], num_classes=CLASSES),
    "maxvit": lambda: MaxVit(input_size=(16, 16), stem_channels=8, partition_size=2, block_channels=[8],
                             block_layers=[1], head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES),
}


def batches_for(seed: int = 0, count: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=generator), torch.randint(0, CLASSES, (4,), generator=generator))
            for _ in range(count)]


def spread(units: list[Unit], count: int) -> list[Unit]:
    """``count`` units spread over the whole list (first, last and evenly between)."""
    if len(units) <= count:
        return units
    return [units[round(i * (len(units) - 1) / (count - 1))] for i in range(count)]


def assert_exact_equals_naive(model: nn.Module, units: list[Unit], batches, perturbation=Perturbation("zero")):
    data = EvaluationSet.from_batches(batches)
    before = state_checksum(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to full passes would be a warning: here every unit is placed
        exact = evaluate_units(model, units, perturbation, data, method="exact")
    naive = evaluate_units(model, units, perturbation, data, method="naive")
    assert state_checksum(model) == before
    for e, n in zip(exact, naive):
        assert e.exact and e.unit == n.unit
        assert (e.total.top1_correct, e.total.top5_correct, e.total.samples) == (
            n.total.top1_correct, n.total.top5_correct, n.total.samples), e.unit.label
        assert e.total.loss_sum == pytest.approx(n.total.loss_sum, rel=1e-6, abs=0), e.unit.label


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_equals_naive_on_every_family(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    batches = batches_for()
    units = spread(select_units(model, "channel"), 5)
    units += spread(select_units(model, "activation", example_input=batches[0][0]), 3)
    if family in ("vit", "swin", "maxvit"):
        units += spread(select_units(model, "head"), 3)
    assert_exact_equals_naive(model, units, batches)


def test_grouped_and_depthwise_conv_channels_are_recomputed_from_their_group():
    torch.manual_seed(0)
    model = FAMILIES["regnet"]().eval()
    grouped = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped
    depthwise = FAMILIES["mobilenet_v3"]().eval()
    dw = [name for name, m in depthwise.named_modules()
          if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1]
    for net, names in ((model, grouped[:2]), (depthwise, dw[:1])):
        units = []
        for name in names:
            units += spread(select_units(net, "channel", include=[rf"^{name}\.weight$"]), 3)
        # add, not zero: a zeroed filter would not show a wrong input slice
        assert_exact_equals_naive(net, units, batches_for(1), Perturbation("add", 0.5))


def test_vit_b_16_has_144_heads_and_token_activations_use_the_last_dimension():
    with torch.device("meta"):  # the layout is all select_units reads; no need to initialise 86 M weights
        model = torchvision.models.vit_b_16()
    heads = select_units(model, "head")
    assert len(heads) == 144 and heads[0] == Unit("head", "encoder.layers.encoder_layer_0.self_attention", 0)
    linear_channels = select_units(model, "channel", include=[r"out_proj\.weight"],
                                   module_types=["NonDynamicallyQuantizableLinear"])
    assert len(linear_channels) == 12 * 768
    assert activation_channel_dim(nn.GELU(), torch.zeros(2, 197, 768)) == 2
    assert activation_channel_dim(nn.Conv1d(3, 4, 1), torch.zeros(2, 4, 7)) == 1
    assert activation_channel_dim(nn.ReLU(), torch.zeros(2, 4, 7, 7)) == 1


def masked_attention(module: nn.MultiheadAttention, x: torch.Tensor, head: int | None) -> torch.Tensor:
    """Multi-head self-attention written out by hand (batch first), with head ``head``'s output set to zero."""
    batch, tokens, width = x.shape
    heads = module.num_heads
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-2, -1) / math.sqrt(width // heads)).softmax(dim=-1)
    out = weights @ v
    if head is not None:
        out[:, head] = 0.0
    return F.linear(out.transpose(1, 2).reshape(batch, tokens, width), module.out_proj.weight, module.out_proj.bias)


def reference_with_head_masked(model, attention_name, head, batches):
    module = model.get_submodule(attention_name)

    def hook(_module, inputs, _output):
        return masked_attention(module, inputs[0], head), None

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return [model(x) for x, _ in batches]
    finally:
        handle.remove()


def test_head_scores_equal_masking_the_head_inside_the_attention():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    batches = batches_for(2)
    attention = "encoder.layers.encoder_layer_1.self_attention"
    with torch.no_grad():
        plain = [model(x) for x, _ in batches]
    # the hand-written attention is the model's own when no head is masked
    for ours, theirs in zip(reference_with_head_masked(model, attention, None, batches), plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    units = select_units(model, "head", include=[attention])
    outcomes = evaluate_units(model, units, Perturbation("zero"), EvaluationSet.from_batches(batches))
    for unit, outcome in zip(units, outcomes):
        logits = torch.cat(reference_with_head_masked(model, attention, unit.index, batches))
        targets = torch.cat([y for _, y in batches])
        loss = F.cross_entropy(logits, targets, reduction="sum").item()
        assert outcome.total.top1_correct == int((logits.argmax(1) == targets).sum()), unit.label
        assert outcome.total.loss_sum == pytest.approx(loss, rel=1e-5), unit.label
        assert outcome.total.loss_sum != pytest.approx(sum(
            F.cross_entropy(p, y, reduction="sum").item() for p, (_, y) in zip(plain, batches)), rel=1e-6)


def test_head_perturbation_is_restored_bit_for_bit_also_on_error():
    model = tiny_vit()
    unit = Unit("head", "encoder.layers.encoder_layer_0.self_attention", 2)
    weight = model.get_submodule(unit.name).out_proj.weight
    with torch.no_grad():
        weight[0, 8] = -0.0  # a signed zero inside the head's block must come back as -0.0
    before = state_checksum(model)
    with pytest.raises(RuntimeError, match="boom"):
        with perturbed(model, unit, Perturbation("noise", 1.0)):
            assert not torch.equal(weight[:, 8:12], model.get_submodule(unit.name).out_proj.weight[:, 8:12] * 0)
            raise RuntimeError("boom")
    assert state_checksum(model) == before
    with perturbed(model, unit, Perturbation("zero")):
        assert torch.count_nonzero(weight[:, 8:12]) == 0 and torch.count_nonzero(weight[:, :8]) > 0
    assert state_checksum(model) == before


def test_head_units_name_what_is_wrong():
    model = tiny_vit()
    with pytest.raises(ValueError, match="head index out of range for 4 heads"):
        with perturbed(model, Unit("head", "encoder.layers.encoder_layer_0.self_attention", 4), Perturbation("zero")):
            pass
    with pytest.raises(ValueError, match="no attention module named 'heads'"):
        with perturbed(model, Unit("head", "heads", 0), Perturbation("zero")):
            pass


def test_prune_sweep_on_a_vit_prunes_the_attention_output_projection():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    batches = batches_for(3)
    masks = dwp_masks(model, "connections", p_prune=0.3, include_linear=True)
    assert any(name.endswith("self_attention.out_proj") for name in masks.masks)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.masks.items():
            reference.get_submodule(name).weight.mul_(mask)
    before = state_checksum(model)
    with pruned(model, masks):
        swept = evaluate(model, batches)
    expected = evaluate(reference, batches)
    assert (swept.top1_correct, swept.samples) == (expected.top1_correct, expected.samples)
    assert swept.loss_sum == pytest.approx(expected.loss_sum, rel=1e-6)
    assert state_checksum(model) == before


def test_untraceable_units_fall_back_with_one_warning_that_counts_them():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, groups=1)
            self.linear = nn.Linear(4, CLASSES)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                h = h * 2
            return self.linear(h)

    model = Branchy().eval()
    units = select_units(model, "channel")
    with pytest.warns(UserWarning, match=rf"{len(units)} of {len(units)} units evaluated with full forward passes: "
                                         r"torch.fx cannot trace Branchy") as record:
        evaluate_units(model, units, Perturbation("zero"), EvaluationSet.from_batches(batches_for(4, 1, 8)))
    assert sum("full forward passes" in str(w.message) for w in record) == 1


class SequenceFirstAttention(nn.Module):
    """A user's network with a sequence-first ``nn.MultiheadAttention`` (batch_first=False) over 4×4 patches."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attention = nn.MultiheadAttention(8, 2)
        self.classifier = nn.Linear(8, CLASSES)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)  # (tokens, batch, channels)
        out, _ = self.attention(tokens, tokens, tokens)  # need_weights: the module returns weights beside it
        return self.classifier(out.mean(0))


def attention_units(model: nn.Module) -> list[Unit]:
    """Heads, Linear output channels inside the blocks and inside the first attention module (qkv, Swin V2's
    position-bias MLP), and the output projection's weight, rows and bias."""
    heads = select_units(model, "head")
    linear = select_units(model, "channel", module_types=["Linear"])
    units = spread(heads, 3) + spread(linear, 3)
    attentions = sorted({u.name for u in heads})
    units += spread([u for u in linear if u.name.startswith(f"{attentions[0]}.") and u not in units], 4)
    for name in attentions[:2]:
        child = attention_heads(model.get_submodule(name))[0]
        units += [Unit("tensor", f"{name}.{child}.weight"), Unit("tensor", f"{name}.{child}.bias"),
                  Unit("channel", f"{name}.{child}.weight", 1)]
    return list(dict.fromkeys(units))


def timm_vit() -> nn.Module:
    """A two-block timm ViT (its Attention calls qkv and proj as modules); skips the test without timm."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                              num_classes=CLASSES)
    nn.init.normal_(model.head.weight)  # timm starts the classifier at zero
    return model


def swin_v2() -> nn.Module:
    """A tiny Swin V2: its attention adds a position bias from an MLP run on a table shared by all images."""
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformerBlockV2,
    )

    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                           num_classes=CLASSES, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)


@pytest.mark.parametrize("family", ["vit", "swin", "swin_v2", "maxvit", "sequence_first", "timm_vit"])
def test_taylor_terms_of_attention_units_are_each_images_loss_derivative(family):
    """Per image, the first-order term of scaling a unit by 1 + ε is the central difference of that image's loss
    (float64, so the difference is exact to ~ε²); the Taylor estimates are its mean and, at order 2, add the mean
    of half its square. nn.MultiheadAttention and Swin never call their output projection as a module; timm does."""
    from critnet.engine.taylor_terms import per_sample_estimates, taylor_estimates

    torch.manual_seed(0)
    build = {"sequence_first": SequenceFirstAttention, "timm_vit": timm_vit, "swin_v2": swin_v2}.get(family) or \
        FAMILIES[family]
    model = build().eval().double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # torch starts attention biases at zero: scaling them would change nothing
                parameter.normal_(0.0, 0.1)
    batches = [(x.double(), y) for x, y in batches_for(2)]
    data = as_evaluation_set(batches)
    units = attention_units(model)
    eps = 1e-4
    up, down = Perturbation("scale", 1 + eps), Perturbation("scale", 1 - eps)
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])

    def losses(unit, perturbation):
        with torch.no_grad(), perturbed(model, unit, perturbation):
            return F.cross_entropy(model(x), y, reduction="none")

    reference = torch.stack([(losses(u, up) - losses(u, down)) / 2 for u in units])
    # nearly every unit moves some image's loss (a row of an MLP behind a ReLU may be dead)
    assert (reference.abs().amax(1) > 0).double().mean() > 0.8
    ours = per_sample_estimates(model, units, up, data)
    first = taylor_estimates(model, units, up, data, order=1)
    second = taylor_estimates(model, units, up, data, order=2)
    # the central difference is exact to ~ε² relative, and to the rounding of the float64 losses it subtracts
    rounding = 4 * torch.finfo(torch.float64).eps * F.cross_entropy(model(x), y, reduction="none").max().item()
    for unit, mine, theirs, a, b in zip(units, ours, reference, first, second):
        tolerance = 1e-6 * theirs.abs().max().item() + rounding
        assert (mine - theirs).abs().max().item() <= tolerance, unit.label
        assert a == pytest.approx(theirs.mean().item(), abs=tolerance), unit.label
        # ½·mean(d²) from a reference d off by at most the tolerance
        fisher_tolerance = theirs.abs().max().item() * tolerance + tolerance ** 2
        assert b - a == pytest.approx(0.5 * theirs.square().mean().item(), rel=1e-5, abs=fisher_tolerance), unit.label


class ScaledAttention(nn.Module):
    """Self-attention that reads its projection's weight functionally and scales the result afterwards: its output
    is not the projection's output (an identity projection would give the scaled heads, and a bias unit's change
    would be missed by the scale)."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        z = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
        return 3.0 * F.linear(z, self.proj.weight, self.proj.bias)


@pytest.mark.parametrize("zero", [False, True])
def test_taylor_terms_refuse_heads_whose_attention_output_is_not_the_projection(zero):
    """With a zero projection both sides of the check are zero; a random projection then shows the scaling."""
    from critnet.engine.taylor_terms import per_sample_estimates

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(2), Transpose(), ScaledAttention(), nn.Flatten(1), nn.Linear(8 * 16, CLASSES))
    if zero:
        nn.init.zeros_(model[2].proj.weight)
        nn.init.zeros_(model[2].proj.bias)
    x = torch.randn(4, 8, 4, 4)
    data = as_evaluation_set([(x, torch.arange(4) % CLASSES)])
    with pytest.raises(ValueError, match="is not its 'proj' projection's output"):
        per_sample_estimates(model, [Unit("head", "2", 1)], Perturbation("zero"), data)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_halving_and_hybrid_rank_heads_with_taylor_terms(monkeypatch):
    import critnet
    from critnet.engine import certify

    monkeypatch.setattr(certify, "FIRST_STAGE", 8)  # stages of 8, 16 and 32 images
    torch.manual_seed(0)
    model = tiny_vit().eval()
    data = batches_for(3, count=8)
    exact = critnet.rank(model, data, unit="head", perturbation="zero", score="delta_loss")
    hybrid = critnet.rank(model, data, unit="head", perturbation="zero", score="delta_loss", method="hybrid",
                          top_k=4)
    # two rounds of 4 check all 8 heads with the exact method's code on the same batches: the same numbers
    assert [r["unit"] for r in hybrid.top(2)] == [r["unit"] for r in exact.top(2)]
    halving = critnet.rank(model, data, unit="head", perturbation="zero", score="delta_loss", method="halving",
                           top_k=2, bound="normal")  # the Taylor control variate belongs to the normal bound
    assert halving.levels[0].top_k_test["control_variate"] == "first-order Taylor per image"
    # halving evaluates its stages in other batches: its top 2 are the exact top 2 up to float32 rounding of the
    # losses at the boundary (bit for bit only where the kernels do not depend on the batch size)
    exact_rows = {r["unit"]: r for r in exact.rows}
    second = exact.top(2)[-1]["score"]
    for row in halving.top(2):
        assert exact_rows[row["unit"]]["score"] >= second - KERNEL_REL * exact_rows[row["unit"]]["loss"], row["unit"]


def test_activation_units_leave_out_modules_the_model_never_calls():
    """Swin's attention reads its qkv and proj weights functionally: those Linear modules are never called, so an
    activation unit on them would never change anything. With an example input the selection keeps exactly the
    modules a forward pass calls, and says how many it left out."""
    torch.manual_seed(0)
    model = FAMILIES["swin"]().eval()
    x = batches_for()[0][0]
    called = set()
    handles = [m.register_forward_hook(lambda module, *_: called.add(module)) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    linear = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    never = [name for name in linear if model.get_submodule(name) not in called]
    assert never and all(re.search(r"attn\.(qkv|proj)$", name) for name in never)
    with pytest.warns(UserWarning, match=f"{len(never)} selected modules are never called"):
        units = select_units(model, "activation", example_input=x)
    assert sorted({u.name for u in units}) == sorted(set(linear) - set(never))
    with pytest.raises(ValueError, match="never called"):
        select_units(model, "activation", include=[r"attn\.qkv$"], example_input=x)
