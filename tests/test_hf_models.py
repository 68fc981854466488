"""Hugging Face transformers image classifiers as the ``hf/<name>`` model family: tiny random models of each family
(ViT, DeiT, BEiT, Swin, ConvNeXt) written by ``save_pretrained`` and loaded back by name; exact = naive on their
units, heads against masking the head's output before the projection, weights, preprocessing, and the transformers
4.x attention layout. Skipped without transformers, but for the line that says how to install it."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import critnet
from conftest import F32_REL, f32_close
from critnet.digests import state_digest
from critnet.evaluation_set import EvaluationSet
from critnet.engine import evaluate_units
from critnet.errors import CritnetError
from critnet.models import get_model_spec, list_models, load_model
from critnet.models.checkpoints import sha256_of
from critnet.models.preprocessing import preprocessing
from critnet.models.spec import Preprocessing
from critnet.perturb import Perturbation, Unit, attention_heads, perturbed
from critnet.selection import select_units

CLASSES = 5
SIZE = 32
ATTENTION_FAMILIES = ("vit", "deit", "beit", "swin")


def tiny_models(transformers) -> dict[str, nn.Module]:
    """One two-stage or two-layer member of each family, hidden width 32 or less, 32×32 inputs."""
    vit_like = dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=CLASSES)
    return {
        "vit": transformers.ViTForImageClassification(transformers.ViTConfig(**vit_like)),
        "deit": transformers.DeiTForImageClassification(transformers.DeiTConfig(**vit_like)),
        "beit": transformers.BeitForImageClassification(
            transformers.BeitConfig(**vit_like, use_relative_position_bias=True)),
        "swin": transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
            num_labels=CLASSES)),
        "convnext": transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            image_size=SIZE, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=CLASSES)),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """``family -> (hf/<directory>, state dict)`` of each tiny model written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for family, model in tiny_models(transformers).items():
        model.save_pretrained(root / family)
        out[family] = (f"hf/{root / family}", {k: v.clone() for k, v in model.state_dict().items()})
    return out


def batches(count: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, SIZE, SIZE, generator=generator), torch.randint(0, CLASSES, (4,), generator=generator))
            for _ in range(count)]


def spread(units: list[Unit], count: int) -> list[Unit]:
    if len(units) <= count:
        return units
    return [units[round(i * (len(units) - 1) / (count - 1))] for i in range(count)]


def test_hf_names_need_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    with pytest.raises(CritnetError, match=r"pip install critnet\[transformers\]") as error:
        load_model("hf/google/vit-base-patch16-224")
    assert "\n" not in str(error.value)
    assert not any(name.startswith("hf/") for name in list_models())


def test_a_directory_a_known_id_and_a_model_type_by_name(saved):
    arch, _ = saved["vit"]
    spec = get_model_spec(arch)
    assert (spec.family, spec.default_num_classes, spec.input_size, spec.smallest_input) == ("hf", CLASSES, SIZE, SIZE)
    assert get_model_spec(saved["convnext"][0]).smallest_input == 32
    model = load_model(arch, num_classes=3)
    assert type(model).__name__ == "ViTForImageClassification" and not model.training
    assert model.classifier.out_features == 3 and model.critnet_weights is None
    # published architectures build offline: ViT-B/16's 144 heads and 86.6 M parameters, Swin-T's 138 heads
    with torch.device("meta"):
        vit_b = get_model_spec("hf/google/vit-base-patch16-224").factory()
        swin_t = get_model_spec("hf/microsoft/swin-tiny-patch4-window7-224").factory()
    assert len(select_units(vit_b, "head")) == 144 and sum(p.numel() for p in vit_b.parameters()) == 86_567_656
    assert len(select_units(swin_t, "head")) == 138
    assert "hf/google/vit-base-patch16-224" in list_models()
    spec = get_model_spec("hf/beit")  # a model type: its default configuration, 1000 classes
    assert (spec.family, spec.default_num_classes, spec.input_size) == ("hf", 1000, 224)
    with pytest.raises(CritnetError, match=r"unknown model 'hf/no/such-model' \(--model.arch\).*known id") as error:
        get_model_spec("hf/no/such-model")
    assert "\n" not in str(error.value)


