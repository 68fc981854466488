"""Reliability of the public ResNet20 across number formats: one fault campaign per format, the same sampling.

Stores ResNet20 in each of ``--formats`` (float32; bfloat16/float16: the model and its inputs cast; int8:
:func:`critnet.quantize_int8` on ``--calibration-images`` training images) and runs
:func:`critnet.fault_campaign` with single-bit flips over every conv and linear weight and every bit of the
format, ``--faults`` per format shared among the layers in proportion to their weights (so every format samples
each layer alike), on test images spread over the classes. A fault is critical when it changes the top-1 class of
at least one image (SDC-1). Prints markdown tables — critical-fault rates with 95 % intervals per bit field and
per layer, and the share of (fault, image) pairs whose top-1 changed — and a machine-readable last line:

    formats=<f,...> critical_<format>=<rate> sdc1_per_image_<format>=<rate> ... images=<n> faults=<n per format>

Usage: OMP_NUM_THREADS=1 python bench/formats.py [--formats float32,bfloat16,int8] [--faults 2000] [--images 256]
       [--out DIR: each campaign's report]
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
sys.path.insert(0, str(REPO / "bench"))

from faults import spread_batches, stored_in  # noqa: E402

from critnet.analyses.campaign import fault_campaign  # noqa: E402
from critnet.evaluation import evaluate  # noqa: E402
from critnet.models import build_model  # noqa: E402
from critnet.models.checkpoints import load_weights  # noqa: E402


def interval(row: dict, metric: str = "critical") -> str:
    rate, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
    if math.isnan(rate):  # no fault drawn
        return "–"
    return f"{100 * rate:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="float32,bfloat16,int8")
    parser.add_argument("--faults", type=int, default=2000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data/cifar10")
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared/checkpoints/cifar10/resnet20-12fca82f.th")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    test = spread_batches(args.data_root, args.images)
    campaigns = {}
    for number_format in formats:
        model = build_model("resnet20")
        load_weights(model, str(args.weights), "resnet20")
        model, batches = stored_in(number_format, model.eval(), test, args)
        started = time.perf_counter()
        campaign = fault_campaign(model, batches, faults=args.faults, seed=args.seed)
        top1 = evaluate(model, batches)["top1"]
        print(f"{number_format}: {len(campaign.faults)} faults in {time.perf_counter() - started:.1f} s, "
              f"top-1 {top1:.2f} % on the {args.images} images", flush=True)
        campaigns[number_format] = (campaign, top1)
        if args.out is not None:
            campaign.report(args.out / number_format)

    print(f"\nCritical faults (SDC-1 on at least one of {args.images} test images), % of the format's single-bit "
          "faults in conv and linear weights, with 95 % intervals:\n")
    fields = list(dict.fromkeys(r["field"] for c, _ in campaigns.values() for r in c.rates["field"]))
    print("| format | top-1 % | faults | all bits | " + " | ".join(fields) + " | SDC-1 % per image |")
    print("|---|---|---|---|" + "---|" * len(fields) + "---|")
    for number_format, (campaign, top1) in campaigns.items():
        by_field = {r["field"]: r for r in campaign.rates["field"]}
        cells = [interval(by_field[f]) if f in by_field else "n/a" for f in fields]
        overall = campaign.rates["overall"]
        print(f"| {number_format} | {top1:.2f} | {len(campaign.faults)} | {interval(overall)} | " + " | ".join(cells)
              + f" | {interval(overall, 'sdc1_per_image')} |")

    print("\nCritical faults per layer, % with 95 % intervals (faults drawn per layer: the same in every format):\n")
    print("| layer | faults | " + " | ".join(formats) + " |")
    print("|---|---|" + "---|" * len(formats))
    layers = [r["layer"] for r in campaigns[formats[0]][0].rates["layer"]]
    by_layer = {f: {r["layer"]: r for r in c.rates["layer"]} for f, (c, _) in campaigns.items()}
    for layer in layers:
        counts = {by_layer[f][layer]["faults"] for f in formats if layer in by_layer[f]}
        print(f"| {layer} | {'/'.join(str(c) for c in sorted(counts))} | "
              + " | ".join(interval(by_layer[f][layer]) if layer in by_layer[f] else "n/a" for f in formats) + " |")
    rates = " ".join(f"critical_{f}={c.rates['overall']['critical']:.5f} "
                     f"sdc1_per_image_{f}={c.rates['overall']['sdc1_per_image']:.5f}" for f, (c, _) in campaigns.items())
    print(f"\nformats={','.join(formats)} {rates} images={args.images} faults={args.faults}")


if __name__ == "__main__":
    main()
