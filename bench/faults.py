"""Benchmark of the fault-injection campaign against a naive loop on the public ResNet20 (a benchmark, not a test).

Draws single-bit faults over every conv and linear weight of ResNet20 and all 32 bits (uniformly over weights:
the strata share the total in proportion to their size), on test images spread over the classes (stride
10000/images through the class-sorted test split), then times

- critnet: ``fault_campaign`` (golden run, tracing, the draw and every fault), and
- naive: the same fault list, each fault flipped through an int32 view, a full forward pass per batch, restored,

and checks that the per-fault outcome counts are identical. The last line is machine-readable:

    fault_speedup=<x> outcomes_identical=<true|false> faults_per_s=<critnet faults per second>

Usage: OMP_NUM_THREADS=1 python bench/faults.py [--data-root ../shared/data/cifar10]
       [--weights ../shared/checkpoints/cifar10/resnet20-12fca82f.th] [--faults 1000] [--images 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from critnet.analyses.campaign import fault_campaign  # noqa: E402
from critnet.evaluation_set import as_evaluation_set  # noqa: E402
from critnet.faults.evaluator import FaultEvaluator  # noqa: E402
from critnet.faults.injection import apply_fault_bit  # noqa: E402
from critnet.models import build_model  # noqa: E402
from critnet.models.checkpoints import load_weights  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OUTCOMES = ("images", "masked", "noncritical", "sdc1", "sdc5", "nonfinite")


def spread_batches(root: Path, images: int, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(root / "test"), tf)
    indices = [int(i * len(dataset) / images) for i in range(images)]
    subset = torch.utils.data.Subset(dataset, indices)
    return list(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False))


def naive_counts(model, batches, golden, fault) -> dict[str, int]:
    """Flip, full forward pass per batch, compare with the golden logits, restore."""
    (site,) = fault.sites
    flat = dict(model.named_parameters())[site.parameter].detach().view(-1).view(torch.int32)
    original = int(flat[site.index])
    counts = dict.fromkeys(OUTCOMES, 0)
    try:
        flat[site.index] = apply_fault_bit(original, site.bit, fault.fault_model)
        for (x, _), reference in zip(batches, golden):
            logits = model(x)
            masked = (logits.view(torch.int32) == reference.view(torch.int32)).all(1)
            nonfinite = ~torch.isfinite(logits).all(1)
            reference_class = reference.argmax(1)
            sdc1 = ~masked & (nonfinite | (logits.argmax(1) != reference_class))
            in_top5 = (logits.topk(5, 1).indices == reference_class[:, None]).any(1)
            counts["images"] += len(x)
            counts["masked"] += int(masked.sum())
            counts["sdc1"] += int(sdc1.sum())
            counts["sdc5"] += int((sdc1 & (nonfinite | ~in_top5)).sum())
            counts["nonfinite"] += int(nonfinite.sum())
    finally:
        flat[site.index] = original
    counts["noncritical"] = counts["images"] - counts["masked"] - counts["sdc1"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data/cifar10")
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared/checkpoints/cifar10/resnet20-12fca82f.th")
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model("resnet20")
    load_weights(model, str(args.weights), "resnet20")
    model.eval()
    batches = spread_batches(args.data_root, args.images)
    print(f"ResNet20, {args.images} test images in {len(batches)} batches, {args.faults} single-bit faults over all "
          f"conv+linear weights and bits 0-31, {torch.get_num_threads()} thread(s)", flush=True)

    started = time.perf_counter()
    campaign = fault_campaign(model, batches, faults=args.faults, seed=args.seed, bits=list(range(32)))
    critnet_s = time.perf_counter() - started
    print(f"  critnet  {critnet_s:8.1f} s   engine: {campaign.info['engine']}", flush=True)

    with torch.no_grad():
        started = time.perf_counter()
        golden = [model(x) for x, _ in batches]
        naive = [naive_counts(model, batches, golden, fault) for fault in campaign.fault_list]
        naive_s = time.perf_counter() - started
    print(f"  naive    {naive_s:8.1f} s", flush=True)

    identical = all({k: row[k] for k in OUTCOMES} == expected for row, expected in zip(campaign.faults, naive))
    by_layer: dict[str, int] = {}
    for row in campaign.faults:
        by_layer[row["parameter"]] = by_layer.get(row["parameter"], 0) + 1
    totals = {k: sum(row[k] for row in campaign.faults) for k in OUTCOMES}
    print(f"  outcomes over fault x image pairs: {totals}")
    # what suffix-only evaluation can save at best: whole-network cost over the summed cost from each fault's cut
    evaluator = FaultEvaluator(model, as_evaluation_set(batches))
    costs = evaluator.costs(campaign.fault_list)
    full = sum(evaluator.traced.node_cost.values())
    print(f"  suffix FLOP bound (no image skipped): {len(costs) * full / sum(costs):.2f}x; images settled by the "
          f"channel comparison alone: {campaign.info['engine']['images_masked_by_channel']} of {totals['images']}")
    print(f"  faults per layer: {by_layer}")
    print(f"fault_speedup={naive_s / critnet_s:.2f} outcomes_identical={str(identical).lower()} "
          f"faults_per_s={len(campaign.faults) / critnet_s:.2f}")


if __name__ == "__main__":
    main()
