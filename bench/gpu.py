"""GPU benchmark of critnet: exactness of the engine on the device, validate throughput, engine rates, a projection.

One script, sized to finish in well under 8 minutes on one GPU (an H200 was the target); ``--smoke`` runs the same
code on the CPU with tiny sizes in seconds (``tests/test_gpu_bench.py``). Parts, each guarded (an error is recorded
in the JSON under the part's ``error`` and the other parts still run):

a. exactness: ``critnet.rank(method="exact")`` against ``method="naive"`` on a random sample of channel units (zero)
   and tensor units (+0.1), on ResNet50 (random weights, 224×224 random inputs) and on ResNet20 (the shared
   checkpoint and shared test images, read from ``--resnet20-dir``): identical top-1/top-5 percentages (counts over
   the same samples), loss within relative 1e-6, the exact run repeated (deterministic), TF32 off (critnet's
   ``evaluation_mode`` sets it; the flags seen inside a run are recorded).
b. validate throughput: images/s of ``critnet.evaluate`` (the evaluation loop behind ``analyze.py validate``, which
   needs jsonargparse) against a plain PyTorch loop, fp32 and bf16 autocast, with and without channels_last,
   (i) from tensors already on the device, (ii) through a DataLoader over a generated ImageFolder of JPEG files.
c. the exact engine on ResNet50 channel units: unit·images per second of exact, naive and halving on a random sample
   of units, peak device memory against ``memory_budget_mb`` (the extra peak above model and data against the bound
   ``memory_budget_mb`` + one plain forward of one batch: ``worst_peak_over_bound_mb`` in the JSON), and
   ``critnet.engine.suffix.STACK_SAMPLES`` varied.
d. projection: all channel units of ResNet50 × 10,000 images on 1 and 8 GPUs from the measured rates.

Writes ``gpu_report.json`` to ``--out`` and prints a table; the last line is machine-readable:

    gpu_exact_identical=<true|false> gpu_bit_identical=<true|false> validate_img_s=<x> exact_unit_images_per_s=<y>
    projected_hours_8gpu=<z>

(gpu_exact_identical: every check of part a passed; gpu_bit_identical: the losses also equal bit for bit.)

Usage: python bench/gpu.py [--out DIR] [--smoke] [--device cuda] [--workers 8] [--resnet20-dir .gpu_data]
Runs on torch >= 2.1 (the GPU machine has torch 2.11); no jsonargparse or Lightning needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import critnet  # noqa: E402
import critnet.engine.unit_evaluation as engine_core  # noqa: E402
import critnet.engine.suffix as engine_suffix  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET20_CHECKPOINT = "resnet20-12fca82f.th"
REL_TOL = 1e-6  # float32 rounding of a float64 sum of float32 per-sample losses

# Sizes: the full run (one GPU, < 8 min in all) and the smoke run (CPU, seconds).
FULL = dict(
    arch="resnet50", size=224, batch=64,  # ImageNet layout: 1000 classes
    exact_images=256, exact_channel_units=48, exact_tensor_units=12,
    r20_images=256, r20_channel_units=64, r20_tensor_units=16,
    tensor_images=2048, tensor_batch=256, jpeg_images=2048, jpeg_size=256,
    engine_images=512, engine_units=192, naive_units=32, halving_units=256, stack_units=48,
    stack_samples=(None, 64, 256, 512), budgets=(1024.0, 16384.0),
)
SMOKE = dict(  # ResNet20 with random weights stands in for ResNet50: the same code paths, a thousandth of the work
    arch="resnet20", size=8, batch=4,
    exact_images=8, exact_channel_units=3, exact_tensor_units=2,
    r20_images=4, r20_channel_units=3, r20_tensor_units=2,
    tensor_images=4, tensor_batch=4, jpeg_images=4, jpeg_size=24,
    engine_images=32, engine_units=3, naive_units=2, halving_units=8, stack_units=2,
    stack_samples=(None, 8), budgets=(64.0,),
)
TOTAL_IMAGES = 10_000  # the projection: every channel unit of ResNet50 on 10,000 images
RESNET50_CHANNEL_UNITS = 27_560


# ----------------------------------------------------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def allocated_mb(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def sample_units(model, kind: str, n: int, seed: int = 0) -> list:
    """``n`` units drawn uniformly at random (fixed seed), in model order: an unbiased sample of the per-unit cost."""
    units = critnet.select_units(model, kind)
    if n >= len(units):
        return units
    chosen = set(random.Random(seed).sample(range(len(units)), n))
    return [u for i, u in enumerate(units) if i in chosen]


def random_batches(n: int, batch: int, size: int, classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def classes(model) -> int:
    """The number of classes: the out_features of the model's last Linear layer."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def backend_flags() -> dict:
    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


