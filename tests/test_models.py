import pytest
import torch
import torch.fx
from torch import nn

from critnet.errors import CritnetError
from critnet.models import build_model, get_model_spec, list_models, register_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_resnet():
    assert set(list_models()) >= {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                  "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20", family="cifar", default_num_classes=10, input_size=32)(lambda num_classes: None)
    with pytest.raises(CritnetError, match="unknown model 'resnet21'.*resnet20"):
        build_model("resnet21")


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                            ("resnet56", 0.85), ("resnet110", 1.73)])
def test_cifar_resnet_parameter_counts_and_shapes(name, millions):
    model = build_model(name).eval()
    assert round(n_params(model) / 1e6, 2) == pytest.approx(millions, abs=0.011)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet20_has_698_output_channels_and_traces_with_fx():
    model = build_model("resnet20")
    channels = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert channels == 698
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(traced.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name, millions", [("resnet18", 11.69), ("resnet50", 25.56)])
def test_torchvision_resnets(name, millions):
    model = build_model(name, num_classes=1000).eval()
    assert n_params(model) / 1e6 == pytest.approx(millions, abs=0.01)
    assert get_model_spec(name).family == "imagenet"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
    assert build_model(name, num_classes=7).fc.out_features == 7


# --- every torchvision classifier, timm, user networks, weights by name (issue #11) ---

import json  # noqa: E402
import sys  # noqa: E402

import torchvision  # noqa: E402

from conftest import PRESETS  # noqa: E402
from critnet.models import load_model  # noqa: E402
from critnet.models.checkpoints import CheckpointError, torchvision_weights  # noqa: E402
from critnet.models.preprocessing import preprocessing  # noqa: E402
from critnet.selection import select_units  # noqa: E402


def test_every_torchvision_classifier_is_registered_with_its_input_size():
    names = set(list_models(include_timm=False))
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    assert {"resnet20", "resnet110"} <= names
    assert (get_model_spec("vit_b_16").input_size, get_model_spec("vit_b_16").smallest_input) == (224, 224)
    assert (get_model_spec("swin_v2_t").input_size, get_model_spec("swin_v2_t").smallest_input) == (256, 256)
    assert get_model_spec("mobilenet_v2").smallest_input == 32
    assert get_model_spec("inception_v3").smallest_input == 75 and get_model_spec("resnet20").smallest_input == 32


def test_vits_without_weights_are_built_for_their_registered_input_size():
    """ViT-H/14's default weights are at 518 while its builder defaults to 224: a randomly initialised ViT must
    accept the input size its spec (and so the data transforms) give it. Built on the meta device: no memory."""
    for name in [n for n in list_models(include_timm=False) if n.startswith("vit_")]:
        with torch.device("meta"):
            model = get_model_spec(name).factory(num_classes=10)
        assert model.image_size == get_model_spec(name).smallest_input, name
    assert get_model_spec("vit_h_14").input_size == 518


def test_a_torchvision_classifier_by_name_runs_at_its_smallest_input():
    model = load_model("mobilenet_v3_small", num_classes=3)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert not model.training and model.critnet_weights is None


def test_torchvision_weight_names_resolve_per_model():
    assert torchvision_weights("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    assert torchvision_weights("resnet50", "IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert torchvision_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2").name == "IMAGENET1K_V2"
    assert torchvision_weights("resnet50", "MobileNet_V2_Weights.IMAGENET1K_V2") is None
    assert torchvision_weights("vit_b_16", "IMAGENET1K_SWAG_E2E_V1").meta["min_size"] == (384, 384)
    with pytest.raises(CheckpointError, match="for mobilenet_v2: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        load_model("mobilenet_v2", weights="IMAGENET1K_V9")


def test_offline_download_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRITNET_CHECKPOINT_DIR", str(tmp_path / "ckpts"))

    def offline(url, dst, progress=True):
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = torchvision_weights("mobilenet_v3_small", "DEFAULT").url
    with pytest.raises(CheckpointError) as err:
        load_model("mobilenet_v3_small", weights="DEFAULT")
    message = str(err.value)
    assert "\n" not in message and url in message
    assert str((tmp_path / "ckpts" / url.rsplit("/", 1)[-1]).resolve()) in message
    assert not list((tmp_path / "ckpts").glob("*.partial"))
    from test_data import make_image_folder

    from critnet.cli import main

    make_image_folder(tmp_path / "tree", "val", 2, 1)
    with pytest.raises(SystemExit):
        main(["validate", "--model.arch", "mobilenet_v3_small", "--model.weights", "DEFAULT",
              "--data.root", str(tmp_path / "tree")])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert url in line


def test_a_cached_torchvision_file_is_hash_checked_and_old_densenet_keys_load(tmp_path, monkeypatch):
    monkeypatch.setenv("CRITNET_CHECKPOINT_DIR", str(tmp_path))
    weights = torchvision_weights("densenet121", "DEFAULT")
    source = torchvision.models.densenet121()
    # the published file spells the dense layers' keys the old way ("norm.1" for "norm1")
    state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in source.state_dict().items()}
    cached = tmp_path / weights.url.rsplit("/", 1)[-1]
    torch.save(state, cached)
    with pytest.raises(CheckpointError, match="does not match the published"):  # not the published bytes
        load_model("densenet121", weights="DEFAULT")
    model = load_model("densenet121", weights=str(cached))
    assert torch.equal(model.features.denseblock1.denselayer1.norm1.weight,
                       source.features.denseblock1.denselayer1.norm1.weight)


def test_timm_names_need_the_extra(monkeypatch):
    from critnet.models.timm_models import timm_spec

    timm_spec.cache_clear()
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(CritnetError, match=r"pip install critnet\[timm\]"):
        load_model("timm/vit_tiny_patch16_224")
    assert not any(name.startswith("timm/") for name in list_models())


def test_timm_models_by_name_with_heads():
    pytest.importorskip("timm")
    from critnet.models.timm_models import timm_spec

    timm_spec.cache_clear()
    assert "timm/resnet18" in list_models()
    model = load_model("timm/vit_tiny_patch16_224", num_classes=4)
    assert get_model_spec("timm/vit_tiny_patch16_224").smallest_input == 224
    assert len(select_units(model, "head")) == 12 * 3
    with pytest.raises(CritnetError, match="unknown model 'timm/no_such_net'"):
        get_model_spec("timm/no_such_net")


def test_timm_pretrained_offline_is_one_line_naming_the_source(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*args, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CritnetError) as err:
        load_model("timm/vit_tiny_patch16_224", weights="augreg_in21k_ft_in1k")
    message = str(err.value)
    assert "\n" not in message and "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in message
    with pytest.raises(CritnetError, match="neither a file nor a timm pretrained tag of vit_tiny_patch16_224"):
        load_model("timm/vit_tiny_patch16_224", weights="no_such_tag")


def test_timm_vit_heads_exact_equals_naive():
    timm = pytest.importorskip("timm")
    from test_architectures import assert_exact_equals_naive, batches_for

    torch.manual_seed(0)
    # timm's forward takes optional arguments (attn_mask, is_causal): traced at their defaults
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, depth=2).eval()
    nn.init.normal_(model.head.weight)  # timm starts the classifier at zero: all top-1 would be ties
    units = select_units(model, "head") + select_units(model, "channel", include=[r"blocks\.1\.mlp\.fc1"])[:3]
    assert_exact_equals_naive(model, units, batches_for())


def test_preprocessing_follows_the_weights():
    assert (preprocessing("efficientnet_b3").resize_size, preprocessing("efficientnet_b3").crop_size) == (320, 300)
    swag = preprocessing("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")
    assert (swag.crop_size, swag.interpolation) == (384, "bicubic")
    assert preprocessing("resnet18", "IMAGENET1K_V1").with_sizes(crop_size=64).resize_size == 73


def test_list_models_flag_prints_every_name(capsys):
    from critnet.cli import main

    assert main(["--list-models"]) is None
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("mobilenet_v2\t") for line in out) and any(line.startswith("resnet20\t") for line in out)