def test_pretrained_weights_come_from_the_directory_bit_for_bit(saved, tmp_path):
    arch, state = saved["vit"]
    model = load_model(arch, weights="pretrained")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and not model.training
    info = model.critnet_weights
    assert info.path.endswith("model.safetensors") and info.sha256 == sha256_of(info.path)
    # a state-dict file goes through critnet's own strict loader
    torch.save(state, tmp_path / "vit.pth")
    again = load_model(arch, weights=str(tmp_path / "vit.pth"))
    assert state_digest(again) == state_digest(model)
    for weights, name, message in [
        ("pretrained", arch, "trained with 5 classes, not 3"),
        ("IMAGENET1K_V1", arch, "neither a file nor 'pretrained'"),
        ("pretrained", "hf/vit", "default configuration of the model type 'vit', which has no weights"),
        ("pretrained", "hf/google/vit-base-patch16-224", "not in the local Hugging Face cache"),
    ]:
        with pytest.raises(CritnetError, match=message) as error:
            load_model(name, weights=weights, num_classes=3 if name == arch else None)
        assert "\n" not in str(error.value)
    # a checkpoint whose config asks for a third layer that its weights do not have
    deeper = tmp_path / "deeper"
    shutil.copytree(arch[len("hf/"):], deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CritnetError, match="does not fit ViTForImageClassification: missing keys: vit.layers.2"):
        load_model(f"hf/{deeper}", weights="pretrained")


def test_a_hub_id_in_the_local_cache_has_its_config_and_weights_from_there(saved, tmp_path, monkeypatch):
    """A cached hub model (the cache's layout: refs/main names the snapshot holding the files) is read from the
    cache and nothing else; an id that is not cached and not known is unknown."""
    import huggingface_hub.constants

    arch, state = saved["deit"]
    repo = tmp_path / "hub" / "models--someone--tiny-deit"
    shutil.copytree(arch[len("hf/"):], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = get_model_spec("hf/someone/tiny-deit")
    assert (spec.default_num_classes, spec.input_size) == (CLASSES, SIZE)
    model = load_model("hf/someone/tiny-deit", weights="pretrained")
    assert type(model).__name__ == "DeiTForImageClassification"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.critnet_weights.path.startswith(str(repo)) and model.critnet_weights.sha256
    with pytest.raises(CritnetError, match="unknown model 'hf/someone/other-deit'"):
        get_model_spec("hf/someone/other-deit")


@pytest.mark.parametrize("family", ["vit", "deit", "beit", "swin", "convnext"])
def test_exact_equals_naive_and_evaluate_reads_the_logits(saved, family):
    model = load_model(saved[family][0])
    data = batches()
    units = spread(select_units(model, "channel"), 4)
    units += spread(select_units(model, "activation", example_input=data[0][0]), 3)
    if family in ATTENTION_FAMILIES:
        units += spread(select_units(model, "head"), 3)
    before = state_digest(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = evaluate_units(model, units, Perturbation("zero"), EvaluationSet.from_batches(data), method="exact")
    # torch.fx cannot trace transformers' models (control flow on shapes and dtypes): full passes, said once
    assert all("full forward passes: torch.fx cannot trace" in str(w.message) for w in caught
               if "exact engine" in str(w.message))
    naive = evaluate_units(model, units, Perturbation("zero"), EvaluationSet.from_batches(data), method="naive")
    for e, n in zip(exact, naive):
        assert (e.unit, e.total.top1_correct, e.total.top5_correct) == (n.unit, n.total.top1_correct,
                                                                         n.total.top5_correct)
        assert f32_close(e.total.loss_sum, n.total.loss_sum), e.unit.label
    result = critnet.evaluate(model, data)
    with torch.no_grad():
        logits = torch.cat([model(x).logits for x, _ in data])
    targets = torch.cat([y for _, y in data])
    assert result["samples"] == 8 and result["top1_correct"] == int((logits.argmax(1) == targets).sum())
    assert f32_close(result["loss"], F.cross_entropy(logits, targets).item())
    assert state_digest(model) == before


@pytest.mark.parametrize("family, heads", [("vit", 8), ("deit", 8), ("beit", 8), ("swin", 6)])
def test_a_head_is_its_block_of_the_projection_after_the_attention(saved, family, heads):
    """Zeroing head h's columns of ``o_proj`` gives the logits of zeroing head h's output before ``o_proj``."""
    model = load_model(saved[family][0])
    units = select_units(model, "head")
    assert len(units) == heads and all(u.name.endswith(".attention") for u in units)
    x = batches(1)[0][0]
    for unit in (units[1], units[-1]):
        child, _, width = attention_heads(model.get_submodule(unit.name))
        assert child == "o_proj"

        def silence(_module, args, h=unit.index):
            z = args[0].clone()
            z[..., h * width:(h + 1) * width] = 0
            return (z,)

        handle = model.get_submodule(f"{unit.name}.{child}").register_forward_pre_hook(silence)
        with torch.no_grad():
            masked = model(x).logits
        handle.remove()
        with torch.no_grad(), perturbed(model, unit, Perturbation("zero")):
            zeroed = model(x).logits
        torch.testing.assert_close(zeroed, masked, rtol=F32_REL, atol=F32_REL * masked.abs().max().item())
        with torch.no_grad():
            assert not torch.allclose(model(x).logits, masked), unit.label  # the head did contribute


@pytest.mark.filterwarnings("ignore:exact engine.*torch.fx cannot trace:UserWarning")
def test_rank_ranks_a_vits_heads_with_exact_equal_to_naive(saved):
    model = load_model(saved["vit"][0])
    data = batches(3)
    exact = critnet.rank(model, data, unit="head", perturbation="zero", score="delta_loss")
    naive = critnet.rank(model, data, unit="head", perturbation="zero", score="delta_loss", method="naive")
    assert len(exact.rows) == 8
    rows = {r["unit"]: r for r in naive.rows}
    for row in exact.rows:
        assert row["top1"] == rows[row["unit"]]["top1"]
        assert f32_close(row["delta_loss"], rows[row["unit"]]["delta_loss"], scale=exact.baseline["loss"])


def test_preprocessing_follows_the_image_processor(saved):
    transformers = pytest.importorskip("transformers")
    vit = saved["vit"][0][len("hf/"):]
    transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, resample=3, image_mean=[0.4, 0.4, 0.4],
                                   image_std=[0.2, 0.2, 0.2]).save_pretrained(vit)
    assert preprocessing(saved["vit"][0]) == Preprocessing(SIZE, SIZE, "bicubic", (0.4,) * 3, (0.2,) * 3)
    # ConvNeXt's processor: below 384 px, resize to shortest_edge / crop_pct and crop shortest_edge
    convnext = saved["convnext"][0][len("hf/"):]
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875,
                                        image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225]).save_pretrained(convnext)
    assert preprocessing(saved["convnext"][0]) == Preprocessing(256, 224, "bicubic")
    # without a processor file: the type's processor class (DeiT: 256 → 224 bicubic), at the model's input size
    deit = preprocessing("hf/facebook/deit-small-patch16-224")
    assert (deit.resize_size, deit.crop_size, deit.interpolation) == (256, 224, "bicubic")
    swin = preprocessing(saved["swin"][0])
    assert (swin.resize_size, swin.crop_size) == (SIZE, SIZE)


