"""Support matrix: every torchvision classification model through critnet, on random weights, and one Hugging Face
transformers classifier per family (``hf/<hub id>``, built offline from its published configuration) when
transformers is installed.

Per model, at the smallest input it accepts: does torch.fx trace it; how many units of each kind it has; do the
exact (suffix-only) and naive engines agree on a sample of units (identical correct counts, loss within
``rel_tol``); seconds per unit of each; one two-setting DWP prune sweep (``dwp_masks`` + ``pruned`` + ``evaluate``)
with the weights checked bit-identical afterwards.

Each model runs in its own process with a time limit, and its record is appended to a JSON file at once, so the
matrix grows over several runs (``--models a,b,c``) and a crash or timeout costs one row. The markdown table
lists every torchvision classifier and the transformers ones; models without a record say "not run". The last line printed is one JSON
object summarising the table.

    PYTHONPATH=. python bench/models.py --models mobilenet_v3_small,vit_b_16 --results bench/results/models.json
    PYTHONPATH=. python bench/models.py --table-only --results bench/results/models.json
    PYTHONPATH=. python bench/models.py --models hf   # the transformers rows only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REL_TOL = 1e-6
KINDS = ("tensor", "channel", "activation", "head")
SAMPLED_KINDS = ("channel", "activation", "head")
DEFAULT_IMAGES = 4
#: One transformers image classifier per family critnet supports (ViT, DeiT, BEiT, Swin, ConvNeXt).
HF_MODELS = ("hf/google/vit-base-patch16-224", "hf/facebook/deit-small-patch16-224",
             "hf/microsoft/beit-base-patch16-224", "hf/microsoft/swin-tiny-patch4-window7-224",
             "hf/facebook/convnext-tiny-224")


def state_checksum(model) -> str:
    from critnet.digests import state_digest

    return state_digest(model)


def spread(units: list, count: int) -> list:
    if len(units) <= count:
        return units
    return [units[round(i * (len(units) - 1) / (count - 1))] for i in range(count)]


def measure(name: str, units_per_kind: int, images: int, classes: int) -> dict:
    """The support-matrix record of one model (run in a child process)."""
    import torch

    import critnet
    from critnet.evaluation_set import EvaluationSet
    from critnet.engine import evaluate_units
    from critnet.engine.pruning_masks import dwp_masks, pruned
    from critnet.engine.suffix import trace_failure
    from critnet.models import get_model_spec
    from critnet.perturb import Perturbation
    from critnet.selection import select_units

    torch.manual_seed(0)
    spec = get_model_spec(name)
    size = spec.smallest_input
    record: dict = {"model": name, "input": size, "images": images, "failure": None}
    model = spec.factory(num_classes=classes).eval()
    record["params"] = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(images, 3, size, size, generator=generator),
                torch.randint(0, classes, (images,), generator=generator))]
    data = EvaluationSet.from_batches(batches)
    traced, reason = trace_failure(model)
    record["traced"] = traced is not None
    record["trace_failure"] = reason
    del traced
    counts, selected = {}, {}
    for kind in KINDS:
        try:
            units = select_units(model, kind)
        except ValueError:
            units = []
        counts[kind] = len(units)
        selected[kind] = units
    record["units"] = counts
    sample = [u for kind in SAMPLED_KINDS for u in spread(selected[kind], units_per_kind)]
    record["sampled_units"] = len(sample)
    perturbation = Perturbation("zero")
    before = state_checksum(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        exact = evaluate_units(model, sample, perturbation, data, method="exact")
        record["s_per_unit_exact"] = (time.perf_counter() - start) / len(sample)
    record["fallback"] = "; ".join(sorted({str(w.message) for w in caught if "full forward passes" in str(w.message)}))
    start = time.perf_counter()
    naive = evaluate_units(model, sample, perturbation, data, method="naive")
    record["s_per_unit_naive"] = (time.perf_counter() - start) / len(sample)
    mismatches = [
        e.unit.label for e, n in zip(exact, naive)
        if (e.total.top1_correct, e.total.top5_correct) != (n.total.top1_correct, n.total.top5_correct)
        or not math.isclose(e.total.loss_sum, n.total.loss_sum, rel_tol=REL_TOL)
    ]
    record["exact_equals_naive"] = not mismatches
    record["mismatches"] = mismatches[:5]
    sweep = []
    for p_prune in (0.0, 0.3):
        masks = dwp_masks(model, "connections", p_prune=p_prune, include_linear=True)
        with pruned(model, masks):
            result = critnet.evaluate(model, batches)
        sweep.append({"p_prune": p_prune, "ratio": masks.ratio, "loss": result["loss"],
                      "top1_correct": result["top1_correct"]})
    record["prune_sweep"] = sweep
    record["restored_bit_identical"] = state_checksum(model) == before
    return record


def run_child(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", name, "--units", str(args.units), "--images", str(args.images),
               "--classes", str(args.classes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "failure": f"timeout after {args.timeout} s", "seconds": args.timeout}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "failure": f"exit {done.returncode}: {tail[:200]}",
                "seconds": time.perf_counter() - start}
    record = json.loads(lines[-1])
    record["seconds"] = time.perf_counter() - start
    return record


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def all_models() -> list[str]:
    import torchvision

    from critnet.models.hf_models import transformers_installed

    return torchvision.models.list_models(module=torchvision.models) + (list(HF_MODELS) if transformers_installed()
                                                                         else [])


def smallest_first(names: list[str]) -> list[str]:
    """torchvision models in order of their parameter count, so a run cut short has covered the most models; then
    the transformers ones."""
    import torchvision

    hf = [n for n in names if n in HF_MODELS]
    rest = [n for n in names if n not in HF_MODELS]
    return sorted(rest, key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"]) + hf


def cell(value) -> str:
    return "" if value is None else str(value).replace("|", "\\|")


def table(results: dict) -> tuple[str, dict]:
    rows = ["| model | params (M) | input | tensor | channel | activation | head | traced | exact = naive "
            "| s/unit exact | s/unit naive | prune sweep: loss at p_prune 0 → 0.3 | failure or fallback |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {"models": 0, "run": 0, "traced": 0, "exact_equals_naive": 0, "failed": 0, "not_run": 0}
    for name in all_models():
        summary["models"] += 1
        r = results.get(name)
        if r is None:
            summary["not_run"] += 1
            rows.append(f"| {name} | | | | | | | | | | | | not run |")
            continue
        if "units" not in r:
            summary["failed"] += 1
            rows.append(f"| {name} | | | | | | | | | | | | {cell(r['failure'])} |")
            continue
        summary["run"] += 1
        summary["traced"] += bool(r["traced"])
        summary["exact_equals_naive"] += bool(r["exact_equals_naive"])
        u = r["units"]
        sweep = " → ".join(f"{s['loss']:.3f}" for s in r["prune_sweep"])
        note = r.get("trace_failure") or r.get("fallback") or ""
        if r["mismatches"]:
            note = f"mismatch: {', '.join(r['mismatches'])} {note}"
        if not r["restored_bit_identical"]:
            note = f"weights not restored! {note}"
        # records from before the image count was kept were all made with the default
        images = r.get("images", DEFAULT_IMAGES)
        size = f"{r['input']} ({images} image{'s' if images > 1 else ''})" if images != DEFAULT_IMAGES else r["input"]
        rows.append(
            f"| {name} | {r['params'] / 1e6:.1f} | {size} | {u['tensor']} | {u['channel']} | {u['activation']} "
            f"| {u['head']} | {'yes' if r['traced'] else 'no'} | {'yes' if r['exact_equals_naive'] else 'NO'} "
            f"({r['sampled_units']}) | {r['s_per_unit_exact']:.3f} | {r['s_per_unit_naive']:.3f} | {sweep} "
            f"| {cell(note)} |"
        )
    return "\n".join(rows), summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (torchvision or hf/<id>; 'hf' for every hf/ row; "
                        "default: every classifier)")
    parser.add_argument("--results", default="bench/results/models.json", help="JSON file the records go to")
    parser.add_argument("--table", default="bench/results/models.md", help="markdown file the table goes to")
    parser.add_argument("--redo", action="store_true", help="measure models that already have a record again")
    parser.add_argument("--table-only", action="store_true", help="only write the table from the records")
    parser.add_argument("--units", type=int, default=3, help="units sampled per kind (channel, activation, head)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="random images in the evaluation batch")
    parser.add_argument("--classes", type=int, default=1000, help="classifier outputs")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.units, args.images, args.classes)))
        return
    path = Path(args.results)
    results = load_results(path)
    names = args.models.split(",") if args.models else smallest_first(all_models())
    names = [m for n in names for m in (HF_MODELS if n == "hf" else (n,))]
    unknown = sorted(set(names) - set(all_models()))
    if unknown:
        parser.error(f"--models: not in the matrix (torchvision classifiers, {', '.join(HF_MODELS)} with "
                     f"transformers installed): {', '.join(unknown)}")
    if not args.table_only:
        for name in names:
            if name in results and not args.redo:
                continue
            record = run_child(name, args)
            results[name] = record
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1, sort_keys=True))
            print(f"{name}: {record.get('failure') or 'ok'} ({record['seconds']:.0f} s)", flush=True)
    markdown, summary = table(results)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(markdown + "\n")
    print(markdown)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