def test_a_user_network_or_an_arch_not_both():
    from critnet.module import ClassifierModule

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
    module = ClassifierModule(network=net)
    assert module.num_classes == 6 and module.arch == "Sequential" and module.model is net
    with pytest.raises(CritnetError, match="--model.network and --model.arch 'resnet56'"):
        ClassifierModule(arch="resnet56", network=net)


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    from test_data import make_image_folder

    root = tmp_path_factory.mktemp("tree")
    make_image_folder(root, "val", 3, 2, size=(40, 48))
    return root


def quiet(out):
    return ["--data.num_workers", "0", "--data.batch_size", "3", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out)]


def test_validate_any_torchvision_classifier_with_a_preset_on_an_image_folder(tiny_tree, tmp_path):
    from critnet.cli import main

    main(["validate", "--model.arch", "mobilenet_v3_small", "--model.weights", "null",
          "-c", str(PRESETS / "prune_neurons.yaml"), "--data.root", str(tiny_tree), "--data.image_size", "32",
          *quiet(tmp_path)])
    (run,) = tmp_path.glob("lightning_logs/version_*")
    record = json.loads((run / "metrics.json").read_text())
    assert record["samples"] == 6 and record["model"] == "mobilenet_v3_small"
    sweep = json.loads((run / "prune_sweep.json").read_text())
    assert len(sweep["settings"]) == 5 and sweep["weights_restored_bit_identical"] and sweep["network"] == record["model"]