@contextlib.contextmanager
def stack_samples(value: int | None):
    """Set ``critnet.engine.suffix.STACK_SAMPLES`` (read at every stacking decision), for every device type, for
    the duration."""
    saved = engine_suffix.STACK_SAMPLES
    if value is not None:
        engine_suffix.STACK_SAMPLES = {kind: value for kind in saved}
    try:
        yield
    finally:
        engine_suffix.STACK_SAMPLES = saved


@contextlib.contextmanager
def recorded_flags(seen: list):
    """Record the backend flags in force inside critnet's evaluation loop (wraps ``tally_pass`` as the engine's
    baseline pass calls it, under ``evaluation_mode``)."""
    original = engine_core.tally_pass

    def wrapper(*args, **kwargs):
        seen.append(backend_flags())
        return original(*args, **kwargs)

    engine_core.tally_pass = wrapper
    try:
        yield
    finally:
        engine_core.tally_pass = original


def guarded(report: dict, name: str, fn) -> None:
    """Run one part; on any error record it (type, message, traceback tail) and go on."""
    started = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as err:  # noqa: BLE001 - one failing part must not lose the others
        report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        print(f"[{name}] failed: {type(err).__name__}: {err}", flush=True)
    report[name]["part_s"] = round(time.perf_counter() - started, 3)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- a. exactness

def compare(exact_rows: list[dict], naive_rows: list[dict], repeat_rows: list[dict]) -> dict:
    by_unit = {row["unit"]: row for row in naive_rows}
    again = {row["unit"]: row for row in repeat_rows}
    max_abs, max_rel, counts_equal, bit_identical, deterministic = 0.0, 0.0, True, True, True
    for row in exact_rows:
        ref = by_unit[row["unit"]]
        a, b = row["loss"], ref["loss"]
        if not (math.isfinite(a) and math.isfinite(b)):
            same = (a == b) or (math.isnan(a) and math.isnan(b))
            max_abs = max_abs if same else math.inf
            max_rel = max_rel if same else math.inf
            bit_identical &= same
        else:
            max_abs = max(max_abs, abs(a - b))
            max_rel = max(max_rel, abs(a - b) / max(abs(a), abs(b), 1e-300))
            bit_identical &= a == b
        counts_equal &= (row["top1"], row["top5"]) == (ref["top1"], ref["top5"])
        rep = again[row["unit"]]
        deterministic &= (rep["loss"] == a or (math.isnan(rep["loss"]) and math.isnan(a))) and (
            (rep["top1"], rep["top5"]) == (row["top1"], row["top5"]))
    return {
        "units": len(exact_rows),
        "max_abs_dloss": max_abs,
        "max_rel_dloss": max_rel,
        "bit_identical": bool(bit_identical),
        "counts_equal": bool(counts_equal),
        "deterministic": bool(deterministic),
        "passed": bool(counts_equal and deterministic and max_rel <= REL_TOL),
    }


def check_model(model, batches, device, channel_units: int, tensor_units: int, budget: float | None) -> dict:
    model.to(device)
    out: dict = {"samples": sum(len(y) for _, y in batches)}
    for kind, perturbation, levels, n in (("channel", "zero", [0.1], channel_units),
                                          ("tensor", "add", [0.1], tensor_units)):
        units = sample_units(model, kind, n, seed=1)
        flags: list = []
        runs = {}
        with recorded_flags(flags):
            for label, method in (("exact", "exact"), ("naive", "naive"), ("exact_again", "exact")):
                seconds, ranking = timed(lambda: critnet.rank(
                    model, batches, unit=kind, perturbation=perturbation, levels=levels, units=units,
                    method=method, device=device, memory_budget_mb=budget), device)
                runs[label] = (seconds, ranking.rows)
        result = compare(runs["exact"][1], runs["naive"][1], runs["exact_again"][1])
        result.update({
            "perturbation": perturbation if kind == "channel" else "add 0.1",
            "exact_s": runs["exact"][0], "naive_s": runs["naive"][0],
            "tf32_off": all(not f["matmul_allow_tf32"] and not f["cudnn_allow_tf32"] for f in flags)
            if device.type == "cuda" else None,
            "flags_inside": flags[0] if flags else None,
        })
        if device.type == "cuda":
            result["passed"] = bool(result["passed"] and result["tf32_off"])
        out[kind] = result
    return out


