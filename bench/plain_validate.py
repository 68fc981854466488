"""An independent plain-PyTorch evaluation of a CIFAR-10 checkpoint: the reference `analyze.py validate` must match.

    python bench/plain_validate.py --data-root ../shared/data/cifar10 \
        --weights ../shared/checkpoints/cifar10/resnet20-12fca82f.th

Only torch/torchvision and the architecture definition are used: no Lightning, no torchmetrics, no critnet
data or checkpoint code. Prints correct counts, percentages, the mean loss and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from critnet.models.cifar_resnet import CifarResNet  # noqa: E402  (the architecture only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--weights", default="../shared/checkpoints/cifar10/resnet20-12fca82f.th")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()

    model = CifarResNet((args.depth - 2) // 6)
    state = torch.load(args.weights, map_location="cpu")
    state = state.get("state_dict", state)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = datasets.ImageFolder(str(Path(args.data_root) / "test"), tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    top1 = top5 = 0
    loss_sum = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x)
            top1 += (logits.argmax(1) == y).sum().item()
            top5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum().item()
            loss_sum += F.cross_entropy(logits, y, reduction="none").double().sum().item()
    elapsed = time.perf_counter() - start
    n = len(dataset)
    print(f"samples={n} top1_correct={top1} top5_correct={top5} top1={100 * top1 / n:.2f} "
          f"top5={100 * top5 / n:.2f} loss={loss_sum / n:.10f} elapsed_s={elapsed:.3f}")


if __name__ == "__main__":
    main()
