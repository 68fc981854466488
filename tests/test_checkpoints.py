import shutil

import pytest
import torch

from conftest import CIFAR_CHECKPOINTS, RESNET20_WEIGHTS, requires_shared
from critnet.models import build_model
from critnet.models.checkpoints import (
    KNOWN_CHECKPOINTS,
    CheckpointError,
    load_weights,
    sha256_of,
)

pytestmark = requires_shared


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_every_shared_checkpoint_loads_strictly(depth):
    path = next(CIFAR_CHECKPOINTS.glob(f"resnet{depth}-*.th"))
    model = build_model(f"resnet{depth}")
    info = load_weights(model, str(path), f"resnet{depth}")
    raw = torch.load(path, map_location="cpu")["state_dict"]
    for key, value in raw.items():
        assert torch.equal(model.state_dict()[key.removeprefix("module.")], value), key
    assert info.sha256.startswith(path.stem.split("-")[1])


def test_wrapped_prefixed_and_bare_state_dicts_load_alike(tmp_path):
    raw = torch.load(RESNET20_WEIGHTS, map_location="cpu")["state_dict"]
    bare = {k.removeprefix("module."): v for k, v in raw.items()}
    torch.save(bare, tmp_path / "bare.pth")
    torch.save({"state_dict": raw}, tmp_path / "wrapped.th")
    reference = build_model("resnet20")
    load_weights(reference, str(RESNET20_WEIGHTS), "resnet20")
    for name in ("bare.pth", "wrapped.th"):
        model = build_model("resnet20")
        load_weights(model, str(tmp_path / name), "resnet20")
        assert same_state(model.state_dict(), reference.state_dict())


def test_architecture_mismatch_names_the_keys_and_leaves_the_model_untouched():
    model = build_model("resnet20")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"unexpected keys: layer1\.3\.bn1\.bias.*--model\.arch"):
        load_weights(model, str(CIFAR_CHECKPOINTS / "resnet32-d509ac18.th"), "resnet20")
    assert same_state(before, model.state_dict())
    with pytest.raises(CheckpointError, match=r"missing keys: layer1\.3\.bn1\.bias"):
        load_weights(build_model("resnet32"), str(RESNET20_WEIGHTS), "resnet32")


def test_class_count_mismatch_names_the_misshaped_keys():
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: linear\.bias: checkpoint \(10,\) vs model \(100,\)"):
        load_weights(build_model("resnet20", num_classes=100), str(RESNET20_WEIGHTS), "resnet20")


def test_missing_unreadable_and_unknown_sources(tmp_path):
    model = build_model("resnet20")
    with pytest.raises(CheckpointError, match="--model.weights: no such file: .*nope.th"):
        load_weights(model, str(tmp_path / "nope.th"), "resnet20")
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.th: cannot be read"):
        load_weights(model, str(tmp_path / "junk.th"), "resnet20")
    with pytest.raises(CheckpointError, match="neither a file nor a known checkpoint.*resnet20-cifar10"):
        load_weights(model, "resnet20-imagenet", "resnet20")
    with pytest.raises(CheckpointError, match="is a resnet56 checkpoint, but the model is resnet20"):
        load_weights(model, "resnet56-cifar10", "resnet20")


def test_known_name_uses_the_verified_download_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CRITNET_CHECKPOINT_DIR", str(tmp_path))
    cached = tmp_path / KNOWN_CHECKPOINTS["resnet20-cifar10"].filename
    shutil.copy(RESNET20_WEIGHTS, cached)
    info = load_weights(build_model("resnet20"), "resnet20-cifar10", "resnet20")
    assert info.path == str(cached) and info.sha256 == sha256_of(RESNET20_WEIGHTS)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")  # one corrupted byte
    with pytest.raises(CheckpointError, match="does not match the published 12fca82f"):
        load_weights(build_model("resnet20"), "resnet20-cifar10", "resnet20")
