"""Bad data at the API boundary: every public analysis names the batch, the value or the output at fault in one line
(a critnet.CritnetError) before it touches the model, and leaves the model as it was."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_nets import tiny_data, tiny_model
from torch import nn

import critnet
from critnet.digests import state_digest
from critnet.distributed import Distributed
from critnet.errors import DataError, ModelInputError, OutputError

ANALYSES = {
    "evaluate": lambda model, data, **kw: critnet.evaluate(model, data, **kw),
    "rank": lambda model, data, **kw: critnet.rank(model, data, unit="channel", perturbation="zero", **kw),
    "rank-activations": lambda model, data, **kw: critnet.rank(model, data, unit="activation", perturbation="zero",
                                                                **kw),
    "prune_sweep": lambda model, data, **kw: critnet.prune_sweep(model, data, p_prune=[0.5], **kw),
    "compare_orders": lambda model, data, **kw: critnet.compare_orders(model, data, ratios=[0.25], **kw),
    "fault_campaign": lambda model, data, **kw: critnet.fault_campaign(model, data, faults=4, **kw),
}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return tiny_data()  # three batches of eight 3×6×6 images, targets in [0, 5): TinyNet's five classes


def with_target(batch: int, index: int, value: int):
    data = batches()
    data[batch][1][index] = value
    return data


def replaced(batch: int, x=None, y=None):
    data = batches()
    old_x, old_y = data[batch]
    data[batch] = (old_x if x is None else x(old_x), old_y if y is None else y(old_y))
    return data


class Spatial(nn.Module):
    """Returns a map per class (a segmentation head), not (inputs, classes) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x)


CASES = [
    # (data, the error's type, words its message must hold)
    pytest.param(with_target(2, 5, 7), DataError,
                 ["data: batch 2, targets[5] = 7 is outside the model's 5 classes [0, 5)"], id="label-too-large"),
    pytest.param(with_target(1, 0, -1), DataError,
                 ["data: batch 1, targets[0] = -1 is outside the model's 5 classes [0, 5)"], id="label-negative"),
    pytest.param(replaced(0, y=lambda y: y.float()), DataError,
                 ["data: batch 0: the targets are a float32 tensor of shape (8,)", "integer class indices",
                  "targets.long()"], id="float-targets"),
    pytest.param(replaced(1, y=lambda y: nn.functional.one_hot(y, 5).float()), DataError,
                 ["data: batch 1: the targets are a float32 tensor of shape (8, 5), one-hot or class probabilities",
                  "shape (8,)", "targets.argmax(1)"], id="one-hot-float"),
    pytest.param(replaced(0, y=lambda y: nn.functional.one_hot(y, 5)), DataError,
                 ["data: batch 0: the targets are an int64 tensor of shape (8, 5)", "targets.argmax(1)"],
                 id="one-hot-int"),
    pytest.param(replaced(1, y=lambda y: y[:, None]), DataError,
                 ["data: batch 1: the targets are an int64 tensor of shape (8, 1)", "targets.squeeze(1)"],
                 id="index-column"),
    pytest.param(replaced(2, y=lambda y: y[:6]), DataError,
                 ["data: batch 2: 8 inputs but 6 targets"], id="short-targets"),
    pytest.param((torch.randn(8, 3, 6, 6), torch.zeros(7, dtype=torch.long)), DataError,
                 ["data: batch 0: 8 inputs but 7 targets"], id="one-pair-short-targets"),
    pytest.param([], DataError, ["data: holds no samples"], id="empty-list"),
    pytest.param(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3, 6, 6),
                                                                            torch.zeros(0, dtype=torch.long))),
                 DataError, ["data: holds no samples"], id="empty-loader"),
    pytest.param([{"pixel_values": torch.zeros(2, 3, 6, 6), "labels": torch.zeros(2, dtype=torch.long)}], DataError,
                 ["data: batch 0 is a dict with keys 'pixel_values', 'labels', not an (inputs, targets) pair"],
                 id="dict-batches"),
    pytest.param(torch.utils.data.TensorDataset(torch.zeros(4, 3, 6, 6), torch.zeros(4, dtype=torch.long)),
                 DataError, ["data: batch 0 is (tensor, scalar tensor): one sample of a dataset", "DataLoader"],
                 id="a-dataset"),
    pytest.param(torch.zeros(8, 3, 6, 6), DataError, ["data: a float32 tensor of shape (8, 3, 6, 6) alone"],
                 id="inputs-alone"),
    pytest.param(5, DataError, ["data: an int is not a DataLoader"], id="not-iterable"),
    pytest.param(replaced(0, x=lambda x: x[:, :1]), ModelInputError,
                 ["data: TinyNet rejects the inputs of batch 0, of shape (8, 1, 6, 6) (float32, cpu)",
                  "it expects (N, 3, H, W) (its first Conv2d 'conv1' takes 3 channels)",
                  "on the first 2 of them the model says RuntimeError: "], id="wrong-channels"),
    pytest.param(replaced(0, x=lambda x: (x * 50).clamp(0, 255).to(torch.uint8)), ModelInputError,
                 ["data: TinyNet rejects the inputs of batch 0, of shape (8, 3, 6, 6) (uint8, cpu)"], id="uint8"),
]