def part_exactness(args, sizes, device) -> dict:
    report: dict = {"rel_tol": REL_TOL}
    random_key = f"{sizes['arch']}_random"  # random weights, random inputs; resnet20_shared: the shared checkpoint
    try:
        model = critnet.load_model(sizes["arch"])
        batches = random_batches(sizes["exact_images"], sizes["batch"], sizes["size"], classes(model), seed=0)
        report[random_key] = {"input": sizes["size"], **check_model(
            model, batches, device, sizes["exact_channel_units"], sizes["exact_tensor_units"], args.memory_budget_mb)}
        del model
    except Exception as err:  # noqa: BLE001
        report[random_key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    root = Path(args.resnet20_dir) if args.resnet20_dir else None
    if root is None:
        for candidate in (REPO / ".gpu_data", REPO.parent / "shared"):
            if (candidate / "checkpoints").exists():
                root = candidate
                break
    if root is None or not (root / "checkpoints" / "cifar10" / RESNET20_CHECKPOINT).exists():
        report["resnet20_shared"] = {"skipped": f"no {RESNET20_CHECKPOINT} under .gpu_data or ../shared "
                                         "(run bench/gpu_prepare.sh)"}
    else:
        try:
            from torchvision import datasets, transforms

            tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
            test = datasets.ImageFolder(str(root / "data" / "cifar10" / "test"), tf)
            n = min(sizes["r20_images"], len(test))
            step = max(1, len(test) // n)  # evenly spread over the class-sorted files
            subset = torch.utils.data.Subset(test, list(range(0, len(test), step))[:n])
            batches = list(torch.utils.data.DataLoader(subset, batch_size=128 if not args.smoke else 8))
            model = critnet.load_model("resnet20", str(root / "checkpoints" / "cifar10" / RESNET20_CHECKPOINT))
            report["resnet20_shared"] = {"root": str(root), **check_model(
                model, batches, device, sizes["r20_channel_units"], sizes["r20_tensor_units"], args.memory_budget_mb)}
        except Exception as err:  # noqa: BLE001
            report["resnet20_shared"] = {"error": f"{type(err).__name__}: {err}",
                                  "traceback": traceback.format_exc()[-3000:]}
    checked = [report[k][kind] for k in (random_key, "resnet20_shared") if isinstance(report.get(k), dict)
               for kind in ("channel", "tensor") if kind in report[k]]
    report["passed"] = bool(checked) and all(c["passed"] for c in checked) and "error" not in report[random_key] \
        and "error" not in report.get("resnet20_shared", {})
    report["bit_identical"] = bool(checked) and all(c["bit_identical"] for c in checked)
    report["max_abs_dloss"] = max((c["max_abs_dloss"] for c in checked), default=None)
    return report


# ------------------------------------------------------------------------------------------- b. validate throughput

def plain_loop(model, batches, device, forward_context, channels_last: bool) -> int:
    """A plain PyTorch evaluation: inference_mode, logits, top-1/top-5 and the summed loss (kept on the device)."""
    top1 = torch.zeros((), dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    with torch.inference_mode():
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with forward_context():
                logits = model(x)
            logits = logits.float()
            top1 += (logits.argmax(1) == y).sum()
            top5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum()
            loss += F.cross_entropy(logits, y, reduction="none").double().sum()
            n += len(y)
    int(top1), int(top5), float(loss)  # noqa: B018 - wait for the results
    return n


@contextlib.contextmanager
def exact_flags(device):
    """TF32 off and deterministic cuDNN, as critnet's evaluation_mode sets them."""
    saved = backend_flags()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_allow_tf32"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]


def make_jpeg_tree(root: Path, n: int, size: int, classes: int = 10) -> None:
    """``n`` JPEG files of random smooth images (noise upsampled, so they compress like photos more than noise)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = (torch.rand(3, size // 8 + 1, size // 8 + 1, generator=g) * 255)
        big = F.interpolate(small[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        pixels = big.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def part_validate(args, sizes, device) -> dict:
    from torchvision import datasets, transforms

    model = critnet.load_model(sizes["arch"]).to(device).eval()
    size = sizes["size"]
    on_device = [(x.to(device), y.to(device)) for x, y in random_batches(
        sizes["tensor_images"], sizes["tensor_batch"], size, classes(model), seed=2)]
    precisions = ["fp32", "bf16"]
    autocast_device = "cuda" if device.type == "cuda" else "cpu"
    contexts = {"fp32": contextlib.nullcontext,
                "bf16": lambda: torch.autocast(autocast_device, torch.bfloat16)}
    report: dict = {"note": "critnet.evaluate is the loop behind analyze.py validate (which needs jsonargparse, "
                            "absent on the GPU machine); plain = a plain PyTorch loop with torch's default flags, "
                            "plain_exact_flags = the same with TF32 off and deterministic cuDNN as critnet sets",
                    "tensor_images": sizes["tensor_images"], "batch": sizes["tensor_batch"], "input": size,
                    "configs": []}
    jpeg_dir = tempfile.TemporaryDirectory(prefix="critnet_gpu_jpeg_")
    try:
        started = time.perf_counter()
        make_jpeg_tree(Path(jpeg_dir.name), sizes["jpeg_images"], sizes["jpeg_size"])
        report["jpeg"] = {"images": sizes["jpeg_images"], "file_size": sizes["jpeg_size"], "workers": args.workers,
                          "generate_s": time.perf_counter() - started}
        tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = datasets.ImageFolder(jpeg_dir.name, tf)

        def loader():
            return torch.utils.data.DataLoader(
                folder, batch_size=sizes["tensor_batch"], num_workers=args.workers,
                pin_memory=device.type == "cuda", persistent_workers=False)

        for precision in precisions:
            for channels_last in (False, True):
                config = {"precision": precision, "channels_last": channels_last}
                try:
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    model.to(memory_format=fmt)
                    ctx = contexts[precision]
                    batches = [(x.contiguous(memory_format=fmt), y) for x, y in on_device]
                    n = sum(len(y) for _, y in batches)
                    # warm-up (cuDNN algorithm choice, autocast caches) for both flag settings
                    plain_loop(model, batches[:1], device, ctx, channels_last)
                    critnet.evaluate(model, batches[:1], forward_context=ctx)
                    ev = [n / timed(lambda: critnet.evaluate(model, batches, forward_context=ctx), device)[0]
                          for _ in range(args.repeats)]
                    pl = [n / timed(lambda: plain_loop(model, batches, device, ctx, channels_last), device)[0]
                          for _ in range(args.repeats)]
                    pe = []
                    if device.type == "cuda":  # the flags only matter there
                        with exact_flags(device):
                            plain_loop(model, batches[:1], device, ctx, channels_last)
                            pe = [n / timed(lambda: plain_loop(model, batches, device, ctx, channels_last),
                                            device)[0] for _ in range(args.repeats)]
                    # how much of evaluate's time is building the evaluation set (which hashes every input
                    # tensor on the CPU for its checksum, also when nothing uses it)
                    from critnet.evaluation_set import EvaluationSet

                    set_s = min(timed(lambda: EvaluationSet.from_batches(batches, device=device), device)[0]
                                for _ in range(args.repeats))
                    config["tensors"] = {"evaluate_img_s": max(ev), "plain_img_s": max(pl),
                                         "evaluation_set_s": set_s,
                                         "evaluate_without_set_img_s": n / max(n / max(ev) - set_s, 1e-9),
                                         "plain_exact_flags_img_s": max(pe, default=None),
                                         "runs": {"evaluate": ev, "plain": pl, "plain_exact_flags": pe}}
                    # (ii) through the DataLoader: critnet.evaluate reads all batches (held on the device), then
                    # evaluates; the plain loop overlaps decoding (workers) with the forward passes
                    nj = len(folder)
                    evj = nj / timed(lambda: critnet.evaluate(model, loader(), device=device, forward_context=ctx),
                                     device)[0]
                    plj = nj / timed(lambda: plain_loop(model, loader(), device, ctx, channels_last), device)[0]
                    config["jpeg"] = {"evaluate_img_s": evj, "plain_img_s": plj}
                except Exception as err:  # noqa: BLE001
                    config["error"] = f"{type(err).__name__}: {err}"
                    config["traceback"] = traceback.format_exc()[-2000:]
                report["configs"].append(config)
        model.to(memory_format=torch.contiguous_format)
    finally:
        jpeg_dir.cleanup()
    fp32 = next((c for c in report["configs"] if c["precision"] == "fp32" and not c["channels_last"]
                 and "tensors" in c), None)
    report["validate_img_s"] = fp32["tensors"]["evaluate_img_s"] if fp32 else None
    return report


# ---------------------------------------------------------------------------------------------- c. the exact engine

def part_engine(args, sizes, device) -> dict:
    model = critnet.load_model(sizes["arch"]).to(device).eval()
    from critnet.evaluation_set import EvaluationSet

    batches = random_batches(sizes["engine_images"], sizes["batch"], sizes["size"], classes(model), seed=3)
    data = EvaluationSet.from_batches(batches, device=device)
    n = data.samples
    units = sample_units(model, "channel", sizes["engine_units"], seed=4)
    budget = args.memory_budget_mb
    report: dict = {"arch": sizes["arch"], "input": sizes["size"], "images": n, "batch": sizes["batch"],
                    "memory_budget_mb": budget, "stack_samples_default": engine_suffix.STACK_SAMPLES[torch.device(device).type],
                    "all_channel_units": len(critnet.select_units(model, "channel")), "methods": {}}
    probe = engine_suffix.SuffixEvaluator(model, critnet.Perturbation("zero"), data, budget)
    report["crossing_mb_per_sample"] = probe.bytes_per_sample / 2**20
    report["flop_fraction_exact"] = sum(probe.costs(units)) / (len(units) * probe.traced.full_cost) \
        if probe.traced is not None else None
    every = critnet.select_units(model, "channel")  # the sample's suffix cost against all units' (sampling bias)
    report["flop_fraction_exact_all_units"] = sum(probe.costs(every)) / (len(every) * probe.traced.full_cost) \
        if probe.traced is not None else None
    del probe

    def run(method, chosen, budget_mb, top_k=20):
        reset_peak(device)
        seconds, ranking = timed(lambda: critnet.rank(
            model, data, unit="channel", perturbation="zero", units=chosen, method=method, top_k=top_k,
            memory_budget_mb=budget_mb), device)
        return seconds, ranking, peak_mb(device)

    # the bound of issue #24: a budget B holds the extra peak (above model and data) within B + one plain no_grad
    # forward of one batch, measured the same way
    reset_peak(device)
    held = allocated_mb(device)
    with torch.no_grad():
        model(batches[0][0].to(device))
    forward_extra = None if held is None else peak_mb(device) - held
    report["plain_forward_extra_mb"] = forward_extra

    # warm-up (tracing, cuDNN algorithm choices), then the fixed cost of a call (reading and hashing the set, the
    # baseline pass, tracing, the split-half statistics) from a call with one unit
    run("exact", units[:1], budget)
    fixed_s = run("exact", units[:1], budget)[0]
    for method, chosen in (("exact", units), ("naive", units[: sizes["naive_units"]])):
        seconds, ranking, peak = run(method, chosen, budget)
        report["methods"][method] = {"units": len(chosen), "seconds": seconds, "peak_mb": peak,
                                     "unit_images_per_s": len(chosen) * n / seconds}
        if method == "exact":
            exact_rows = {r["unit"]: r for r in ranking.rows}
            # the rate per added unit, without the fixed cost of the call: what 27,560 units would see
            report["methods"]["exact"]["one_unit_call_s"] = fixed_s
            report["methods"]["exact"]["marginal_unit_images_per_s"] = (
                (len(chosen) - 1) * n / (seconds - fixed_s) if len(chosen) > 1 and seconds > fixed_s else None)
    naive = report["methods"]["naive"]
    naive["exact_equal"] = all(r["loss"] == exact_rows[r["unit"]]["loss"] for r in ranking.rows)
    # halving: a larger sample of units; top_k scaled to the same fraction of units as a top 20 of all units
    halving_units = sample_units(model, "channel", sizes["halving_units"], seed=5)
    top_k = max(1, round(args.top_k * len(halving_units) / report["all_channel_units"]))
    seconds, ranking, peak = run("halving", halving_units, budget, top_k=top_k)
    # unit·images actually evaluated: every stage evaluates the remaining units on its new images
    per_stage = ranking.levels[0].top_k_test["stages"]
    evaluated = ranking.levels[0].top_k_test["unit_images"]
    survivors = sum(1 for r in ranking.rows if r["exact"])
    report["methods"]["halving"] = {
        "units": len(halving_units), "top_k": top_k, "seconds": seconds, "peak_mb": peak,
        "unit_images_per_s": len(halving_units) * n / seconds, "survivors": survivors, "stages": per_stage,
        "work_fraction": evaluated / (len(halving_units) * n),
    }
    # memory budgets (peak device memory against the budget) and stacking, on a subset of the units spread over the
    # model (the same subset for every setting; the reference is the main run's budget and STACK_SAMPLES)
    subset = units[:: max(1, len(units) // sizes["stack_units"])][: sizes["stack_units"]]
    report["settings_units"] = len(subset)
    report["budgets"] = []
    for b in sorted(set(sizes["budgets"]) | {budget}):
        seconds, _, peak = run("exact", subset, b)
        extra = None if held is None or peak is None else peak - held
        bound = None if forward_extra is None or b is None else b + forward_extra
        report["budgets"].append({"memory_budget_mb": b, "seconds": seconds, "peak_mb": peak,
                                  "unit_images_per_s": len(subset) * n / seconds, "extra_mb": extra,
                                  "bound_mb": bound, "over_bound_mb": None if bound is None else extra - bound})
    overs = [r["over_bound_mb"] for r in report["budgets"] if r["over_bound_mb"] is not None]
    report["worst_peak_over_bound_mb"] = max(overs) if overs else None
    report["stacking"] = []
    big = max(max(sizes["budgets"]), budget)
    for value in sizes["stack_samples"]:
        with stack_samples(value):
            effective = engine_suffix.STACK_SAMPLES[torch.device(device).type]
            seconds, _, peak = run("exact", subset, big)
        report["stacking"].append({"stack_samples": effective, "memory_budget_mb": big, "seconds": seconds,
                                   "peak_mb": peak, "unit_images_per_s": len(subset) * n / seconds})
    reference = next(b for b in report["budgets"] if b["memory_budget_mb"] == budget)["unit_images_per_s"]
    best = max(report["budgets"] + report["stacking"], key=lambda r: r["unit_images_per_s"])
    report["best_setting"] = {"memory_budget_mb": best["memory_budget_mb"],
                              "stack_samples": best.get("stack_samples", engine_suffix.STACK_SAMPLES),
                              "speedup_over_default": best["unit_images_per_s"] / reference}
    return report


# -------------------------------------------------------------------------------------------------- d. projection

def part_projection(engine: dict, gpus=(1, 8)) -> dict:
    if "error" in engine:
        raise RuntimeError("no engine rates (part c failed)")
    work = RESNET50_CHANNEL_UNITS * TOTAL_IMAGES
    exact = engine["methods"]["exact"].get("marginal_unit_images_per_s") or engine["methods"]["exact"][
        "unit_images_per_s"]
    best = exact * max(1.0, engine.get("best_setting", {}).get("speedup_over_default", 1.0))
    naive = engine["methods"]["naive"]["unit_images_per_s"]
    flop_correction = (engine["flop_fraction_exact_all_units"] / engine["flop_fraction_exact"]
                       if engine.get("flop_fraction_exact") else 1.0)
    halving = engine["methods"]["halving"]
    out = {
        "units": RESNET50_CHANNEL_UNITS, "images": TOTAL_IMAGES,
        "assumptions": (
            "exact: the marginal rate (the fixed cost of a call, measured with one unit, taken out); rates measured "
            "on a uniform random sample of ResNet50 channel units "
            f"({engine['arch']} at {engine['input']}x{engine['input']}, {engine['images']} images) hold for all "
            "units and for 10,000 images; units are sharded across GPUs (balanced by suffix cost) with one gather "
            "at the end, so time scales near-linearly (the one baseline pass and reading the images per GPU are "
            "left out); certified top-k = halving's measured work fraction (unit·images evaluated / units·images) "
            "applied to the exact time, with halving's top_k scaled to the same fraction of units as a top 20 of "
            "all units; halving's survival on a larger image set is assumed the same"),
        "halving_work_fraction": halving["work_fraction"],
        # halving's time per unit·image over exact's, both measured (fixed costs included): a cross-check
        "halving_time_ratio": engine["methods"]["exact"]["unit_images_per_s"] / halving["unit_images_per_s"],
        "exact_rate_used": exact,
        "hours": {},
    }
    if engine["arch"] != "resnet50":
        out["note"] = f"smoke run: rates are of {engine['arch']} at {engine['input']}px, not ResNet50 at 224px"
    for g in gpus:
        out["hours"][f"{g}gpu"] = {
            "exact": work / exact / g / 3600,
            "exact_best_setting": work / best / g / 3600,
            # the sample's mean suffix FLOPs corrected to all units' (compute-bound assumption)
            "exact_flop_corrected": work / exact / g / 3600 * flop_correction,
            "naive": work / naive / g / 3600,
            "certified_top_k": work * halving["work_fraction"] / exact / g / 3600,
        }
    return out


# ------------------------------------------------------------------------------------------------------ reporting

def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
           if torch.backends.cudnn.is_available() else None, "python": platform.python_version(),
           "device": str(device), "device_name": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "critnet": critnet.__version__}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001
        env["torchvision"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), device_memory_gb=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    return env


def fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:,.{digits}f}"
    return str(value)


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    ex = report.get("exactness", {})
    if "error" in ex:
        rows.append(("a. exactness", "error", ex["error"]))
    for model in [k for k, v in ex.items() if isinstance(v, dict) and ("channel" in v or "error" in v or
                                                                        "skipped" in v)]:
        v = ex[model]
        if "error" in v or "skipped" in v:
            rows.append(("a. exactness", model, v.get("error") or v.get("skipped")))
            continue
        for kind in ("channel", "tensor"):
            c = v[kind]
            rows.append(("a. exactness", f"{model} {kind} ({c['units']} units, {v['samples']} images)",
                         f"passed {fmt(c['passed'])}; bit-identical {fmt(c['bit_identical'])}; counts equal "
                         f"{fmt(c['counts_equal'])}; max |Δloss| {c['max_abs_dloss']:.3g}; deterministic "
                         f"{fmt(c['deterministic'])}; TF32 off {fmt(c['tf32_off'])}"))
    va = report.get("validate", {})
    if "error" in va:
        rows.append(("b. validate", "error", va["error"]))
    for c in va.get("configs", []):
        name = f"{c['precision']}{' channels_last' if c['channels_last'] else ''}"
        if "error" in c:
            rows.append(("b. validate", name, c["error"]))
            continue
        t, j = c["tensors"], c["jpeg"]
        rows.append(("b. validate", f"{name}, tensors on device",
                     f"evaluate {fmt(t['evaluate_img_s'], 0)} img/s (building the set {fmt(t['evaluation_set_s'], 3)}"
                     f" s; without it {fmt(t['evaluate_without_set_img_s'], 0)}); plain {fmt(t['plain_img_s'], 0)} "
                     f"(exact flags {fmt(t['plain_exact_flags_img_s'], 0)})"))
        rows.append(("b. validate", f"{name}, JPEG DataLoader ({va['jpeg']['workers']} workers)",
                     f"evaluate {fmt(j['evaluate_img_s'], 0)} img/s; plain {fmt(j['plain_img_s'], 0)}"))
    en = report.get("engine", {})
    if "error" in en:
        rows.append(("c. engine", "error", en["error"]))
    for method, m in en.get("methods", {}).items():
        extra = ""
        if m.get("marginal_unit_images_per_s"):
            extra = f"; marginal {fmt(m['marginal_unit_images_per_s'], 0)} unit·images/s"
        if method == "halving":
            extra = f"; top {m['top_k']}: {m['survivors']} survivors, work fraction {m['work_fraction']:.3f}"
        rows.append(("c. engine", f"{method} ({m['units']} units × {en['images']} images)",
                     f"{fmt(m['unit_images_per_s'], 0)} unit·images/s; {fmt(m['seconds'], 2)} s; peak "
                     f"{fmt(m['peak_mb'], 0)} MB{extra}"))
    for b in en.get("budgets", []):
        rows.append(("c. engine", f"exact, memory_budget_mb {fmt(b['memory_budget_mb'], 0)}",
                     f"{fmt(b['unit_images_per_s'], 0)} unit·images/s; peak {fmt(b['peak_mb'], 0)} MB; extra "
                     f"{fmt(b.get('extra_mb'), 0)} MB against the bound {fmt(b.get('bound_mb'), 0)} MB"))
    for s in en.get("stacking", []):
        rows.append(("c. engine", f"exact, STACK_SAMPLES {s['stack_samples']}",
                     f"{fmt(s['unit_images_per_s'], 0)} unit·images/s; peak {fmt(s['peak_mb'], 0)} MB"))
    pr = report.get("projection", {})
    if "error" in pr:
        rows.append(("d. projection", "error", pr["error"]))
    for g, h in pr.get("hours", {}).items():
        rows.append(("d. projection", f"{pr['units']:,} units × {pr['images']:,} images, {g}",
                     f"exact {fmt(h['exact'], 2)} h (FLOP-corrected {fmt(h['exact_flop_corrected'], 2)} h, best "
                     f"setting {fmt(h['exact_best_setting'], 2)} h); certified "
                     f"top-k {fmt(h['certified_top_k'], 2)} h; naive {fmt(h['naive'], 2)} h"))
    return rows


def print_table(report: dict) -> None:
    rows = table_rows(report)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"critnet on {report['environment']['device_name']} (torch "
                            f"{report['environment']['torch']}, CUDA {report['environment']['cuda']})")
        for column in ("part", "what", "result"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        Console(width=160).print(table)
    except Exception:  # noqa: BLE001 - rich missing: plain text
        for row in rows:
            print(" | ".join(row))


def last_line(report: dict) -> str:
    ex = report.get("exactness", {})
    en = report.get("engine", {})
    pr = report.get("projection", {})
    rate = pr.get("exact_rate_used") or en.get("methods", {}).get("exact", {}).get("unit_images_per_s")
    hours = pr.get("hours", {}).get("8gpu", {}).get("exact")

    def number(value, digits):
        return "nan" if value is None else f"{value:.{digits}f}"

    # gpu_exact_identical: identical top-1/top-5 counts, loss within REL_TOL, deterministic, TF32 off (all checks);
    # gpu_bit_identical: the losses equal bit for bit as well
    return (f"gpu_exact_identical={fmt(bool(ex.get('passed')))} gpu_bit_identical={fmt(bool(ex.get('bit_identical')))} "
            f"validate_img_s={number(report.get('validate', {}).get('validate_img_s'), 1)} "
            f"exact_unit_images_per_s={number(rate, 1)} projected_hours_8gpu={number(hours, 3)}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="folder for gpu_report.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 8; 0 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per validate setting (best kept)")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="engine memory budget for parts a and c (default 4096; 64 with --smoke)")
    parser.add_argument("--top-k", type=int, default=20, help="the certified top-k of the projection")
    parser.add_argument("--resnet20-dir", default=None,
                        help="folder with checkpoints/cifar10/ and data/cifar10/test/ (default .gpu_data, then "
                             "../shared)")
    parser.add_argument("--parts", default="exactness,validate,engine,projection")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one size (e.g. --set engine_units=96 --set arch=resnet50); see FULL/SMOKE")
    args = parser.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in sizes:
            parser.error(f"--set {item}: unknown size {key!r}; known: {', '.join(sizes)}")
        sizes[key] = value if key == "arch" else json.loads(value)
        if isinstance(sizes[key], list):
            sizes[key] = tuple(sizes[key])
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    args.workers = args.workers if args.workers is not None else (0 if args.smoke else 8)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    args.memory_budget_mb = args.memory_budget_mb if args.memory_budget_mb is not None else (
        64.0 if args.smoke else 4096.0)
    parts = set(args.parts.split(","))
    torch.manual_seed(0)  # the random-weights models are the same in every run
    started, cpu_started = time.perf_counter(), time.process_time()
    report: dict = {"smoke": args.smoke, "environment": environment(device),
                    "settings": {k: v for k, v in vars(args).items()}, "sizes": dict(sizes)}
    print(f"critnet GPU benchmark: {report['environment']['device_name']}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, {'smoke' if args.smoke else 'full'} sizes", flush=True)
    if "exactness" in parts:
        guarded(report, "exactness", lambda: part_exactness(args, sizes, device))
    if "validate" in parts:
        guarded(report, "validate", lambda: part_validate(args, sizes, device))
    if "engine" in parts:
        guarded(report, "engine", lambda: part_engine(args, sizes, device))
    if "projection" in parts:
        guarded(report, "projection", lambda: part_projection(report.get("engine", {"error": "not run"})))
    report["total_s"] = time.perf_counter() - started
    report["cpu_s"] = time.process_time() - cpu_started  # this process's CPU time (DataLoader workers not counted)
    report["last_line"] = last_line(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str, allow_nan=True) + "\n")
    print_table(report)
    print(f"report: {out / 'gpu_report.json'} ({report['total_s']:.1f} s, {report['cpu_s']:.1f} s CPU)")
    print(report["last_line"], flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
