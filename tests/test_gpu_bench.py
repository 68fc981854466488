"""bench/gpu.py in its --smoke mode on the CPU: every part runs, the JSON has its structure, the exactness checks pass.

Run in-process (the benchmark's imports are the test session's), so the test takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_WEIGHTS = REPO.parent / "shared" / "checkpoints" / "cifar10" / "resnet20-12fca82f.th"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_report(gpu_bench, tmp_path, capsys):
    import critnet.engine.suffix as suffix

    stack = suffix.STACK_SAMPLES
    gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    assert suffix.STACK_SAMPLES == stack  # the monkeypatch is undone

    report = json.loads((tmp_path / "gpu_report.json").read_text())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert sorted(fields) == ["exact_unit_images_per_s", "gpu_bit_identical", "gpu_exact_identical",
                              "projected_hours_8gpu", "validate_img_s"]
    assert fields["gpu_exact_identical"] == fields["gpu_bit_identical"] == "true" and last == report["last_line"]
    for key in ("validate_img_s", "exact_unit_images_per_s", "projected_hours_8gpu"):
        assert float(fields[key]) > 0
    assert float(fields["exact_unit_images_per_s"]) == round(report["projection"]["exact_rate_used"], 1)

    assert report["smoke"] is True
    assert {"torch", "cuda", "device_name", "device"} <= set(report["environment"])
    for part in ("exactness", "validate", "engine", "projection"):
        assert "error" not in report[part], report[part].get("traceback")

    # a. exactness: on the CPU the exact engine equals the naive loop bit for bit, twice
    exactness = report["exactness"]
    assert exactness["passed"] is True and exactness["bit_identical"] is True and exactness["max_abs_dloss"] == 0
    models = [report["sizes"]["arch"] + "_random"]
    if SHARED_WEIGHTS.is_file() or (REPO / ".gpu_data" / "checkpoints").is_dir():
        models.append("resnet20_shared")
    for model in models:
        for kind in ("channel", "tensor"):
            check = exactness[model][kind]
            assert check["units"] > 0
            assert check["passed"] and check["counts_equal"] and check["deterministic"] and check["bit_identical"]
            assert check["max_abs_dloss"] == 0 and check["max_rel_dloss"] == 0

    # b. validate throughput: 4 settings, each from tensors and through the JPEG DataLoader
    configs = report["validate"]["configs"]
    assert [(c["precision"], c["channels_last"]) for c in configs] == [
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    for config in configs:
        assert "error" not in config, config.get("traceback")
        assert config["tensors"]["evaluate_img_s"] > 0 and config["tensors"]["plain_img_s"] > 0
        assert config["tensors"]["plain_exact_flags_img_s"] is None  # measured on CUDA only
        assert config["tensors"]["evaluation_set_s"] > 0 and config["tensors"]["evaluate_without_set_img_s"] > 0
        assert config["jpeg"]["evaluate_img_s"] > 0 and config["jpeg"]["plain_img_s"] > 0

    # c. the engine: rates of the three methods, halving's stages, budgets and stacking
    engine = report["engine"]
    for method in ("exact", "naive", "halving"):
        assert engine["methods"][method]["unit_images_per_s"] > 0
    assert engine["methods"]["naive"]["exact_equal"] is True
    halving = engine["methods"]["halving"]
    # 32 images are fewer than halving's first stage: one stage, every unit on every image
    assert [s["images"] for s in halving["stages"]] == [32] and halving["work_fraction"] == 1
    assert halving["top_k"] <= halving["survivors"] <= halving["units"]
    assert [s["stack_samples"] for s in engine["stacking"]] == [stack["cpu"], 8]  # the smoke run is on the CPU
    assert [b["memory_budget_mb"] for b in engine["budgets"]] == [64.0]  # the smoke budget is the main one
    assert engine["best_setting"]["speedup_over_default"] > 0

    # d. the projection, for 1 and 8 GPUs
    hours = report["projection"]["hours"]
    assert set(hours) == {"1gpu", "8gpu"}
    for g in hours.values():
        assert all(math.isfinite(v) and v > 0 for v in g.values())
    assert math.isclose(hours["1gpu"]["exact"], 8 * hours["8gpu"]["exact"])
    assert "note" in report["projection"]  # smoke rates are not ResNet50's
