"""Accuracy and speed of the int8 ResNet20 against the float32 one (a benchmark, not a test).

Quantizes the public CIFAR-10 ResNet20 with ``critnet.quantize_int8`` (post-training static quantization, FX graph
mode, the backend's default qconfig mapping) on calibration images spread evenly over the training split (it is
sorted by class), then

- evaluates both models on the test split with ``critnet.compare_accuracy`` (top-1 of each, and the agreement:
  the share of images on which both predict the same class), and
- times one forward pass of a batch of test images through each (the median of ``--repeats`` passes, after one
  warm-up pass), with ``--threads`` intra-op threads.

The last line is machine-readable:

    float32_top1=<%> int8_top1=<%> agreement=<%> float32_ms=<ms> int8_ms=<ms> int8_speedup=<x>

Usage: OMP_NUM_THREADS=1 python bench/quantization.py [--data-root ../shared/data/cifar10]
       [--weights ../shared/checkpoints/cifar10/resnet20-12fca82f.th] [--calibration 512] [--images 10000]
       [--batch 128] [--backend x86] [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import critnet  # noqa: E402
from critnet.models import build_model  # noqa: E402
from critnet.models.checkpoints import load_weights  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loader(folder: Path, images: int | None, batch_size: int) -> torch.utils.data.DataLoader:
    """``images`` images of ``folder`` spread evenly over it (all of them for None), in batches."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(folder), tf)
    if images is not None and images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, [int(i * len(dataset) / images) for i in range(images)])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data/cifar10")
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared/checkpoints/cifar10/resnet20-12fca82f.th")
    parser.add_argument("--calibration", type=int, default=512, help="training images to calibrate on")
    parser.add_argument("--images", type=int, default=10000, help="test images to evaluate on (10000: all)")
    parser.add_argument("--batch", type=int, default=128, help="batch size, also of the timed forward pass")
    parser.add_argument("--backend", default="x86", choices=["x86", "fbgemm", "onednn"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model("resnet20")
    load_weights(model, str(args.weights), "resnet20")
    model.eval()
    started = time.perf_counter()
    int8 = critnet.quantize_int8(model, loader(args.data_root / "train", args.calibration, args.batch),
                                 backend=args.backend)
    quantize_s = time.perf_counter() - started
    test = loader(args.data_root / "test", args.images, args.batch)
    started = time.perf_counter()
    result = critnet.compare_accuracy(model, int8, test)
    compare_s = time.perf_counter() - started
    x = next(iter(test))[0]
    float_ms, int8_ms = forward_ms(model, x, args.repeats), forward_ms(int8, x, args.repeats)

    print(f"torch {torch.__version__}, backend {args.backend}, {args.threads} thread(s); calibrated on "
          f"{args.calibration} training images in {quantize_s:.1f} s; compared on {result['samples']} test images "
          f"in {compare_s:.1f} s")
    print(f"top-1: float32 {result['float_top1']:.2f} %, int8 {result['int8_top1']:.2f} % "
          f"(top-5 {result['float_top5']:.2f} %, {result['int8_top5']:.2f} %); same prediction on "
          f"{result['agreement']:.2f} % of the images")
    print(f"forward of {len(x)} images: float32 {float_ms:.1f} ms, int8 {int8_ms:.1f} ms")
    print(f"float32_top1={result['float_top1']:.2f} int8_top1={result['int8_top1']:.2f} "
          f"agreement={result['agreement']:.2f} float32_ms={float_ms:.1f} int8_ms={int8_ms:.1f} "
          f"int8_speedup={float_ms / int8_ms:.2f}")


if __name__ == "__main__":
    main()