def test_rank_heads_of_a_user_network_through_the_cli(tiny_tree, tmp_path):
    from critnet.cli import main

    main(["validate", "--model.network", "torchvision.models.VisionTransformer",
          "--model.network.image_size", "16", "--model.network.patch_size", "8", "--model.network.num_layers", "1",
          "--model.network.num_heads", "2", "--model.network.hidden_dim", "8", "--model.network.mlp_dim", "8",
          "--model.network.num_classes", "3", "-c", str(PRESETS / "rank_heads.yaml"),
          "--data.root", str(tiny_tree), "--data.image_size", "16", *quiet(tmp_path)])
    import csv

    (ranking,) = tmp_path.glob("lightning_logs/version_*/ranking.csv")
    units = [row["unit"] for row in csv.DictReader(ranking.open())]
    assert sorted(units) == ["encoder.layers.encoder_layer_0.self_attention[0]",
                             "encoder.layers.encoder_layer_0.self_attention[1]"]


@pytest.mark.parametrize("flags, message", [
    (["--model.arch", "mobilenetv2"], "error: unknown model 'mobilenetv2' (--model.arch)"),
    (["--model.arch", "mobilenet_v2", "--data.root", "/nonexistent/tree"],
     "error: --data.root: /nonexistent/tree does not exist"),
    (["--model.arch", "resnet56", "--model.network", "torch.nn.Identity"],
     "error: --model.network and --model.arch 'resnet56': give one of them, not both"),
])
def test_bad_model_or_data_is_one_line_also_through_the_default_data_module(tiny_tree, tmp_path, capsys, flags,
                                                                            message):
    from critnet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--data.root", str(tiny_tree), *flags, *quiet(tmp_path)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message)


def test_weights_that_fix_the_input_size_shape_the_model():
    from critnet.models.torchvision_models import image_size_kwargs

    swag = torchvision_weights("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")
    assert image_size_kwargs("vit_b_16", swag) == {"image_size": 384}
    with torch.device("meta"):
        assert get_model_spec("vit_b_16").factory(num_classes=1000, weights=swag).image_size == 384
