"""Int8 models from float ones (critnet.quantize_int8) and what they cost in accuracy (critnet.compare_accuracy)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_nets import tiny_data, tiny_model
from torch import nn

import critnet
from conftest import CIFAR_ROOT, requires_shared
from critnet.digests import state_digest
from critnet.errors import DataError, ModelInputError
from critnet.models.quantization import BACKENDS

QUANTIZED_LAYERS = (torch.ao.nn.quantized.Conv2d, torch.ao.nn.quantized.Linear)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}


def test_the_float_model_is_left_as_it_was():
    model = tiny_model().train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    digest = state_digest(model)
    int8 = critnet.quantize_int8(model, tiny_data(64, 16))
    assert state_digest(model) == digest
    for name, tensor in model.state_dict().items():  # bit for bit, also the batch norms' running statistics
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), before[name].reshape(-1).view(torch.uint8)), name
    assert model.training and all(m.training for m in model.modules())
    assert not int8.training and not any(m.training for m in int8.modules())
    assert int8 is not model and not set(map(id, int8.modules())) & set(map(id, model.modules()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_and_linear_weights_are_int8_per_output_channel(backend):
    model = tiny_model()
    int8 = critnet.quantize_int8(model, tiny_data(64, 16), backend=backend)
    layers = quantized_layers(int8)
    # the float model's names: conv1 (its batch norm and ReLU fused in), conv2 (its batch norm folded), fc
    assert sorted(layers) == ["conv1", "conv2", "fc"]
    assert type(int8).__name__ == "TinyNetInt8"
    for name, layer in layers.items():
        weight = layer.weight()
        float_weight = dict(model.named_modules())[name].weight
        assert weight.dtype == torch.qint8, name
        assert weight.qscheme() == torch.per_channel_affine, name
        assert weight.q_per_channel_axis() == 0 and len(weight.q_per_channel_scales()) == float_weight.shape[0], name
        assert not weight.q_per_channel_zero_points().any(), name  # symmetric
        assert weight.int_repr().dtype == torch.int8 and weight.int_repr().abs().max() > 64, name
    # no float conv or linear is left behind
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in int8.modules())


def test_int8_logits_are_close_to_the_float_ones():
    model = tiny_model()
    calibration, data = tiny_data(256, 32, seed=3), tiny_data(256, 64, seed=4)
    int8 = critnet.quantize_int8(model, calibration)
    with torch.no_grad():
        for x, _ in data:
            reference, quantized = model(x), int8(x)
            assert quantized.dtype == torch.float32 and quantized.shape == reference.shape
            assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()
    result = critnet.compare_accuracy(model, int8, data)
    assert result["samples"] == 256 and result["agreement"] >= 90
    assert abs(result["int8_top1"] - result["float_top1"]) <= 5


def test_compare_accuracy_counts_top1_top5_and_agreement():
    # the same model twice agrees everywhere; a model that predicts one class agrees where the other does too
    model = tiny_model()
    data = tiny_data(64, 16, seed=5)
    same = critnet.compare_accuracy(model, model, data)
    reference = critnet.evaluate(model, data)
    assert same == {"float_top1": reference["top1"], "int8_top1": reference["top1"], "float_top5": reference["top5"],
                    "int8_top5": reference["top5"], "agreement": 100.0, "samples": 64}

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).expand(len(x), 5)

    with torch.no_grad():
        predicted = torch.cat([model(x).argmax(1) for x, _ in data])
        labels = torch.cat([y for _, y in data])
    result = critnet.compare_accuracy(model, Constant(), data)
    assert result["agreement"] == pytest.approx(100 * float((predicted == 2).float().mean()))
    assert result["int8_top1"] == pytest.approx(100 * float((labels == 2).float().mean()))
    assert model.training is False


def test_calibration_takes_tensors_pairs_and_loaders_and_stops_after_batches():
    model = tiny_model()
    batches = tiny_data(64, 16)
    read = []

    def stream():
        for position, batch in enumerate(batches):
            read.append(position)
            yield batch

    reference = critnet.quantize_int8(model, batches[:2])
    stopped = critnet.quantize_int8(model, stream(), batches=2)
    assert read == [0, 1]  # the third batch is never read
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(stopped(x), reference(x))
        # the inputs alone, and one (inputs, targets) pair, calibrate the same as batches of them
        alone = critnet.quantize_int8(model, [b[0] for b in batches[:2]])
        assert torch.equal(alone(x), reference(x))
        inputs = torch.cat([b[0] for b in batches[:2]])
        pair = critnet.quantize_int8(model, (inputs, torch.zeros(len(inputs), dtype=torch.long)))
        assert torch.equal(pair(x), critnet.quantize_int8(model, inputs)(x))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, torch.zeros(32)), batch_size=16)
        assert torch.equal(critnet.quantize_int8(model, loader)(x), reference(x))


def test_only_torch_ao_deprecations_are_silenced():
    class Noisy(nn.Sequential):
        def forward(self, x):
            warnings.warn("the model's own warning", UserWarning, stacklevel=1)
            return super().forward(x)

    model = Noisy(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int8 = critnet.quantize_int8(model, torch.randn(8, 3, 4, 4))
        int8(torch.randn(2, 3, 4, 4))
        warnings.warn("torch.ao.quantization is deprecated, said by someone else", DeprecationWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert "the model's own warning" in messages  # FX tracing runs the forward's Python once
    assert "torch.ao.quantization is deprecated, said by someone else" in messages  # outside quantize_int8
    assert not [m for m in messages if "deprecat" in m and "someone else" not in m], messages


def test_torchvision_quantizable_classifier():
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, quantize=False, num_classes=10).eval()
    digest = state_digest(model)
    images = torch.randn(48, 3, 32, 32)
    int8 = critnet.quantize_int8(model, images.split(16))
    assert state_digest(model) == digest
    assert type(int8).__name__ == "QuantizableResNetInt8"
    layers = quantized_layers(int8)
    # 20 convolutions (the downsampling ones included) and the classifier, by their float names
    assert len(layers) == 21 and {"conv1", "layer1.0.conv1", "layer2.0.downsample.0", "fc"} <= set(layers)
    assert all(layer.weight().dtype == torch.qint8 for layer in layers.values())
    with torch.no_grad():
        reference, quantized = model(images), int8(images)
    assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()
    # and critnet evaluates it like any other classifier
    labels = reference.argmax(1)
    assert critnet.evaluate(int8, (images, labels))["samples"] == 48
    assert critnet.compare_accuracy(model, int8, (images, labels))["float_top1"] == 100.0


def one_line(raised) -> str:
    message = str(raised.value)
    assert isinstance(raised.value, critnet.CritnetError) and "\n" not in message, message
    return message


def test_bad_arguments_are_one_line_errors_naming_the_argument():
    model, data = tiny_model(), tiny_data(16, 8)
    with pytest.raises(critnet.SettingError) as raised:
        critnet.quantize_int8(model, data, backend="qnnpack")
    assert one_line(raised) == "backend: 'qnnpack' is not one of x86, fbgemm, onednn"
    for batches in (0, -1, 1.5, True):
        with pytest.raises(critnet.SettingError) as raised:
            critnet.quantize_int8(model, data, batches=batches)
        assert one_line(raised).startswith(f"batches: {batches!r} is not a positive integer")
    with pytest.raises(DataError) as raised:
        critnet.quantize_int8(model, [])
    assert one_line(raised).startswith("calibration: no batches")
    with pytest.raises(DataError) as raised:
        critnet.quantize_int8(model, [{"image": torch.randn(2, 3, 6, 6)}])
    assert one_line(raised).startswith("calibration: batch 0 holds a dict where quantize_int8 needs")
    with pytest.raises(DataError) as raised:
        critnet.quantize_int8(model, [data[0], (torch.zeros(2, 3, 6, 6, dtype=torch.uint8), None)])
    assert one_line(raised).startswith("calibration: batch 1 holds a uint8 tensor of shape (2, 3, 6, 6)")
    with pytest.raises(DataError) as raised:
        critnet.quantize_int8(model, 3)
    assert one_line(raised).startswith("calibration: a int; quantize_int8 needs")
    with pytest.raises(ModelInputError) as raised:
        critnet.quantize_int8(model, [data[0], (torch.randn(2, 4, 6, 6), None)])
    assert one_line(raised).startswith("calibration: TinyNet rejects the inputs of batch 1, of shape (2, 4, 6, 6)")

    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(critnet.SettingError) as raised:
        critnet.quantize_int8(Branching(), torch.randn(4, 4))
    assert one_line(raised).startswith("model: torch.fx cannot trace Branching (TraceError: ")

    with pytest.raises(critnet.OutputError) as raised:
        critnet.compare_accuracy(model, nn.Sequential(nn.Flatten(), nn.Linear(108, 7)), data)
    assert one_line(raised) == ("int8_model: Sequential returns 7 classes, TinyNet 5; compare_accuracy compares "
                                "models of the same classes")


def spread_images(split: str, images: int, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``images`` images of a shared CIFAR-10 split, spread evenly over it (it is sorted by class)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = datasets.ImageFolder(CIFAR_ROOT / split, tf)
    subset = torch.utils.data.Subset(dataset, [int(i * len(dataset) / images) for i in range(images)])
    return list(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False))


@requires_shared
def test_int8_resnet20_keeps_its_accuracy(resnet20_cifar):
    digest = state_digest(resnet20_cifar)
    int8 = critnet.quantize_int8(resnet20_cifar, spread_images("train", 256))
    assert state_digest(resnet20_cifar) == digest
    assert len(quantized_layers(int8)) == 20  # 19 convolutions and the classifier
    result = critnet.compare_accuracy(resnet20_cifar, int8, spread_images("test", 1000))
    print(f"\nResNet20 on 1,000 test images: float32 top-1 {result['float_top1']:.1f} %, int8 "
          f"{result['int8_top1']:.1f} %, same prediction on {result['agreement']:.1f} %")
    assert result["samples"] == 1000
    assert result["float_top1"] > 70  # the float model is the trained one (81 % on the JPEG test split)
    assert abs(result["int8_top1"] - result["float_top1"]) <= 3
    assert result["agreement"] > 90
