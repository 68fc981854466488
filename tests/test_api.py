"""The public Python API without Lightning: data in any form, the result objects, settings errors, restores on
errors and interrupts, and equality with what the command line writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import critnet
from conftest import KERNEL_REL, RESNET20_WEIGHTS, first_test_images, requires_shared
from critnet.digests import state_digest


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


def tiny_batches(n: int = 48, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def test_data_in_every_form_gives_the_same_numbers():
    model = tiny_model()
    batches = tiny_batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    reference = critnet.evaluate(model, batches)
    for data in (loader, iter(batches), tuple(batches)):
        assert critnet.evaluate(model, data) == reference
    # one pair of tensors is one batch: the same per-sample numbers, summed in another grouping
    whole = critnet.evaluate(model, (x, y))
    assert (whole["top1_correct"], whole["top5_correct"], whole["samples"]) == (
        reference["top1_correct"], reference["top5_correct"], 48)
    assert math.isclose(whole["loss"], reference["loss"], rel_tol=KERNEL_REL)  # another batch shape, another kernel
    with torch.no_grad():
        logits = model(x)
    assert reference["top1_correct"] == int((logits.argmax(1) == y).sum())
    rows = [critnet.rank(model, data, unit="channel", perturbation="zero").rows for data in (loader, batches)]
    assert rows[0] == rows[1]


def test_a_ranking_object_has_its_rows_files_figures_and_reprs(tmp_path):
    model = tiny_model()
    ranking = critnet.rank(model, tiny_batches(), unit="channel", perturbation="zero", score="delta_loss", top_k=5)
    assert len(ranking.rows) == 6 + 8 + 10 and [r["rank"] for r in ranking.rows] == list(range(1, 25))
    assert ranking.top(3) == ranking.rows[:3] and len(ranking.top()) == 5
    scores = [r["score"] for r in ranking.rows]
    assert scores == sorted(scores, reverse=True)
    assert ranking.baseline["samples"] == 48 and ranking.split_half["units"] == 24
    assert ranking.engine_agreement is None

    csv_path, json_path = ranking.to_csv(tmp_path / "r.csv"), ranking.to_json(tmp_path / "r.json")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("rank,unit,kind,layer,index") and len(lines) == 25
    summary = json.loads(json_path.read_text())
    assert summary["units"] == 24 and summary["samples"] == 48 and summary["stage"] is None
    assert summary["levels"][0]["top"][0]["unit"] == ranking.rows[0]["unit"]
    assert "Ranking: Sequential · 24 channel units · zero · 48 images" in repr(ranking)
    assert "<table>" in ranking._repr_html_() and ranking.rows[0]["unit"] in ranking._repr_html_()
    assert ranking.plot_top_k().axes and ranking.plot_heatmap().axes
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            ranking.to_dataframe()
    else:
        assert ranking.to_dataframe().shape == (24, 17)


def test_sweeps_and_the_guided_comparison_from_python(tmp_path):
    model = tiny_model()
    before = state_digest(model)
    batches = tiny_batches()
    sweep = critnet.prune_sweep(model, batches, method="neurons", p_prune=[0.0, 0.5], p_bern=[1.0, 0.5], repeats=2)
    assert [(r["p_prune"], r["p_bern"], r["repeat"]) for r in sweep.rows] == [
        (0.0, 0.0, 0), (0.0, 1.0, 0), (0.0, 0.5, 0), (0.5, 1.0, 0), (0.5, 0.5, 0), (0.5, 0.5, 1)]
    assert sweep.rows[0]["top1"] == critnet.evaluate(model, batches)["top1"]
    assert [s["repeats"] for s in sweep.settings] == [1, 1, 1, 1, 2]
    assert "Sweep: Sequential · prune neurons (global) · 48 images" in repr(sweep)
    paths = sweep.report(tmp_path, print_table=False)
    assert sorted(p.name for p in paths) == ["prune_sweep.csv", "prune_sweep.json", "prune_sweep.md",
                                              "prune_sweep.png"]
    assert json.loads((tmp_path / "prune_sweep.json").read_text())["weights_restored_bit_identical"] is True
    assert sweep.plot().axes and "<table>" in sweep._repr_html_()

    # the criticality order from a Ranking object equals the one read back from its CSV
    ranking = critnet.rank(model, batches, unit="channel", perturbation="zero", score="delta_loss",
                           module_types=["Conv2d"])
    by_object = critnet.compare_orders(model, batches, orders=["criticality", "l1"], ratios=[0.25],
                                       criticality=ranking)
    by_file = critnet.compare_orders(model, batches, orders=["criticality", "l1"], ratios=[0.25],
                                     criticality=ranking.to_csv(tmp_path / "ranking.csv"))
    assert by_object.rows == by_file.rows and by_object.rows[0]["channels_pruned"] == 4  # 25 % of 14 filters
    computed = critnet.compare_orders(model, batches, orders=["criticality"], ratios=[0.25])
    assert computed.rows == by_object.rows[:1] and computed.criticality.rows == ranking.rows
    assert state_digest(model) == before


@pytest.mark.parametrize("call, key", [
    (lambda m, d: critnet.rank(m, d, unit="neuron"), "unit: 'neuron' is not one of tensor, channel, activation"),
    (lambda m, d: critnet.rank(m, d, method="fast"), "method: 'fast'"),
    (lambda m, d: critnet.rank(m, d, top_k=0), "top_k: 0 is not an integer >= 1"),
    (lambda m, d: critnet.rank(m, d, levels=[float("nan")]), "levels[0]: nan is not a finite number"),
    (lambda m, d: critnet.rank(m, d, perturbation="bitflip", levels=[40]), "bitflip needs a bit index 0..31"),
    (lambda m, d: critnet.rank(m, d, taylor_order=3), "taylor_order: 3 is not one of 1, 2"),
    (lambda m, d: critnet.rank(m, d, score="accuracy"), "score: 'accuracy'"),
    (lambda m, d: critnet.prune_sweep(m, d, p_prune=[1.5]), "p_prune[0]: 1.5 is outside [0, 1]"),
    (lambda m, d: critnet.prune_sweep(m, d, p_bern=[float("nan")]), "p_bern[0]: nan is outside [0, 1]"),
    (lambda m, d: critnet.compare_orders(m, d, orders=["size"]), "orders[0]: 'size'"),
])
def test_bad_settings_are_one_line_errors_and_leave_the_model_alone(call, key):
    model = tiny_model()
    before = state_digest(model)
    with pytest.raises(critnet.SettingError) as error:
        call(model, tiny_batches(16))
    assert key in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, critnet.CritnetError) and state_digest(model) == before


@pytest.mark.parametrize("analysis", ["rank", "prune_sweep"])
def test_an_interrupt_restores_the_model_and_a_rerun_resumes(tmp_path, monkeypatch, analysis):
    """Ctrl-C (KeyboardInterrupt) lands midway: the model is bit-identical, the partial-results file holds only
    whole records, and the same call with the same resume_dir finishes with the uninterrupted rows."""
    model = tiny_model()
    batches = tiny_batches()
    before = state_digest(model)
    run = {
        "rank": lambda: critnet.rank(model, batches, unit="channel", perturbation="zero", resume_dir=tmp_path / "r"),
        "prune_sweep": lambda: critnet.prune_sweep(model, batches, p_prune=[0.0, 0.3, 0.6], p_bern=[1.0, 0.5],
                                                   repeats=2, resume_dir=tmp_path / "p"),
    }[analysis]
    from critnet.engine.jobs import RecordStore

    appended = []
    real_append = RecordStore.append

    def append_then_interrupt(store, *record):
        real_append(store, *record)
        appended.append(record)
        if len(appended) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RecordStore, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert state_digest(model) == before
    monkeypatch.setattr(RecordStore, "append", real_append)
    resumed = run()
    assert state_digest(model) == before
    (partial,) = (tmp_path / ("r" if analysis == "rank" else "p")).glob("*.jsonl")
    assert all(json.loads(line) for line in partial.read_text().splitlines())
    fresh = {"rank": lambda: critnet.rank(model, batches, unit="channel", perturbation="zero"),
             "prune_sweep": lambda: critnet.prune_sweep(model, batches, p_prune=[0.0, 0.3, 0.6], p_bern=[1.0, 0.5],
                                                        repeats=2)}[analysis]()
    assert resumed.rows == fresh.rows


def test_the_api_runs_without_lightning(gloo_runs):
    """In a fresh interpreter (rank 0 of tests/gloo_runs.py, before its gloo group, with a bare environment):
    critnet.load_model('resnet20'); rank(model, data, unit='tensor', include=['linear']);
    prune_sweep(model, data, p_prune=[0.0, 0.2]); evaluate(model, data) on data = (randn(8, 3, 32, 32), arange(8)),
    then the loaded lightning, pytorch_lightning and torchmetrics modules are listed."""
    import inspect

    from gloo_runs import fresh_process_part

    source = inspect.getsource(fresh_process_part)
    assert "critnet.rank(model, data, unit=\"tensor\", include=[\"linear\"])" in source
    assert json.loads((gloo_runs / "fresh_process.json").read_text())["lightning_modules"] == []


# ---------------------------------------------------------------- the same files as the command line

@requires_shared
def test_rank_writes_the_files_of_the_seed_preset(tmp_path, seed_preset_log_dir):
    log_dir = seed_preset_log_dir  # the preset ranks the first batch of 128 images
    model = critnet.load_model("resnet20", weights=str(RESNET20_WEIGHTS))
    ranking = critnet.rank(model, first_test_images(128), unit="tensor", perturbation="add", levels=(0.1,), include=["weight"],
                           name="resnet20", num_batches=1)
    # same kernels on the same inputs: the same bytes
    assert ranking.to_csv(tmp_path / "ranking.csv").read_bytes() == (log_dir / "ranking.csv").read_bytes()
    ours = json.loads(ranking.to_json(tmp_path / "ranking.json").read_text())
    theirs = json.loads((log_dir / "ranking.json").read_text())
    # the datamodule can tell which images it left out as unreadable; a plain list of batches cannot
    assert (theirs.pop("skipped_images"), theirs.pop("skipped_paths")) == (0, [])
    for record in (ours, theirs):
        for key in ("read_s", "elapsed_s", "stage"):
            record.pop(key)
        record["levels"][0].pop("elapsed_s")
    assert ours == theirs


@requires_shared
def test_prune_sweep_writes_the_rows_of_the_connections_preset(tmp_path):
    from test_prune_cli import run_cli, subset_batches

    args = ("--trainer.callbacks.init_args.p_prune=[0.0, 0.4]", "--trainer.callbacks.init_args.p_bern=[1.0, 0.5]",
            "--trainer.callbacks.init_args.repeats=2")
    log_dir = Path(run_cli(tmp_path / "cli", *args).trainer.log_dir)
    model = critnet.load_model("resnet20", weights=str(RESNET20_WEIGHTS))
    sweep = critnet.prune_sweep(model, subset_batches(), method="connections", p_prune=[0.0, 0.4],
                                p_bern=[1.0, 0.5], repeats=2, name="resnet20")
    assert sweep.to_csv(tmp_path / "prune_sweep.csv").read_bytes() == (log_dir / "prune_sweep.csv").read_bytes()
