"""Int8 models from float ones: post-training static quantization on calibration batches, and how much it costs.

:func:`quantize_int8` turns a float classifier into an int8 one that critnet analyses like any other model
(``critnet.evaluate``, ``critnet.rank``, ``critnet.fault_campaign``): its convolutions and linear layers hold
per-channel ``qint8`` weights and run int8 kernels on the CPU, its activations are ``quint8`` between them, and it
takes and returns float tensors. :func:`compare_accuracy` reports what the quantization costs on your data: top-1
of both models and how often they predict the same class.

The int8 model comes from ``torch.ao.quantization``'s FX graph mode (``prepare_fx``, calibration, ``convert_fx``),
which this torch marks deprecated in favour of torchao (pytorch/ao#2259). torchao is not used because it cannot
run int8 convolutions on the CPU: its ``quantize_`` with ``Int8WeightOnlyConfig`` or
``Int8DynamicActivationInt8WeightConfig`` stores ``Int8Tensor`` weights that have no convolution kernel (the forward
pass raises ``NotImplementedError: Int8Tensor dispatch: ... aten.convolution``), and its PT2E flow
(``prepare_pt2e``/``convert_pt2e``) keeps int8 weights but, outside ``torch.compile``, dequantizes them and runs
float convolutions. ``torch.ao``'s deprecation warnings are silenced while :func:`quantize_int8` runs, and only
those.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from critnet.choices import SettingError, check_choice
from critnet.errors import DataError, ModelInputError, OutputError
from critnet.evaluation import check_fit
from critnet.evaluation_set import as_evaluation_set
from critnet.modes import device_of, evaluation_mode
from critnet.outputs import OutputSelector, logits_of
from critnet.scoring import per_sample

#: The quantized engines whose default qconfig mapping quantizes weights per channel (qnnpack's is per tensor, and
#: is meant for ARM): ``x86`` (the default: oneDNN or fbgemm kernels, chosen by torch per layer), ``fbgemm``,
#: ``onednn``.
Backend = Literal["x86", "fbgemm", "onednn"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# The deprecation notices torch.ao prints while a model is quantized: one per prepare_fx/convert_fx call, one per
# observer of the reduce_range of the x86/fbgemm qconfigs, one for the first quantized tensor. Each is matched by its
# own text, so that every other warning (from the user's model, or a new one from torch) still reaches the user.
_DEPRECATIONS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers\.\s+reduce_range will"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
)

# What a forward pass raises on inputs of the wrong shape or dtype (as critnet.evaluation reads them).
_INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


def quantize_int8(model: nn.Module, calibration: Any, *, backend: Backend = "x86",
                  batches: int | None = None) -> nn.Module:
    """A new int8 copy of ``model``, quantized after training on the ``calibration`` inputs; ``model`` is left as
    it was (on its device, in its mode, every parameter and buffer unchanged).

    Post-training static quantization in FX graph mode with the backend's default qconfig mapping: batch norms
    folded into the convolutions before them, conv/linear weights ``qint8`` per output channel (symmetric, scales
    from each channel's range), activations ``quint8`` per tensor with ranges observed (histograms) on the
    calibration inputs, and conv + ReLU fused into one int8 kernel. The result is a ``torch.fx.GraphModule`` in
    eval mode on the CPU (the only device torch's int8 kernels run on) whose submodules keep the float model's
    names (``layer1.0.conv1`` is a quantized ``ConvReLU2d``; its int8 weight is ``.weight()``); it takes and
    returns float tensors, and its class is named after the float model's (``CifarResNetInt8``), which is how
    critnet's reports call it. torchvision's quantizable classifiers (``torchvision.models.quantization.resnet18``
    and the others, built with ``quantize=False``) go through the same path.

    Why ``torch.ao.quantization`` and not torchao: see :mod:`critnet.models.quantization`.

    Args:
        model: a float classifier that ``torch.fx`` can trace (no Python control flow on tensor values).
        calibration: the inputs whose activation ranges set the quantization: a DataLoader or any iterable of
            ``(inputs, targets)`` batches (targets are ignored) or of input tensors, one ``(inputs, targets)`` pair
            (two tensors, the targets of fewer dimensions), or one tensor of inputs. A few hundred images of the
            training set are typical.
        backend: the quantized engine whose qconfig mapping and kernels to use (:data:`BACKENDS`).
        batches: use at most this many batches of ``calibration`` (default: all of them).

    Raises:
        SettingError: an unknown ``backend``, a ``batches`` that is not a positive integer, or a model that
            ``torch.fx`` cannot trace (the message names it and says why).
        DataError: ``calibration`` holds no batch, or a batch without an input tensor.
        ModelInputError: the model rejects a calibration batch (names the batch and its shape).

    >>> model = critnet.load_model("resnet20")  # random weights; weights="resnet20-cifar10" for the trained ones
    >>> images = torch.randn(64, 3, 32, 32)
    >>> int8 = quantize_int8(model, images)
    >>> conv = int8.get_submodule("layer1.0.conv1")  # its batch norm and ReLU fused in
    >>> type(int8).__name__, type(conv).__name__, conv.weight().dtype, conv.weight().qscheme()
    ('CifarResNetInt8', 'ConvReLU2d', torch.qint8, torch.per_channel_affine)
    >>> int8(images).dtype, model.training, int8.training
    (torch.float32, False, False)
    """
    check_choice("backend", backend, BACKENDS)
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise SettingError(f"batches: {batches!r} is not a positive integer (or None for every calibration batch)")
    inputs = _calibration_inputs(calibration, batches)
    first = next(inputs, None)
    if first is None:
        raise DataError("calibration: no batches; quantize_int8 needs at least one batch of inputs to observe the "
                        "activation ranges on")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    name = type(model).__name__
    # a deep copy, so that the model stays where and as it is and the int8 model shares no tensor with it; on the
    # CPU (torch's int8 kernels run nowhere else) and in eval mode (PTQ folds the batch norms' running statistics)
    float_copy = copy.deepcopy(model).cpu().eval()
    with _torch_ao_quietly(), _quantized_engine(backend), torch.no_grad():
        try:
            prepared = prepare_fx(float_copy, get_default_qconfig_mapping(backend), example_inputs=(first[:1].cpu(),))
        except Exception as err:  # noqa: BLE001 (tracing fails in as many ways as a forward can be written)
            said = (str(err).strip().splitlines() or [""])[0]
            raise SettingError(f"model: torch.fx cannot trace {name} ({type(err).__name__}: {said}); quantize_int8 "
                               "needs a model that FX symbolic tracing can follow (no Python control flow on tensor "
                               "values)") from None
        for position, x in enumerate(_chain(first, inputs)):
            try:
                prepared(x.cpu())
            except _INPUT_ERRORS as err:
                said = (str(err).strip().splitlines() or [""])[0]
                raise ModelInputError(f"calibration: {name} rejects the inputs of batch {position}, of shape "
                                      f"{tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')}); the model says "
                                      f"{type(err).__name__}: {said}") from None
        quantized = convert_fx(prepared)
    # what torch.fx.GraphModule(..., class_name=) does: each GraphModule instance has a class of its own
    type(quantized).__name__ = f"{name}Int8"
    return quantized.eval()


def compare_accuracy(float_model: nn.Module, int8_model: nn.Module, data: Any, *,
                     output: OutputSelector = None) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (percent) of ``float_model`` and of ``int8_model`` on the same ``data``, and
    ``agreement``: the percentage of inputs on which both predict the same class.

    Both models run in eval mode on every batch of ``data`` once; the float model where its parameters are, the
    int8 model on the CPU; the train flags of both are put back afterwards. The keys are ``float_top1``,
    ``int8_top1``, ``float_top5``, ``int8_top5``, ``agreement`` and ``samples``.

    Args:
        float_model: the reference model.
        int8_model: its quantized copy (:func:`quantize_int8`), or any other model of the same classes.
        data: a DataLoader, any iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair.
        output: where the logits are in what the models return (see :func:`critnet.outputs.logits_of`).

    Raises:
        CritnetError: one line, before any batch is evaluated, for data or outputs either model cannot be
            evaluated on (see :func:`critnet.evaluate`), or models of different numbers of classes.

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    >>> images, labels = torch.randn(64, 3, 4, 4), torch.randint(0, 10, (64,))
    >>> result = compare_accuracy(model, quantize_int8(model, images), (images, labels))
    >>> result["samples"], result["agreement"] > 90
    (64, True)
    """
    evaluation_set = as_evaluation_set(data, device="cpu")
    float_classes = check_fit(float_model, evaluation_set, output=output)
    int8_classes = check_fit(int8_model, evaluation_set, output=output)
    if float_classes != int8_classes:
        raise OutputError(f"int8_model: {type(int8_model).__name__} returns {int8_classes} classes, "
                          f"{type(float_model).__name__} {float_classes}; compare_accuracy compares models of the "
                          "same classes")
    device = device_of(float_model)
    float_top1 = float_top5 = int8_top1 = int8_top5 = same = samples = 0
    with evaluation_mode(float_model, device), evaluation_mode(int8_model, "cpu"), torch.no_grad():
        for x, y in evaluation_set:
            reference = logits_of(float_model(x.to(device)), output).float().cpu()
            quantized = logits_of(int8_model(x), output).float()
            _, top1, top5 = per_sample(reference[None], y)
            float_top1, float_top5 = float_top1 + int(top1.sum()), float_top5 + int(top5.sum())
            _, top1, top5 = per_sample(quantized[None], y)
            int8_top1, int8_top5 = int8_top1 + int(top1.sum()), int8_top5 + int(top5.sum())
            same += int((reference.argmax(1) == quantized.argmax(1)).sum())
            samples += len(y)
    counts = {"float_top1": float_top1, "int8_top1": int8_top1, "float_top5": float_top5, "int8_top5": int8_top5,
              "agreement": same}
    return {**{key: 100.0 * count / samples for key, count in counts.items()}, "samples": samples}


def _calibration_inputs(calibration: Any, batches: int | None) -> Iterator[Tensor]:
    """The input tensors of the first ``batches`` batches of ``calibration`` (all of them for None), read lazily so
    that a DataLoader is read no further than needed."""
    if isinstance(calibration, Tensor):
        calibration = [calibration]
    elif (isinstance(calibration, (tuple, list)) and len(calibration) == 2
          and all(isinstance(t, Tensor) for t in calibration) and calibration[1].dim() < calibration[0].dim()):
        # one (inputs, targets) pair, as everywhere in critnet's API; two tensors of as many dimensions are two
        # batches of inputs
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise DataError(f"calibration: a {type(calibration).__name__}; quantize_int8 needs a tensor of inputs, an "
                        "(inputs, targets) pair or an iterable of such batches")

    def read() -> Iterator[Tensor]:
        # islice stops without reading the batch after the last one it yields
        for position, batch in enumerate(itertools.islice(calibration, batches)):
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or len(x) == 0:
                what = (f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
                        if isinstance(x, Tensor) else f"a {type(x).__name__}")
                raise DataError(f"calibration: batch {position} holds {what} where quantize_int8 needs a batch of "
                                "float inputs (a tensor, or the first element of an (inputs, targets) pair)")
            yield x

    return read()


def _chain(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


@contextlib.contextmanager
def _torch_ao_quietly() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def _quantized_engine(backend: str) -> Iterator[None]:
    """``backend`` as torch's quantized engine, and the engine before it back afterwards: the engine picks the
    kernels that pack the int8 weights at conversion (and so the kernels they run with)."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = engine