@pytest.mark.parametrize("data, error, words", CASES)
@pytest.mark.parametrize("analysis", list(ANALYSES))
def test_bad_data_is_one_line_naming_it_and_leaves_the_model_alone(analysis, data, error, words):
    model = tiny_model().train()  # train mode: the check's own eval mode must be put back
    model.bn1.eval()
    flags = [m.training for m in model.modules()]
    before = state_digest(model)
    with pytest.raises(error) as raised:
        ANALYSES[analysis](model, data)
    message = str(raised.value)
    assert isinstance(raised.value, critnet.CritnetError) and "\n" not in message
    assert all(word in message for word in words), message
    assert state_digest(model) == before and [m.training for m in model.modules()] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("analysis", list(ANALYSES))
def test_every_batch_shape_is_tried_on_the_model(analysis):
    """A later batch of other images (here 3×7×7 where the first layer takes 3×6×6) is named too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    data = batches()
    data[2] = (torch.randn(8, 3, 7, 7), data[2][1])
    before = state_digest(model)
    with pytest.raises(ModelInputError, match=r"^data: Sequential rejects the inputs of batch 2, of shape "
                                              r"\(8, 3, 7, 7\) .*it expects \(N, 3, H, W\) .*"):
        ANALYSES[analysis](model, data)
    assert state_digest(model) == before


def test_a_vit_names_its_image_size():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8,
                              num_classes=5).eval()
    with pytest.raises(ModelInputError) as raised:
        critnet.rank(model, batches(), unit="head", perturbation="zero")
    message = str(raised.value)
    assert "it expects (N, 3, 8, 8) (its first Conv2d 'conv_proj' takes 3 channels)" in message, message
    assert "of shape (8, 3, 6, 6)" in message and "AssertionError" in message and "\n" not in message


@pytest.mark.parametrize("analysis", ["evaluate", "rank", "prune_sweep", "fault_campaign"])
def test_logits_that_are_not_inputs_by_classes_are_named(analysis):
    model = Spatial().eval()
    with pytest.raises(OutputError, match=r"^output: Spatial returns logits of shape \(2, 5, 6, 6\) \(float32\) "
                                          r"for 2 inputs; critnet needs floats of shape \(inputs, classes\)"):
        ANALYSES[analysis](model, batches())


def test_a_selected_tensor_of_too_few_classes_is_caught_by_the_targets():
    """output=1 picks the 3 pooled input channels instead of the 5 logits: the targets say so."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def forward(self, x):
            return self.net(x), x.mean(dim=(2, 3))

    data = batches()
    targets = torch.cat([y for _, y in data])
    first = int((targets >= 3).nonzero()[0])
    batch, index = divmod(first, 8)
    with pytest.raises(DataError, match=rf"^data: batch {batch}, targets\[{index}\] = {int(targets[first])} is "
                                        r"outside the model's 3 classes \[0, 3\)$"):
        critnet.rank(Both().eval(), data, output=1)
    assert critnet.rank(Both().eval(), data, output=0).baseline["samples"] == 24


def test_int32_targets_are_class_indices_too():
    data = batches()
    narrow = [(x, y.int()) for x, y in data]
    assert critnet.evaluate(tiny_model(), narrow) == critnet.evaluate(tiny_model(), data)


def test_a_sharded_prune_sweep_raises_on_every_rank_when_one_share_is_bad():
    """Each rank checks only its own share; the gather makes the rank with good data raise with the other's message
    instead of waiting for it forever."""
    model = tiny_model()
    good, bad = batches()[:1], with_target(0, 2, 9)[:1]
    found = "data: batch 0, targets[2] = 9 is outside the model's 5 classes [0, 5)"
    expected = f"{found} (in rank 0's share of the batches)"
    gathered = []

    def rank_zero_gather(obj):  # rank 1 holds the good share
        gathered.append(obj)
        return [obj, None]

    with pytest.raises(DataError, match=re.escape(expected)):
        critnet.prune_sweep(model, bad, sharded=True, distributed=Distributed(0, 2, rank_zero_gather))
    assert gathered == [(DataError, found)]  # rank 0 shared its problem before raising

    def rank_one_gather(obj):
        return [gathered[0], obj]

    before = state_digest(model)
    with pytest.raises(DataError, match=re.escape(expected)):
        critnet.prune_sweep(model, good, sharded=True, distributed=Distributed(1, 2, rank_one_gather))
    assert state_digest(model) == before


def test_a_one_shot_iterator_over_the_memory_budget_is_named():
    with pytest.raises(DataError, match=r"^memory_budget_mb: the batches of data need .* one-shot iterator"):
        critnet.evaluate(tiny_model(), iter(batches()), memory_budget_mb=0.01)


def test_a_streamed_set_is_checked_alike():
    """Over the memory budget the batches stream from the source: the same message, read from the source again."""
    with pytest.raises(DataError, match=re.escape("data: batch 2, targets[5] = 7 is outside the model's 5 classes")):
        critnet.rank(tiny_model(), with_target(2, 5, 7), memory_budget_mb=0.001)
