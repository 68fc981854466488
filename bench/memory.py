"""Extra peak memory of every analysis against its bound ``memory_budget_mb + one plain forward`` (a benchmark, not a
test).

Each case runs in a fresh process: it loads the model and the data, records the resident set, resets the peak
(``/proc/self/clear_refs``; where that is not allowed the peak since start is used, which can only overstate), runs
the analysis and reports ``VmHWM − RSS before`` as the extra peak, with the wall time. With ``--device cuda`` the
model and data live on the GPU and the extra peak is ``torch.cuda.max_memory_allocated`` above the memory allocated
before the analysis. The bound of a case is its
budget plus the extra peak of one plain ``no_grad`` forward of one batch at the analysis's batch size, measured the
same way in its own process. Cases:

- ResNet50 (torchvision, random weights, ``--images`` random 224×224 images in batches of ``--batch``, 1000 classes):
  ranking of the 64 ``conv1`` channels (naive, exact), of the 1,024 channels of ``layer4.2.conv1``/``conv2`` (exact,
  hybrid with top_k 8, halving with top_k 8), of all 26,560 conv/linear channels by taylor (first and second order);
  a prune sweep (connections, p_prune 0.5); a fault campaign of ``--faults`` weight bit flips.
- ResNet20 on CIFAR-10 (the shared checkpoint and the first ``--cifar-images`` test images in batches of 128): every
  ranking method over all 698 channels (naive over the first 64), a prune sweep, a fault campaign.

Every case at each budget of ``--budgets`` and with none (the default). A case whose analysis said in its one-line
warning that the budget cannot be met is marked and counted apart. The last line is machine-readable:

    worst_peak_over_bound_mb=<most any unwarned bounded case exceeded its bound by; <= 0 when all hold>
    budgets=<b1,b2> warned=<cases that warned>

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/memory.py [--models resnet50,resnet20] [--budgets 300,150]
       [--images 64] [--batch 16] [--threads 2] [--device cpu|cuda] [--json bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR_ROOT = Path("/work/shared/data/cifar10")
CIFAR_WEIGHTS = Path("/work/shared/checkpoints/cifar10/resnet20-12fca82f.th")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rss_mb() -> float:
    return _status_mb("VmRSS")


def hwm_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (the peak then counts from start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------- cases


def load(model_name: str, images: int, batch: int):
    import torch

    torch.manual_seed(0)
    if model_name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50().eval()
        x = torch.randn(images, 3, 224, 224)
        y = torch.randint(0, 1000, (images,))
    else:
        from torchvision import datasets, transforms

        import critnet

        model = critnet.load_model("resnet20", weights=str(CIFAR_WEIGHTS)).eval()
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        ds = torch.utils.data.Subset(datasets.ImageFolder(str(CIFAR_ROOT / "test"), tf), range(images))
        x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=images)))
    data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, images, batch)]
    return model, data


def run_case(case: dict) -> dict:
    """One case in this process: what it measured."""
    import torch

    torch.set_num_threads(case["threads"])
    model, data = load(case["model"], case["images"], case["batch"])
    device = torch.device(case.get("device", "cpu"))
    if device.type == "cuda":  # on a GPU the device's memory is what runs out: model and data live there
        model = model.to(device)
        data = [(x.to(device), y.to(device)) for x, y in data]
    import critnet

    budget = case["budget"]
    analysis, options = case["analysis"], dict(case.get("options", {}))
    # imports and first calls that any analysis pays once (not the analysis's memory)
    import importlib

    module = {"rank": "ranking", "prune": "pruning", "faults": "campaign"}.get(analysis)
    if module is not None:
        importlib.import_module(f"critnet.analyses.{module}")

    import warnings

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        exact_peak = True
    else:
        before = rss_mb()
        exact_peak = reset_peak()
    started = time.perf_counter()
    caught = warnings.catch_warnings(record=True)
    said = caught.__enter__()
    warnings.simplefilter("always")
    if analysis == "forward":
        with torch.no_grad():
            for x, _ in data[:1]:
                model(x)
    elif analysis == "rank":
        critnet.rank(model, data, memory_budget_mb=budget, **options)
    elif analysis == "prune":
        critnet.prune_sweep(model, data, memory_budget_mb=budget, **options)
    elif analysis == "faults":
        critnet.fault_campaign(model, data, memory_budget_mb=budget, **options)
    else:
        raise ValueError(analysis)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    extra = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else hwm_mb()) - before
    caught.__exit__(None, None, None)
    # the one line an analysis prints where the budget cannot be met
    warned = [str(w.message) for w in said if "memory_budget_mb" in str(w.message)]
    return {"extra_mb": extra, "seconds": seconds, "peak_reset": exact_peak, "warned": warned[:1]}


def measure(case: dict, timeout: float = 3000) -> dict:
    """``case`` run in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases(model: str) -> list[tuple[str, str, dict]]:
    """(label, analysis, options) of every case of ``model``."""
    if model == "resnet50":
        late = ["layer4.2.conv1.weight", "layer4.2.conv2.weight"]
        return [
            ("rank naive, conv1 (64 ch)", "rank", {"method": "naive", "include": ["conv1.weight"]}),
            ("rank exact, conv1 (64 ch)", "rank", {"method": "exact", "include": ["conv1.weight"]}),
            ("rank exact, layer4.2 (1,024 ch)", "rank", {"method": "exact", "include": late}),
            ("rank hybrid k=8, layer4.2", "rank", {"method": "hybrid", "top_k": 8, "include": late}),
            ("rank halving k=8, layer4.2", "rank", {"method": "halving", "top_k": 8, "include": late}),
            ("rank taylor, layer4.2", "rank", {"method": "taylor", "include": late}),
            ("rank taylor order 2, layer4.2", "rank", {"method": "taylor", "taylor_order": 2, "include": late}),
            ("rank taylor, all 26,560 conv/linear channels", "rank", {"method": "taylor"}),
            ("prune sweep, connections 0.5", "prune", {"p_prune": [0.5]}),
            ("fault campaign, 20 weight faults", "faults", {"faults": 20, "seed": 0}),
        ]
    return [
        ("rank naive, first 64 ch", "rank", {"method": "naive", "include": ["conv1.weight", "layer1.0.conv1.weight",
                                                                            "layer1.0.conv2.weight",
                                                                            "layer1.1.conv1.weight"]}),
        ("rank exact, 698 ch", "rank", {"method": "exact"}),
        ("rank hybrid k=20", "rank", {"method": "hybrid", "top_k": 20}),
        ("rank halving k=20", "rank", {"method": "halving", "top_k": 20}),
        ("rank taylor order 2", "rank", {"method": "taylor", "taylor_order": 2}),
        ("prune sweep, connections 0.5", "prune", {"p_prune": [0.5]}),
        ("fault campaign, 200 weight faults", "faults", {"faults": 200, "seed": 0}),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="resnet50,resnet20")
    parser.add_argument("--budgets", default="300,150")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cifar-images", type=int, default=256)
    parser.add_argument("--cifar-batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (torch.cuda.max_memory_allocated)")
    parser.add_argument("--only", default=None, help="run only the cases whose label contains this")
    parser.add_argument("--json", default=None, help="write every measurement here")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    records, worst, warned = [], float("-inf"), 0
    print("| model | analysis | budget MB | extra peak MB | bound MB | peak − bound MB | time s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        images, batch = (args.images, args.batch) if model == "resnet50" else (args.cifar_images, args.cifar_batch)
        base = {"model": model, "images": images, "batch": batch, "threads": args.threads, "device": args.device}
        forward = measure({**base, "analysis": "forward", "budget": None})
        records.append({**base, "label": "plain forward, one batch", **forward})
        print(f"| {model} | plain no_grad forward, one batch of {batch} | – | {forward['extra_mb']:.0f} | – | – | "
              f"{forward['seconds']:.2f} |", flush=True)
        for label, analysis, options in cases(model):
            if args.only and args.only not in label:
                continue
            for budget in [*budgets, None]:
                got = measure({**base, "analysis": analysis, "budget": budget, "options": options})
                bound = None if budget is None else budget + forward["extra_mb"]
                over = None if bound is None else got["extra_mb"] - bound
                if over is not None and not got["warned"]:
                    worst = max(worst, over)
                warned += bool(got["warned"])
                records.append({**base, "label": label, "budget": budget, "bound_mb": bound, **got})
                print(f"| {model} | {label} | {'none' if budget is None else f'{budget:.0f}'} | {got['extra_mb']:.0f} | "
                      f"{'–' if bound is None else f'{bound:.0f}'} | {'–' if over is None else f'{over:+.0f}'} | "
                      f"{got['seconds']:.1f} |{' warned: ' + got['warned'][0] if got['warned'] else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    # cases that said, before starting, that the budget cannot be met are counted apart (warned=)
    print(f"worst_peak_over_bound_mb={worst:.0f} budgets={','.join(f'{b:g}' for b in budgets)} warned={warned}")


if __name__ == "__main__":
    main()
