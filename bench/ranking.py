"""Benchmark of the ranking engine against the naive loop on the public ResNet20 (a benchmark, not a test).

In one run, on the first 256 shared CIFAR-10 test images (channel units, zero ablation: ResNet20's 698 conv and linear
output channels) and the first 1000 (tensor units, +0.1, the original experiment): times the naive loop (perturb,
forward over the already-decoded evaluation set, restore) and every engine mode (taylor also with its second-order
term, "taylor2"), checks that exact scores equal the naive loop's and that hybrid and halving find the exact top 20,
and times ``validate`` against a plain PyTorch loop over the same files. The last line is machine-readable:

    channel_exact_speedup=<x> tensor_exact_speedup=<x> top20_speedup=<x> top20_identical=<true|false> max_abs_diff=<y>

Usage: python bench/ranking.py [--data-root ../shared/data/cifar10] [--weights <resnet20 checkpoint>] [--threads N]
       [--repeats N] [--validate-only | --skip-validate]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import critnet  # noqa: E402
from critnet.engine.suffix import SuffixEvaluator  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_batches(root: Path, n: int, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = torch.utils.data.Subset(datasets.ImageFolder(str(root / "test"), tf), range(n))
    return list(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False))


def top(ranking, k: int) -> list[tuple[str, float]]:
    """The exactly scored top ``k`` as (unit, score) pairs."""
    return [(row["unit"], row["score"]) for row in ranking.rows if row["exact"]][:k]


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def rank_units(model, kind, perturbation, data, label, rows, methods):
    units = critnet.select_units(model, kind)
    evaluator = SuffixEvaluator(model, perturbation, data)  # only for the FLOP lower bound of suffix evaluation
    flop_bound = len(units) * evaluator.traced.full_cost / sum(evaluator.costs(units))
    results = {}
    for method in methods:
        # "taylor2": the taylor method with the second-order (empirical Fisher) term
        engine_method, order = ("taylor", 2) if method == "taylor2" else (method, 1)
        seconds, ranking = timed(lambda: critnet.rank(
            model, data, units=units, perturbation=perturbation.kind, levels=[perturbation.level],
            method=engine_method, top_k=20, taylor_order=order))
        results[method] = (seconds, ranking)
        print(f"  {label:8s} {method:8s} {seconds:8.1f} s", flush=True)
    naive_s, naive = results["naive"]
    exact_s, exact = results["exact"]
    by_unit = {row["unit"]: row for row in naive.rows}
    diff = max(abs(row["loss"] - by_unit[row["unit"]]["loss"]) for row in exact.rows)
    # top-1/top-5 in percent of the same samples: equal percentages are equal correct counts
    counts_equal = all((row["top1"], row["top5"]) == (by_unit[row["unit"]]["top1"], by_unit[row["unit"]]["top5"])
                       for row in exact.rows)
    exact_top = top(exact, 20)
    deltas = {row["unit"]: row["delta_loss"] for row in exact.rows}
    for method in ("taylor", "taylor2"):
        if method not in results:
            continue
        from scipy.stats import kendalltau, spearmanr

        pairs = [(row["estimate"], deltas[row["unit"]]) for row in results[method][1].rows]
        estimates, exact_deltas = zip(*pairs)
        print(f"  {label:8s} {method} vs exact Δloss over all units: Spearman "
              f"{spearmanr(estimates, exact_deltas)[0]:.3f}, Kendall {kendalltau(estimates, exact_deltas)[0]:.3f}")
    for method in ("hybrid", "halving"):
        if method in results:
            ranking = results[method][1]
            print(f"  {label:8s} {method}: {sum(row['exact'] for row in ranking.rows)} of {len(units)} units scored "
                  "exactly")
    summary = {"units": len(units), "samples": exact.samples, "flop_bound": flop_bound, "max_abs_diff": diff,
               "counts_equal": counts_equal, "exact_s": exact_s, "naive_s": naive_s, "top20": {}}
    for method, (seconds, ranking) in results.items():
        identical = None
        if method in ("hybrid", "halving"):
            identical = top(ranking, 20) == exact_top
            summary["top20"][method] = (seconds, identical)
        speedup = naive_s / seconds
        rows.append([label, method, f"{len(units)}", f"{exact.samples}", f"{seconds:.1f}", f"{speedup:.2f}",
                     f"{exact_s / seconds:.2f}",
                     f"{speedup / flop_bound:.2f}" if method == "exact" else "",
                     "" if identical is None else str(identical).lower()])
    return summary


def validate_throughput(root: Path, weights: Path, batch_size: int, workers: int, repeats: int) -> tuple[list, list]:
    """Images per second of ``python analyze.py validate`` (its own timing of the validation loop, from
    ``metrics.json``) and of ``bench/plain_validate.py`` (a plain PyTorch loop over the same files with the same
    loader settings, timed from its loader's start), each in a fresh process with the same thread settings,
    ``repeats`` times each, interleaved so that a busy spell on the machine hits both alike."""
    import json
    import os
    import subprocess
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))

    def plain() -> float:
        command = [sys.executable, str(REPO / "bench" / "plain_validate.py"), "--data-root", str(root), "--weights",
                   str(weights), "--batch-size", str(batch_size), "--num-workers", str(workers)]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"plain_validate.py failed:\n{proc.stderr[-3000:]}")
        fields = dict(item.split("=") for item in proc.stdout.split())
        return int(fields["samples"]) / float(fields["elapsed_s"])

    def validate() -> float:
        with tempfile.TemporaryDirectory() as run_dir:
            command = [sys.executable, str(REPO / "analyze.py"), "validate", "-c",
                       str(REPO / "critnet/presets/resnet20_cifar10.yaml"), "--data.root", str(root), "--model.weights",
                       str(weights), "--data.batch_size", str(batch_size), "--data.num_workers", str(workers),
                       "--trainer.default_root_dir", run_dir, "--trainer.enable_progress_bar", "false",
                       "--trainer.accelerator", "cpu"]
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"analyze.py validate failed:\n{proc.stderr[-3000:]}")
            metrics = json.loads(next(Path(run_dir).rglob("metrics.json")).read_text())
        return metrics["samples"] / metrics["elapsed_s"]

    validate_ips, plain_ips = [], []
    for _ in range(repeats):
        validate_ips.append(validate())
        plain_ips.append(plain())
    return validate_ips, plain_ips


def report_throughput(validate_ips: list[float], plain_ips: list[float]) -> float:
    """Print every run, the ratio of the best runs (the least disturbed by other jobs) and the median of the
    ratios of consecutive pairs; return the ratio of the best runs."""
    ratio = max(validate_ips) / max(plain_ips)
    pairs = sorted(v / p for v, p in zip(validate_ips, plain_ips))
    print(f"validate: {' / '.join(f'{v:.0f}' for v in validate_ips)} images/s, plain PyTorch loop: "
          f"{' / '.join(f'{v:.0f}' for v in plain_ips)} images/s; best {max(validate_ips):.0f} vs "
          f"{max(plain_ips):.0f}, ratio {ratio:.3f}; median ratio of pairs {pairs[len(pairs) // 2]:.3f}")
    return ratio


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10" / "resnet20-12fca82f.th"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the validate comparison")
    parser.add_argument("--skip-validate", action="store_true", help="leave out the validate throughput part")
    parser.add_argument("--validate-only", action="store_true", help="only the validate throughput part")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of validate and the plain loop")
    args = parser.parse_args(argv)
    root, weights = Path(args.data_root), Path(args.weights)
    for path, flag in ((root / "test", "--data-root"), (weights, "--weights")):
        if not path.exists():
            parser.error(f"{flag}: {path} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = critnet.load_model("resnet20", str(weights))
    model.eval()
    print(f"ResNet20 {weights.name}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    if args.validate_only:
        report_throughput(*validate_throughput(root, weights, 128, args.workers, args.repeats))
        return

    rows: list[list[str]] = []
    all_methods = ["naive", "exact", "taylor", "taylor2", "hybrid", "halving"]
    channel = rank_units(model, "channel", critnet.Perturbation("zero"), critnet.EvaluationSet.from_batches(load_batches(root, 256)),
                         "channel", rows, all_methods)
    tensor = rank_units(model, "tensor", critnet.Perturbation("add", 0.1), critnet.EvaluationSet.from_batches(load_batches(root, 1000)),
                        "tensor", rows, ["naive", "exact", "taylor", "taylor2"])

    header = ["units", "method", "n", "images", "time s", "× naive", "× exact", "of FLOP bound", "top-20 = exact"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for name, s in (("channel", channel), ("tensor", tensor)):
        print(f"{name}: {s['units']} units on {s['samples']} images; FLOP lower bound of exact = {s['flop_bound']:.2f}× "
              f"naive; identical top-1/top-5 counts: {str(s['counts_equal']).lower()}; "
              f"largest |Δscore| to naive: {s['max_abs_diff']:.3g}")

    if not args.skip_validate:
        report_throughput(*validate_throughput(root, weights, 128, args.workers, args.repeats))

    fastest_method, (fastest_s, identical) = min(channel["top20"].items(), key=lambda kv: kv[1][0])
    top20_identical = all(ok for _, ok in channel["top20"].values())
    max_diff = max(channel["max_abs_diff"], tensor["max_abs_diff"])
    if not (channel["counts_equal"] and tensor["counts_equal"]):
        max_diff = max(max_diff, math.inf)  # different correct counts are never "equal scores"
    print(f"fastest top-20 method: {fastest_method}")
    print(
        f"channel_exact_speedup={channel['naive_s'] / channel['exact_s']:.2f} "
        f"tensor_exact_speedup={tensor['naive_s'] / tensor['exact_s']:.2f} "
        f"top20_speedup={channel['exact_s'] / fastest_s:.2f} "
        f"top20_identical={str(top20_identical).lower()} "
        f"max_abs_diff={max_diff:.3g}"
    )


if __name__ == "__main__":
    main()
