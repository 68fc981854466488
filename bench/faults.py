"""Benchmark of the fault-injection campaign against a naive loop on the public ResNet20 (a benchmark, not a test).

Stores ResNet20 in ``--format`` (float32; float16 or bfloat16: the model and its inputs cast; int8: post-training
quantized with :func:`critnet.quantize_int8` on ``--calibration-images`` training images), draws faults of
``--upset-width`` adjacent bits over every conv and linear weight and every bit of the format (uniformly over
weights: the strata share the total in proportion to their size), on test images spread over the classes (stride
10000/images through the class-sorted test split), then times

- critnet: ``fault_campaign`` (golden run, tracing, the draw and every fault), and
- naive: the same fault list, each fault written into the stored value (float formats through an integer view of
  the parameter, int8 into the integers of the packed weight, packed again), a full forward pass per batch,
  restored,

and checks that the per-fault outcome counts are identical. The last line is machine-readable:

    format=<f> fault_speedup=<x> outcomes_identical=<true|false> faults_per_s=<critnet faults per second>

Usage: OMP_NUM_THREADS=1 python bench/faults.py [--format float32|float16|bfloat16|int8] [--faults 1000]
       [--images 256] [--upset-width 1] [--threads 1] [--data-root ../shared/data/cifar10]
       [--weights ../shared/checkpoints/cifar10/resnet20-12fca82f.th] [--calibration-images 512]
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
from critnet.models import build_model  # noqa: E402
from critnet.models.checkpoints import load_weights  # noqa: E402
from critnet.models.quantization import quantize_int8  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OUTCOMES = ("images", "masked", "noncritical", "sdc1", "sdc5", "nonfinite")


FLOAT_FORMATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INTEGER_VIEWS = {4: torch.int32, 2: torch.int16, 1: torch.int8}


def spread_batches(root: Path, images: int, batch_size: int = 128, split: str = "test"
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(root / split), tf)
    indices = [int(i * len(dataset) / images) for i in range(images)]
    subset = torch.utils.data.Subset(dataset, indices)
    return list(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False))


def struck(pattern: int, fault, bits: int) -> int:
    """``pattern`` (an unsigned ``bits``-bit integer) after the fault strikes its bits."""
    mask = ((1 << fault.width) - 1) << fault.sites[0].bit
    if fault.fault_model == "bitflip":
        return pattern ^ mask
    return pattern & ~mask if fault.fault_model == "stuck_at_0" else pattern | mask


def signed(pattern: int, bits: int) -> int:
    return pattern - (1 << bits) if pattern >= 1 << (bits - 1) else pattern


class StoredValue:
    """Reads and writes one stored value the plain way, independently of critnet's injection code."""

    def __init__(self, model, name: str):
        modules = dict(model.named_modules())
        parameters = dict(model.named_parameters())
        self.parameter = parameters.get(name)
        self.module = modules[name.rpartition(".")[0]]

    def get(self, index: int) -> int:
        if self.parameter is not None:
            flat = self.parameter.detach().view(-1)
            return int(flat.view(INTEGER_VIEWS[flat.element_size()])[index])
        return int(self.module.weight().int_repr().view(-1)[index])

    def set(self, index: int, pattern: int) -> None:
        if self.parameter is not None:
            flat = self.parameter.detach().view(-1)
            flat.view(INTEGER_VIEWS[flat.element_size()])[index] = pattern
            return
        weight, bias = self.module.weight(), self.module.bias()
        integers = weight.int_repr().clone()
        integers.view(-1)[index] = pattern
        self.module.set_weight_bias(torch._make_per_channel_quantized_tensor(
            integers, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), weight.q_per_channel_axis()),
            bias)


def naive_counts(model, batches, golden, fault) -> dict[str, int]:
    """Write the faulty value, a full forward pass per batch, compare with the golden logits, restore."""
    (site,) = fault.sites
    value = StoredValue(model, site.parameter)
    original = value.get(site.index)
    bits = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8}[fault.format]
    counts = dict.fromkeys(OUTCOMES, 0)
    try:
        value.set(site.index, signed(struck(original & ((1 << bits) - 1), fault, bits), bits))
        for (x, _), reference in zip(batches, golden):
            logits = model(x).float()
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
        value.set(site.index, original)
    counts["noncritical"] = counts["images"] - counts["masked"] - counts["sdc1"]
    return counts


def stored_in(number_format: str, model, batches, args):
    """The model and batches in ``number_format``."""
    if number_format == "int8":
        calibration = spread_batches(args.data_root, args.calibration_images, split="train")
        return quantize_int8(model, calibration), batches
    dtype = FLOAT_FORMATS[number_format]
    return model.to(dtype), [(x.to(dtype), y) for x, y in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data/cifar10")
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared/checkpoints/cifar10/resnet20-12fca82f.th")
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format", choices=[*FLOAT_FORMATS, "int8"], default="float32")
    parser.add_argument("--upset-width", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model("resnet20")
    load_weights(model, str(args.weights), "resnet20")
    model.eval()
    batches = spread_batches(args.data_root, args.images)
    model, batches = stored_in(args.format, model, batches, args)
    print(f"ResNet20 in {args.format}, {args.images} test images in {len(batches)} batches, {args.faults} faults of "
          f"{args.upset_width} adjacent bit(s) over all conv+linear weights and every bit, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    started = time.perf_counter()
    campaign = fault_campaign(model, batches, faults=args.faults, seed=args.seed, upset_width=args.upset_width)
    critnet_s = time.perf_counter() - started
    print(f"  critnet  {critnet_s:8.1f} s   engine: {campaign.info['engine']}", flush=True)

    with torch.no_grad():
        started = time.perf_counter()
        golden = [model(x).float() for x, _ in batches]
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
    print(f"format={args.format} fault_speedup={naive_s / critnet_s:.2f} outcomes_identical={str(identical).lower()} "
          f"faults_per_s={len(campaign.faults) / critnet_s:.2f}")


if __name__ == "__main__":
    main()
