"""Benchmark of halving's top 20 against the exact ranking, with each bound (a benchmark, not a test).

ResNet20 with the shared checkpoint, all 698 conv and linear output channels zeroed one at a time (the units of
the ``rank_neurons`` preset), scored by Δloss on the CIFAR-10 test split, read through critnet's own CIFAR-10
datamodule (the images the command line ranks). In one run it times

- the exact ranking on 1,000 test images spread evenly over the class-sorted split (every 10th); the exact method's
  cost is linear in the images, so ten times its time stands in for the exact ranking of all 10,000;
- ``method="halving"`` (top 20, ``top_k_confidence`` 0.99) on all 10,000 images with each bound: ``betting`` (the
  default, finite-sample) and ``normal`` (nominal), optionally also on smaller sets spread evenly (``--scaling``).

With ``--exact-csv`` (the ``ranking.csv`` of an exact run on the whole split, of the ``rank_neurons`` preset, or
any CSV with ``rank,unit,score`` rows of the exact top 20) it checks each top 20: the same units in the same order,
and the same scores within 1e-6 relative (the reference may come from another CPU, which rounds float32
differently). Times are wall seconds and this process's CPU seconds (with one intra-op thread the CPU time is the
steadier measure when other jobs share the machine). The last line is machine-readable:

    topk_speedup=<x> cpu_speedup=<x> top20_identical=<..> units_at_full_set=<n> guarantee=<..>
    normal_speedup=<x> normal_cpu_speedup=<x> normal_top20_identical=<..> normal_units_at_full_set=<n>

Usage: python bench/topk.py [--data-root ../shared/data/cifar10] [--weights <resnet20 checkpoint>]
       [--exact-csv runs/.../ranking.csv] [--threads 1] [--bounds betting,normal] [--out bench/results/topk.json]
       python bench/topk.py --compare bench/results/topk.json --exact-csv runs/.../ranking.csv
       (checks the top k a finished run recorded against a reference that was not ready when it ran)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import critnet  # noqa: E402
from critnet.engine import certify  # noqa: E402
from critnet.evaluation_set import EvaluationSet  # noqa: E402

OPTIONS = dict(unit="channel", perturbation="zero", include=["weight"], module_types=["Conv2d", "Linear"],
               score="delta_loss")


def load_split(root: Path) -> EvaluationSet:
    """The whole test split in dataset order, decoded once, as the command line's datamodule delivers it."""
    from critnet.data import CIFAR10DataModule

    module = CIFAR10DataModule(str(root), batch_size=128, num_workers=0, pin_memory=False)
    module.setup("validate")
    return EvaluationSet.from_batches(module.analysis_dataloader())


def spread(data: EvaluationSet, images: int) -> EvaluationSet:
    """``images`` positions spread evenly over the (class-sorted) set."""
    if images >= data.samples:
        return data
    return data.subset([int(i * data.samples / images) for i in range(images)])


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def cpu_timed(fn):
    """Wall and CPU seconds of ``fn`` (the CPU time of this process, all its threads): with one intra-op thread the
    CPU time hardly changes when other jobs share the machine, where the wall time grows with them."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def work_fraction(test: dict, units: int) -> float:
    """Unit·images halving evaluated, as a fraction of the exact ranking's (every unit on every image)."""
    return test["unit_images"] / (units * test["stages"][-1]["images"])