# --- transformers 4.x: ViTAttention holds the heads in ``attention`` and the projection in ``output.dense`` ---

class SelfAttention4(nn.Module):
    """transformers 4.x's ViTSelfAttention: the heads, concatenated head by head; no projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, width // heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (self.num_attention_heads, -1)).transpose(1, 2)  # noqa: E731
        z = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return (z.transpose(1, 2).flatten(2),)


class SelfOutput4(nn.Module):
    """transformers 4.x's ViTSelfOutput: the projection after the heads (the residual is added by the layer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.dropout = nn.Dropout(0.0)

    def forward(self, hidden, _input):
        return self.dropout(self.dense(hidden))


class Attention4(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention = SelfAttention4(width, heads)
        self.output = SelfOutput4(width)

    def forward(self, x):
        return (self.output(self.attention(x)[0], x),)


class Vit4(nn.Module):
    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, 8, stride=8)
        self.attention = Attention4(width, heads)
        self.classifier = nn.Linear(width, CLASSES)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return self.classifier((tokens + self.attention(tokens)[0]).mean(1))


def test_transformers_4_attention_containers_hold_the_heads():
    torch.manual_seed(0)
    model = Vit4().eval()
    assert attention_heads(model.attention) == ("output.dense", 4, 4)
    assert attention_heads(model.attention.attention) is None  # the heads alone have no projection
    units = select_units(model, "head")
    assert [u.label for u in units] == [f"attention[{h}]" for h in range(4)]
    x = batches(1)[0][0]
    with torch.no_grad(), perturbed(model, units[2], Perturbation("zero")):
        assert torch.count_nonzero(model.attention.output.dense.weight[:, 8:12]) == 0
        zeroed = model(x)

    def silence(_module, args):
        z = args[0].clone()
        z[..., 8:12] = 0
        return (z,)

    handle = model.attention.output.dense.register_forward_pre_hook(silence)
    with torch.no_grad():
        masked = model(x)
    handle.remove()
    torch.testing.assert_close(zeroed, masked, rtol=F32_REL, atol=F32_REL * masked.abs().max().item())
    # this one traces: the exact engine cuts at the container's call
    data = EvaluationSet.from_batches(batches())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = evaluate_units(model, units, Perturbation("zero"), data, method="exact")
    naive = evaluate_units(model, units, Perturbation("zero"), data, method="naive")
    for e, n in zip(exact, naive):
        assert e.total.top1_correct == n.total.top1_correct and f32_close(e.total.loss_sum, n.total.loss_sum)


