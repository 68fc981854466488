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