def read_reference(path: Path, k: int) -> list[tuple[str, float]]:
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("exact", "True") == "True"]
    rows.sort(key=lambda row: int(row["rank"]))
    return [(row["unit"], float(row["score"])) for row in rows[:k]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10" / "resnet20-12fca82f.th"))
    parser.add_argument("--exact-csv", default=None, help="ranking.csv of an exact run on the whole test split")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--confidence", type=float, default=0.99, help="top_k_confidence")
    parser.add_argument("--scaling", default="", help="smaller sets for the speedup's growth, e.g. 1000,2500")
    parser.add_argument("--bounds", default="betting,normal", help="halving's bounds to run, in this order")
    parser.add_argument("--images", type=int, default=10_000,
                        help="the set (spread evenly over the split; the exact part runs on a tenth of it)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "topk.json"))
    parser.add_argument("--compare", default=None, metavar="REPORT",
                        help="only check the top k recorded in REPORT (a finished run's JSON) against --exact-csv")
    args = parser.parse_args(argv)
    if args.compare is not None:
        if args.exact_csv is None or not Path(args.exact_csv).is_file() or not Path(args.compare).is_file():
            parser.error("--compare: needs an existing report and --exact-csv naming an existing ranking.csv")
        compare(Path(args.compare), args.exact_csv)
        return
    root, weights = Path(args.data_root), Path(args.weights)
    for path, flag in ((root / "test", "--data-root"), (weights, "--weights")):
        if not path.exists():
            parser.error(f"{flag}: {path} does not exist")
    if args.exact_csv is not None and not Path(args.exact_csv).is_file():
        parser.error(f"--exact-csv: {args.exact_csv} is not a file")
    torch.set_num_threads(args.threads)

    model = critnet.load_model("resnet20", str(weights)).eval()
    read_s, data = timed(lambda: spread(load_split(root), args.images))
    print(f"ResNet20 {weights.name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{data.samples} test images read in {read_s:.1f} s", flush=True)
    k = args.top_k

    tenth = data.samples // 10
    exact_s, exact_cpu_s, exact = cpu_timed(lambda: critnet.rank(model, spread(data, tenth), method="exact", top_k=k,
                                                                 **OPTIONS))
    per_image_s, per_image_cpu_s = exact_s / tenth, exact_cpu_s / tenth
    units = len(exact.units)
    print(f"exact: {units} units on {tenth} images in {exact_s:.1f} s ({exact_cpu_s:.1f} CPU s) → "
          f"{per_image_s * data.samples:.0f} s projected for {data.samples}", flush=True)

    runs = []
    sizes = sorted({int(s) for s in args.scaling.split(",") if s and int(s) < data.samples} | {data.samples})
    bounds = [b for b in args.bounds.split(",") if b]
    for bound in bounds:
        for images in sizes:
            seconds, cpu_s, ranking = cpu_timed(lambda: critnet.rank(model, spread(data, images), method="halving",
                                                                     top_k=k, top_k_confidence=args.confidence,
                                                                     bound=bound, **OPTIONS))
            level = ranking.summary["levels"][0]
            test = level["top_k_test"]
            run = {"bound": bound, "images": images, "seconds": seconds, "exact_seconds": per_image_s * images,
                   "speedup": per_image_s * images / seconds, "cpu_seconds": cpu_s,
                   "exact_cpu_seconds": per_image_cpu_s * images, "cpu_speedup": per_image_cpu_s * images / cpu_s, "work_fraction": work_fraction(test, units),
                   "units_at_full_set": test["units_at_full_set"], "guarantee": test["guarantee"],
                   "largest_value": test.get("largest_value"), "stages": test["stages"], "boundary": level["boundary"],
                   "top": [(row["unit"], row["score"]) for row in ranking.rows if row["exact"]][:k]}
            run["top_identical"], run["mismatches"] = check(run["top"], args.exact_csv, k) if images == data.samples \
                else ("unchecked", [])
            runs.append(run)
            print(f"halving ({bound}) on {images} images: {seconds:.1f} s, {run['speedup']:.2f}× the exact time "
                  f"({cpu_s:.1f} CPU s, {run['cpu_speedup']:.2f}× the exact CPU time), "
                  f"{run['work_fraction']:.3f} of its unit·images, {run['units_at_full_set']} units at the full set, "
                  f"guarantee {run['guarantee']}; "
                  + "; ".join(f"{s['units']}→{s['units'] - s['eliminated']} at {s['images']}" for s in test["stages"]),
                  flush=True)

    print()
    print(f"| bound | images | exact s (from {tenth} images) | halving s | speedup | CPU-time speedup | unit·images "
          f"| units at full set |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['bound']} | {run['images']} | {run['exact_seconds']:.0f} | {run['seconds']:.0f} | "
              f"{run['speedup']:.2f}× | {run['cpu_speedup']:.2f}× | {run['work_fraction']:.3f} | "
              f"{run['units_at_full_set']} |")

    report = {"units": units, "images": data.samples, "threads": torch.get_num_threads(), "top_k": k,
              "top_k_confidence": args.confidence, "first_stage": certify.FIRST_STAGE, "exact_images": tenth,
              "exact_s": exact_s, "exact_cpu_s": exact_cpu_s, "runs": runs, "reference": args.exact_csv,
              "command": " ".join(["python", "bench/topk.py", *(argv if argv is not None else sys.argv[1:])])}
    finish(report, Path(args.out))


def check(top: list, exact_csv: str | None, k: int) -> tuple[str, list]:
    """Whether the certified top ``k`` equals the exact top ``k`` of ``exact_csv``: the same units in the same
    order, scores within 1e-6 relative; "unchecked" without a reference."""
    if exact_csv is None:
        return "unchecked", []
    reference = read_reference(Path(exact_csv), k)
    mismatches = []
    for position, ((unit, score), (ref_unit, ref_score)) in enumerate(zip(top, reference), 1):
        if unit != ref_unit or abs(score - ref_score) > 1e-6 * abs(ref_score):
            mismatches.append({"rank": position, "certified": [unit, score], "exact": [ref_unit, ref_score]})
    identical = str(len(top) == len(reference) == k and not mismatches).lower()
    print(f"certified top {k} against {exact_csv}: {identical}"
          + (f" (first mismatch: {mismatches[0]})" if mismatches else ""), flush=True)
    return identical, mismatches


def finish(report: dict, out: Path) -> None:
    parts = []
    for bound, prefix in (("betting", ""), ("normal", "normal_")):
        full = [r for r in report["runs"] if r["bound"] == bound and r["images"] == report["images"]]
        if not full:
            continue
        run = full[-1]
        boundary = run["boundary"]
        run["overlap_at_boundary"] = (None if boundary is None
                                      else boundary["overlapping"]["above"] + boundary["overlapping"]["below"])
        speedup = "topk_speedup" if bound == "betting" else "normal_speedup"
        parts.append(f"{speedup}={run['speedup']:.2f} {prefix}cpu_speedup={run.get('cpu_speedup', math.nan):.2f} "
                     f"{prefix}top20_identical={run['top_identical']} "
                     f"{prefix}units_at_full_set={run['units_at_full_set']}"
                     + (f" guarantee={run['guarantee'].split(':')[0]}" if bound == "betting" else ""))
    last = " ".join(parts)
    report["last_line"] = last
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    print(last)


def compare(report_path: Path, exact_csv: str) -> None:
    """``--compare``: check the top k each full-set run recorded (its JSON report) against ``exact_csv`` and rewrite
    the report and its last line; the timings stay those of that run."""
    report = json.loads(report_path.read_text())
    for run in report["runs"]:
        if run["images"] == report["images"]:
            run["top_identical"], run["mismatches"] = check([tuple(t) for t in run["top"]], exact_csv, report["top_k"])
    report["reference"] = exact_csv
    finish(report, report_path)


if __name__ == "__main__":
    main()