def test_taylor_terms_of_a_vits_heads_and_projections_are_each_images_loss_derivative(saved):
    """Per image, the first-order term of scaling a unit by 1 + ε is the central difference of that image's loss
    (float64): heads, the q/k/v and o_proj channels, and o_proj's weight and bias."""
    from critnet.engine.taylor_terms import per_sample_estimates
    from critnet.evaluation_set import as_evaluation_set

    model = load_model(saved["vit"][0]).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # transformers starts biases at zero: scaling them would change nothing
                parameter.normal_(0.0, 0.1)
    attention = "vit.layers.1.attention"
    units = select_units(model, "head", include=[attention])[::2]
    units += [Unit("channel", f"{attention}.{p}.weight", 3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    units += [Unit("tensor", f"{attention}.o_proj.weight"), Unit("tensor", f"{attention}.o_proj.bias")]
    data = [(x.double(), y) for x, y in batches()]
    x, y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    eps = 1e-4

    def losses(unit, factor):
        with torch.no_grad(), perturbed(model, unit, Perturbation("scale", factor)):
            return F.cross_entropy(model(x).logits, y, reduction="none")

    reference = torch.stack([(losses(u, 1 + eps) - losses(u, 1 - eps)) / 2 for u in units])
    assert bool((reference.abs().amax(1) > 0).all())
    ours = per_sample_estimates(model, units, Perturbation("scale", 1 + eps), as_evaluation_set(data))
    rounding = 4 * torch.finfo(torch.float64).eps * losses(units[0], 1.0).max().item()
    for unit, mine, theirs in zip(units, ours, reference):
        assert (mine - theirs).abs().max().item() <= 1e-6 * theirs.abs().max().item() + rounding, unit.label


def test_taylor_terms_of_transformers_4_heads_and_the_refusal_on_windows(saved):
    """A 4.x container's heads (projection ``output.dense``) get each image's loss derivative; Swin's attention
    runs on windows of images, so its units have no per-image terms: one line says so, for its heads and for the
    Linear layers inside it alike (summing rows of windows as if they were images would be silently wrong)."""
    from critnet.engine.taylor_terms import per_sample_estimates
    from critnet.evaluation_set import as_evaluation_set

    torch.manual_seed(0)
    model = Vit4().eval().double()
    data = [(x.double(), y) for x, y in batches()]
    x, y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    units = select_units(model, "head") + [Unit("channel", "attention.attention.query.weight", 1),
                                           Unit("channel", "attention.output.dense.weight", 2)]
    eps = 1e-4

    def losses(unit, factor):
        with torch.no_grad(), perturbed(model, unit, Perturbation("scale", factor)):
            return F.cross_entropy(model(x), y, reduction="none")

    reference = torch.stack([(losses(u, 1 + eps) - losses(u, 1 - eps)) / 2 for u in units])
    ours = per_sample_estimates(model, units, Perturbation("scale", 1 + eps), as_evaluation_set(data))
    rounding = 4 * torch.finfo(torch.float64).eps * losses(units[0], 1.0).max().item()
    for unit, mine, theirs in zip(units, ours, reference):
        assert theirs.abs().max() > 0 and (mine - theirs).abs().max() <= 1e-6 * theirs.abs().max() + rounding, unit

    swin = load_model(saved["swin"][0])
    windows = as_evaluation_set(batches(1))
    attention = "swin.encoder.layers.0.blocks.0.attention"
    for unit in (Unit("head", attention, 1), Unit("channel", f"{attention}.q_proj.weight", 0)):
        with pytest.raises(CritnetError, match=f"module '{attention}' is not called once per image") as error:
            per_sample_estimates(swin, [unit], Perturbation("zero"), windows)
        assert "\n" not in str(error.value)


def test_validate_ranks_the_heads_of_an_hf_model_through_the_command_line(saved, tmp_path):
    """``--model.arch hf/<directory>`` with its weights, preprocessed by its processor, its heads ranked."""
    from test_data import make_image_folder

    from critnet.cli import main

    make_image_folder(tmp_path / "tree", "val", CLASSES, 2, size=(40, 48))
    (tmp_path / "heads.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: critnet.callbacks.CriticalRanking\n"
        "      init_args: {unit: head, perturbation: zero, score: delta_loss}\n")
    arch = saved["vit"][0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "exact engine.*torch.fx cannot trace")
        main(["validate", "--model.arch", arch, "--model.weights", "pretrained", "-c", str(tmp_path / "heads.yaml"),
              "--data.root", str(tmp_path / "tree"), "--data.num_workers", "0", "--data.batch_size", "4",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path / "out")])
    (run,) = (tmp_path / "out").glob("lightning_logs/version_*")
    record = json.loads((run / "metrics.json").read_text())
    assert record["samples"] == 2 * CLASSES and record["model"] == arch
    units = [row["unit"] for row in csv.DictReader((run / "ranking.csv").open())]
    assert sorted(units) == sorted(f"vit.layers.{layer}.attention[{h}]" for layer in range(2) for h in range(4))
