"""The callback through Lightning's own Trainer: the restore guarantee (also when the analysis raises midway),
ranking at the end of fit, and activation units."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import (
    CIFAR_ROOT,
    KERNEL_REL,
    RESNET20_WEIGHTS,
    f32_close,
    first_test_images,
    requires_shared,
)
from critnet.callbacks.critical_ranking import CriticalRanking
from critnet.data import CIFAR10DataModule
from critnet.module import ClassifierModule

pytestmark = requires_shared


def checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def make_trainer(tmp_path: Path, callback: CriticalRanking, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path), name="logs"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def datamodule(subset: int, batch_size: int = 32) -> CIFAR10DataModule:
    return CIFAR10DataModule(str(CIFAR_ROOT), batch_size=batch_size, num_workers=0, subset_size=subset, augment=False)


@pytest.mark.parametrize("method", ["naive", "exact"])
@pytest.mark.parametrize(
    "unit, perturbation, level",
    [("channel", "bitflip", 30), ("tensor", "noise", 0.5), ("activation", "prune", 0.5)],
)
def test_model_is_bit_identical_after_an_exception_midway(tmp_path, method, unit, perturbation, level):
    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS))
    network = module.model
    before = checksum(module)
    calls = {"n": 0}

    def fail_midway(_module, _inputs, _output):
        calls["n"] += 1
        # the validation step, the baseline, the per-image reference of the paired errors, (exact:) the tracer's
        # measuring pass and the stacking probe have run; now a unit's pass is under way
        if calls["n"] == 7:
            raise RuntimeError("injected failure")

    injector = network.linear.register_forward_hook(fail_midway)
    callback = CriticalRanking(
        unit=unit, include=["layer3.2"], perturbation=perturbation, levels=[level], method=method, num_batches=1,
        progress=False, print_table=False,
    )  # fmt: skip
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            make_trainer(tmp_path, callback).validate(module, datamodule=datamodule(32), verbose=False)
    finally:
        injector.remove()
    assert calls["n"] == 7
    assert checksum(module) == before
    assert hook_count(module) == 0
    assert not list(tmp_path.rglob("ranking.csv"))

    # and after a complete run too
    callback = CriticalRanking(
        unit=unit, include=["linear" if unit == "activation" else "linear.weight"], perturbation=perturbation,
        levels=[level], method=method,
        num_batches=1, progress=False, print_table=False,
    )  # fmt: skip
    make_trainer(tmp_path / "ok", callback).validate(module, datamodule=datamodule(32), verbose=False)
    assert checksum(module) == before
    assert hook_count(module) == 0
    assert callback.ranking.summary["units"] == (1 if unit == "tensor" else 10)


def test_activation_units_against_an_independent_hook_loop(tmp_path):
    """Zeroing output channel c of layer3.2.bn2 (before the residual sum), scored against a loop written here."""
    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS))
    callback = CriticalRanking(
        unit="activation", include=["^layer3\\.2\\.bn2$"], module_types=["BatchNorm2d"], perturbation="zero",
        score="top1_drop", method="exact", progress=False, print_table=False,
    )  # fmt: skip
    make_trainer(tmp_path, callback).validate(module, datamodule=datamodule(32), verbose=False)
    rows = callback.ranking.rows
    assert len(rows) == 64 and rows[0]["unit"].startswith("layer3.2.bn2[")

    network = module.model.eval()
    images, labels = first_test_images(32, 32)[0]
    expected = {}
    with torch.no_grad():
        for channel in range(64):

            def zero(_m, _i, output, channel=channel):
                output = output.clone()
                output[:, channel] = 0
                return output

            handle = network.layer3[2].bn2.register_forward_hook(zero)
            logits = network(images)
            handle.remove()
            expected[f"layer3.2.bn2[{channel}]"] = (
                F.cross_entropy(logits, labels).item(),
                100.0 * (logits.argmax(1) == labels).double().mean().item(),
            )
    for row in rows:
        loss, top1 = expected[row["unit"]]
        assert f32_close(row["loss"], loss), row["unit"]  # a float32 mean against a float64 sum
        assert abs(row["top1"] - top1) <= 1e-9  # a count of 32: any difference is 3.125 points
    drops = [row["score"] for row in rows]
    assert drops == sorted(drops, reverse=True)


def test_ranks_at_the_end_of_fit_when_asked(tmp_path):
    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS), lr=0.01)
    callback = CriticalRanking(
        include=["linear.weight"], run_on=["fit"], num_batches=1, progress=False, print_table=False
    )  # fmt: skip
    trainer = make_trainer(tmp_path, callback, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule(32))
    log_dir = Path(trainer.log_dir)
    summary = json.loads((log_dir / "ranking.json").read_text())
    assert summary["stage"] == "fit" and summary["units"] == 1
    with open(log_dir / "ranking.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    # scored on the fine-tuned weights, not the checkpoint's
    network = module.model.eval()
    images, labels = first_test_images(32, 32)[0]
    with torch.no_grad():
        weight = network.linear.weight
        original = weight.data.clone()
        weight.data += 0.1
        loss = F.cross_entropy(network(images), labels).item()
        weight.data = original
    assert f32_close(float(row["loss"]), loss)  # a float32 mean against a float64 sum

    # the validation inside fit did not trigger a ranking; a plain validate does not either with run_on=[fit]
    trainer = make_trainer(tmp_path / "v", callback)
    trainer.validate(module, datamodule=datamodule(32), verbose=False)
    assert not (Path(trainer.log_dir) / "ranking.csv").exists()


def test_approximate_methods_are_labelled_and_hybrid_reports_engine_agreement(tmp_path, capsys):
    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS))
    settings = dict(
        unit="channel", include=["layer3.2.conv1.weight", "linear.weight"], perturbation="zero",
        score="delta_loss", top_k=5, progress=False, print_table=False,
    )  # fmt: skip
    results = {}
    for method, order in (("exact", 1), ("hybrid", 1), ("taylor", 1), ("taylor2", 2)):
        callback = CriticalRanking(method=method.rstrip("2"), taylor_order=order, **settings)
        trainer = make_trainer(tmp_path / method, callback)
        trainer.validate(module, datamodule=datamodule(32), verbose=False)
        results[method] = ({"rows": callback.ranking.rows}, json.loads((Path(trainer.log_dir) / "ranking.json").read_text()))

    exact_rows = results["exact"][0]["rows"]
    hybrid, hybrid_json = results["hybrid"]
    agreement = hybrid_json["levels"][0]["engine_agreement"]
    assert f"hybrid: {agreement['units']} units checked exactly" in capsys.readouterr().out
    assert agreement["units"] >= 10 and -1.0 <= agreement["spearman"] <= 1.0
    assert hybrid_json["levels"][0]["exact_units"] == agreement["units"]
    # rows evaluated exactly come first and carry the same scores as the exact method
    exact_scores = {row["unit"]: row["score"] for row in exact_rows}
    exact_part = [row for row in hybrid["rows"] if row["exact"]]
    assert hybrid["rows"][: len(exact_part)] == exact_part
    for row in exact_part:
        # the same engine, but the rounds of hybrid stack other numbers of perturbed copies into one batch than
        # the exact method does, and another batch size may take another kernel
        assert f32_close(row["score"], exact_scores[row["unit"]], scale=row["loss"], rel=KERNEL_REL), row["unit"]
        assert row["estimate"] != ""

    taylor, taylor_json = results["taylor"]
    assert not any(row["exact"] for row in taylor["rows"])
    assert all(row["samples"] == 0 and row["estimate"] != "" for row in taylor["rows"])
    estimates = [row["score"] for row in taylor["rows"]]
    assert estimates == sorted(estimates, reverse=True)
    assert taylor_json["split_half_spearman"] == "nan"  # no exact halves to compare: said, not invented
    assert results["exact"][1]["levels"][0]["engine_agreement"] is None

    # second order: the same first-order part plus a positive (squared) term, recorded in the settings
    second, second_json = results["taylor2"]
    first_by_unit = {row["unit"]: row["score"] for row in taylor["rows"]}
    assert all(row["score"] >= first_by_unit[row["unit"]] for row in second["rows"])
    assert sum(row["score"] > first_by_unit[row["unit"]] for row in second["rows"]) > len(second["rows"]) // 2
    assert second_json["settings"]["taylor_order"] == 2 and taylor_json["settings"]["taylor_order"] == 1


def test_resume_reuses_the_partial_results(tmp_path):
    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS))
    settings = dict(
        unit="channel", include=["linear.weight"], perturbation="add", levels=[0.5], resume=True,
        resume_dir=str(tmp_path / "partial"), progress=False, print_table=False,
    )  # fmt: skip
    first = CriticalRanking(**settings)
    make_trainer(tmp_path / "a", first).validate(module, datamodule=datamodule(32), verbose=False)
    records = list((tmp_path / "partial").glob("*.jsonl"))
    assert len(records) == 1 and len(records[0].read_text().splitlines()) == 10
    second = CriticalRanking(**settings)
    make_trainer(tmp_path / "b", second).validate(module, datamodule=datamodule(32), verbose=False)
    assert len(records[0].read_text().splitlines()) == 10  # nothing evaluated again
    assert second.ranking.rows == first.ranking.rows


def test_hybrid_note_warns_when_top_units_come_from_deep_in_the_estimate_order():
    from critnet.results.ranking_result import hybrid_note

    good = hybrid_note({"units": 40, "deepest_top_k": 12, "spearman": 0.91, "kendall": 0.8})
    assert "40 units checked exactly" in good and "12th by estimate" in good and "warning" not in good
    assert "warning" not in hybrid_note({"units": 40, "deepest_top_k": 20, "spearman": 0.91, "kendall": 0.8})
    assert "warning" in hybrid_note({"units": 40, "deepest_top_k": 21, "spearman": 0.91, "kendall": 0.8})


def test_halving_through_the_callback_has_the_exact_top_rows(tmp_path, monkeypatch):
    from critnet.engine import certify

    monkeypatch.setattr(certify, "FIRST_STAGE", 16)  # stages of 16, 32 and 64 images: two tests
    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS))
    settings = dict(unit="channel", include=["layer3.2.conv1.weight", "linear.weight"], perturbation="zero",
                    score="delta_loss", top_k=3, progress=False, print_table=False)
    rows = {}
    for method in ("exact", "halving"):
        # the normal bound eliminates units on 64 images; the callback passes either bound the same way
        callback = CriticalRanking(method=method, bound="normal", **settings)
        make_trainer(tmp_path / method, callback).validate(module, datamodule=datamodule(64), verbose=False)
        rows[method] = callback.ranking.rows
    # Halving evaluates the images in other groups (stages of 16 and 32) than the exact method's batches of 32, and
    # another batch size may take another kernel: the same units and hit counts, losses to float32 rounding.
    exact = {row["unit"]: row for row in rows["exact"]}
    third = rows["exact"][2]["score"]
    for row in rows["halving"][:3]:
        assert row["exact"], row["unit"]
        reference = exact[row["unit"]]
        for column in ("top1", "top5", "samples"):
            assert row[column] == reference[column], (row["unit"], column)
        assert f32_close(row["loss"], reference["loss"], rel=KERNEL_REL), row["unit"]
        assert f32_close(row["score"], reference["score"], scale=reference["loss"], rel=KERNEL_REL), row["unit"]
        assert reference["score"] >= third - KERNEL_REL * reference["loss"], row["unit"]  # one of the exact top 3
    scores = [row["score"] for row in rows["halving"][:3]]
    assert scores == sorted(scores, reverse=True)
    assert not all(row["exact"] for row in rows["halving"])  # it did skip work


def test_a_sigterm_mid_campaign_restores_the_model_and_says_how_to_continue(tmp_path):
    import os
    import signal
    import threading
    import time

    from critnet.callbacks.fault_campaign import FaultCampaign
    from critnet.errors import Interrupted

    module = ClassifierModule("resnet20", weights=str(RESNET20_WEIGHTS))
    before = checksum(module)
    callback = FaultCampaign(faults=200, resume=True, progress=False, print_table=False)
    running = threading.Event()

    def terminate_after_five_faults() -> None:  # from outside the main thread, as a scheduler's SIGTERM comes
        while running.is_set():
            if any(len(f.read_text().splitlines()) >= 5 for f in (tmp_path / "faults_partial").glob("*.jsonl")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    running.set()
    watcher = threading.Thread(target=terminate_after_five_faults, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Interrupted, match="FaultCampaign was interrupted; its finished work is kept in"):
            make_trainer(tmp_path, callback).validate(module, datamodule=datamodule(16), verbose=False)
    finally:
        running.clear()
        watcher.join()
    assert checksum(module) == before and hook_count(module) == 0
