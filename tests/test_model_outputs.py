"""Model outputs as users have them: logits inside a dict, a tuple, a namedtuple, a dataclass or a Hugging Face
``ModelOutput`` (imitated here: transformers is optional) are read by every analysis, by every method, exactly as a
plain logits tensor is."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, fields

import pytest
import torch
from tiny_nets import TinyNet, tiny_data, tiny_model

import critnet
from conftest import KERNEL_REL, f32_close
from critnet.digests import state_digest
from critnet.engine.suffix import trace_failure
from critnet.errors import OutputError
from critnet.outputs import describe_selector


@dataclass
class FakeModelOutput(OrderedDict):
    """What transformers' ``ModelOutput`` is: a dataclass and an OrderedDict of its fields that are not None, read
    by attribute, by key, or by position among the fields that are set."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def __post_init__(self):
        for field in fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)

    def __getitem__(self, key):
        return dict(self.items())[key] if isinstance(key, str) else tuple(self.values())[key]


Pair = namedtuple("Pair", "logits features")


@dataclass
class Prediction:
    features: torch.Tensor
    logits: torch.Tensor


def features(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class DictNet(TinyNet):
    def forward(self, x):
        return {"features": features(x), "logits": super().forward(x)}


class TupleNet(TinyNet):
    def forward(self, x):
        return super().forward(x), features(x)


class NamedTupleNet(TinyNet):
    def forward(self, x):
        return Pair(super().forward(x), features(x))


class DataclassNet(TinyNet):
    def forward(self, x):
        return Prediction(features(x), super().forward(x))


class ModelOutputNet(TinyNet):
    def forward(self, x):
        return FakeModelOutput(logits=super().forward(x), hidden_states=features(x))


class ScoresNet(TinyNet):
    """A dict without a ``logits`` key: its logits must be selected."""

    def forward(self, x):
        return {"scores": super().forward(x), "features": features(x)}


def second_item(output):
    return output[1]


class ReversedNet(TinyNet):
    def forward(self, x):
        return features(x), super().forward(x)


WRAPPED = [
    pytest.param(DictNet, None, id="dict"),
    pytest.param(TupleNet, 0, id="tuple-index"),
    pytest.param(NamedTupleNet, None, id="namedtuple"),
    pytest.param(DataclassNet, None, id="dataclass"),
    pytest.param(ModelOutputNet, None, id="model-output"),
    pytest.param(ModelOutputNet, 0, id="model-output-index"),
    pytest.param(ScoresNet, "scores", id="dict-key"),
    pytest.param(ReversedNet, second_item, id="callable"),
]


def wrapped(cls) -> TinyNet:
    model = cls()
    model.load_state_dict(tiny_model().state_dict())
    return model.eval()


def same(a, b) -> bool:
    """Equal, NaN included (the rows of estimates carry NaN where they have no tallies)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


RANK = dict(unit="channel", perturbation="zero", score="delta_loss", top_k=3)


@pytest.fixture(scope="module")
def plain():
    """The plain-logits model's results, which every wrapped model must reproduce."""
    model, data = tiny_model(), tiny_data()
    return {
        "evaluate": critnet.evaluate(model, data),
        "exact": critnet.rank(model, data, method="exact", **RANK).rows,
        "taylor": critnet.rank(model, data, method="taylor", **RANK).rows,
        "halving": critnet.rank(model, data, method="halving", **RANK).rows,
        "faults": critnet.fault_campaign(model, data, faults=24, seed=1).faults,
        "prune": critnet.prune_sweep(model, data, p_prune=[0.5], name="tiny").rows,
    }


@pytest.mark.parametrize("cls, output", WRAPPED)
def test_every_analysis_reads_the_logits_as_from_a_plain_model(plain, cls, output):
    model, data = wrapped(cls), tiny_data()
    before = state_digest(model)
    assert critnet.evaluate(model, data, output=output) == plain["evaluate"]
    # torch.fx builds a graph that returns the model's output (older torch cannot return a dataclass): where it
    # can, no unit may fall back to full passes, and the suffixes give the plain model's scores bit for bit
    traced = trace_failure(model)[1] is None
    with warnings.catch_warnings():
        if traced:
            warnings.simplefilter("error")
        exact = critnet.rank(model, data, method="exact", output=output, **RANK)
    assert exact.rows == plain["exact"] or not traced
    assert exact.summary["settings"]["output"] == describe_selector(output)
    naive = {row["unit"]: row for row in critnet.rank(model, data, method="naive", output=output, **RANK).rows}
    for row in exact.rows:
        other = naive[row["unit"]]
        assert (row["top1"], row["top5"]) == (other["top1"], other["top5"])
        assert f32_close(row["loss"], other["loss"], rel=KERNEL_REL)
    assert same(critnet.rank(model, data, method="taylor", output=output, **RANK).rows, plain["taylor"])
    assert same(critnet.rank(model, data, method="halving", output=output, **RANK).rows, plain["halving"])
    campaign = critnet.fault_campaign(model, data, faults=24, seed=1, output=output)
    assert campaign.faults == plain["faults"]
    assert campaign.info["engine"]["full_passes"] == 0 or not traced  # the faults ran the traced suffixes
    assert critnet.prune_sweep(model, data, p_prune=[0.5], name="tiny", output=output).rows == plain["prune"]
    assert state_digest(model) == before


def test_compare_orders_reads_the_logits_of_its_ranking_and_of_every_order():
    data = tiny_data()
    expected = critnet.compare_orders(tiny_model(), data, orders=["criticality", "l1"], ratios=[0.25], name="tiny")
    found = critnet.compare_orders(wrapped(TupleNet), data, orders=["criticality", "l1"], ratios=[0.25], name="tiny",
                                   output=0)
    assert found.rows == expected.rows and found.criticality.rows == expected.criticality.rows


@pytest.mark.parametrize("cls, output, words", [
    (TupleNet, None, ["a tuple of 2 items (Tensor (", ", 5), Tensor (", "output=0"]),
    (ScoresNet, None, ["a dict with keys 'scores', 'features'", "not a logits tensor"]),
    (DictNet, "scores", ["'scores' is not in what the model returns", "keys 'features', 'logits'"]),
    (TupleNet, 2, ["index 2 does not select an item", "a tuple of 2 items"]),
    (DataclassNet, lambda out: out.features.tolist(), ["selects list", "a Prediction object"]),
])
@pytest.mark.parametrize("analysis", ["evaluate", "rank", "prune_sweep", "fault_campaign"])
def test_an_output_without_readable_logits_is_one_line_naming_its_type(analysis, cls, output, words):
    model = wrapped(cls)
    before = state_digest(model)
    with pytest.raises(OutputError) as error:
        getattr(critnet, analysis)(model, tiny_data(), output=output)
    message = str(error.value)
    assert "\n" not in message and message.startswith("output: ") and isinstance(error.value, critnet.CritnetError)
    assert all(word in message for word in words), message
    assert state_digest(model) == before and not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("output", [1.5, True, [0]])
def test_a_selector_that_is_no_key_index_or_callable_is_a_setting_error(output):
    model = wrapped(TupleNet)
    with pytest.raises(critnet.SettingError, match=r"^output: .* is not a key \(str\), an index \(int\) or a callable"):
        critnet.rank(model, tiny_data(), output=output)


def test_the_selector_keys_the_resume_file(tmp_path):
    model, data = wrapped(ReversedNet), tiny_data()
    first = critnet.rank(model, data, output=1, resume_dir=tmp_path, **RANK)
    again = critnet.rank(model, data, output=1, resume_dir=tmp_path, **RANK)
    assert again.rows == first.rows and len(list(tmp_path.iterdir())) == 1  # the same file, resumed
    by_callable = critnet.rank(model, data, output=second_item, resume_dir=tmp_path, **RANK)
    assert by_callable.rows == first.rows and len(list(tmp_path.iterdir())) == 2  # another selector, another file
