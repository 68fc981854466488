"""How cheaply can an exact top 20 be found? A replay on the exact per-image matrix (a study, not a test).

Computes every ResNet20 output channel's per-image loss with the channel zeroed on the first 256 shared test images
(the channel setting of ``bench/ranking.py``), then replays selection rules on that matrix and prints, for each, how
deep its ranking must be checked exactly to contain the true top 20 and what that costs as a fraction of the exact
ranking's suffix FLOPs (``SuffixEvaluator.costs``):

- first- and second-order Taylor estimates and a logit-space linearisation (one backward pass per class);
- exact scores on a part of the images (evenly spread or random), also with oracle least-squares image weights;
- racing with confidence bounds (the rule of ``method: halving``) over 20 random image orders and the strided one;
- ``method: hybrid`` with its console note, and how many true top-20 units it never checked;
- the time of a bf16 channels-last forward pass against fp32.

Usage: python bench/top20_replay.py [--data-root ../shared/data/cifar10] [--weights <resnet20 checkpoint>]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ranking import load_batches  # noqa: E402

from critnet.reporting.ranking import hybrid_note  # noqa: E402
from critnet.checkpoints import load_weights  # noqa: E402
from critnet.engine import EvaluationSet, evaluate_baseline, evaluate_units  # noqa: E402
from critnet.engine.core import halving_stages, survivors  # noqa: E402
from critnet.engine.suffix import SuffixEvaluator  # noqa: E402
from critnet.evaluation import sample_pass  # noqa: E402
from critnet.engine.taylor import taylor_estimates  # noqa: E402
from critnet.models import build_model  # noqa: E402
from critnet.perturb import Perturbation, select_units  # noqa: E402
from critnet.ranking import estimate_agreement  # noqa: E402
from critnet.reporting.common import console  # noqa: E402

K = 20


def strided_order(n: int) -> list[int]:
    """The order in which halving's stages add samples (every prefix evenly spread); n a power of two."""
    bits = n.bit_length() - 1
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def depth_needed(score: torch.Tensor, truth: torch.Tensor, share: torch.Tensor) -> str:
    """How many units, taken in ``score`` order, contain all of ``truth``, and their share of the exact cost."""
    order = torch.argsort(-score)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    depth = int(position[truth].max()) + 1
    return f"top {depth} ({float(share[order[:depth]].sum()):.3f} of the exact cost)"


def race(delta: torch.Tensor, order: list[int], share: torch.Tensor, truth: set, confidence: float, start: int):
    """Replay halving's confidence-bound elimination; returns (top 20 found, cost share)."""
    n = delta.shape[1]
    alive = torch.arange(delta.shape[0])
    seen, cost, nxt = 0, 0.0, start
    while True:
        nxt = min(nxt, n)
        cost += float(share[alive].sum()) * (nxt - seen) / n
        seen = nxt
        if seen == n:
            break
        alive = alive[survivors(delta[alive][:, order[:seen]], K, confidence)]
        nxt = 2 * seen
    found = set(alive[torch.argsort(-delta[alive].sum(1))[:K]].tolist())
    return found == truth, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--weights", default=str(REPO.parent / "shared" / "checkpoints" / "cifar10" / "resnet20-12fca82f.th"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model("resnet20")
    load_weights(model, args.weights, "resnet20")
    model.eval()
    batches = load_batches(Path(args.data_root), 256)
    data = EvaluationSet.from_batches(batches)
    units = select_units(model, "channel")
    zero = Perturbation("zero")
    evaluator = SuffixEvaluator(model, zero, data)
    share = torch.tensor(evaluator.costs(units), dtype=torch.float64)
    share /= share.sum()

    started = time.perf_counter()
    losses: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        evaluator.run(list(enumerate(units)), lambda i, result: losses.__setitem__(i, result[0]), per_sample=True)
    exact_s = time.perf_counter() - started
    base = sample_pass(model, data)[0]
    delta = torch.stack([losses[i] for i in range(len(units))]) - base  # (units, images) per-image Δloss
    n = delta.shape[1]
    total = delta.sum(1)
    ranked = torch.argsort(-total)
    truth = ranked[:K]
    print(f"exact per-image matrix: {len(units)} units × {n} images in {exact_s:.1f} s")
    print(f"20th / 21st Δloss: {total[ranked[K - 1]] / n:.4f} / {total[ranked[K]] / n:.4f}; "
          f"units above 0.5: {int((total / n > 0.5).sum())}; the true top 20 cost {float(share[truth].sum()):.3f}")

    print("\nestimates (depth of their ranking that holds the true top 20, its share of the exact cost):")
    for order in (1, 2):
        estimates = torch.tensor(taylor_estimates(model, units, zero, data, order))
        print(f"  taylor order {order}: {depth_needed(estimates, truth, share)}")
    started = time.perf_counter()
    linear = logit_linearisation(model, units, batches)
    print(f"  logit-space linearisation ({time.perf_counter() - started:.1f} s): {depth_needed(linear, truth, share)}")

    print("\nexact scores on part of the images (depth, share to check; the screen itself costs images/256):")
    strided = strided_order(n)
    for m in (8, 16, 32, 64):
        part = torch.tensor(strided[:m])
        weights = torch.linalg.lstsq(delta[:, part], total[:, None]).solution[:, 0]
        print(f"  {m:3d} strided: {depth_needed(delta[:, part].sum(1), truth, share)}   "
              f"oracle-weighted: {depth_needed(delta[:, part] @ weights, truth, share)}")

    print("\nracing with confidence bounds (halving's rule), 20 random image orders + the strided one:")
    generator = torch.Generator().manual_seed(1)
    orders = [strided] + [torch.randperm(n, generator=generator).tolist() for _ in range(20)]
    for confidence in (1.5, 2.0, 2.5):
        for start in (16, 32):
            runs = [race(delta, order, share, set(truth.tolist()), confidence, start) for order in orders]
            costs = [cost for _, cost in runs]
            print(f"  {confidence} s.e. from {start}: exact top 20 in {sum(ok for ok, _ in runs)}/{len(runs)}, "
                  f"cost {sum(costs) / len(costs):.3f} on average, {max(costs):.3f} at most")
    print(f"  (halving's stages on {n} images start at {n // halving_stages(n)[0]} samples)")

    outcomes = evaluate_units(model, units, zero, data, method="hybrid", top_k=K)
    checked = {i for i, o in enumerate(outcomes) if o.exact}
    agreement = estimate_agreement(outcomes, evaluate_baseline(model, data), "loss", K)
    print()
    console.print(hybrid_note(agreement))
    print(f"  true top-20 units that hybrid never checked: {len(set(truth.tolist()) - checked)}")

    x = torch.randn(256, 3, 32, 32)
    fp32 = timed_forward(model, x)
    bf16 = timed_forward(build_model("resnet20").eval().to(torch.bfloat16).to(memory_format=torch.channels_last),
                         x.to(torch.bfloat16).to(memory_format=torch.channels_last))
    print(f"\nforward of 256 images: fp32 {fp32:.3f} s, bf16 channels-last {bf16:.3f} s ({bf16 / fp32:.2f}×)")


def logit_linearisation(model, units, batches) -> torch.Tensor:
    """Δloss estimates from logits linearised in each channel's mask (one backward pass per class), the loss kept
    exact: ``Σᵢ CE(zᵢ − Jᵢ) − CE(zᵢ)`` with ``Jᵢ = ∂zᵢ/∂m`` at ``m = 1``."""
    modules = dict(model.named_modules())
    layers = list(dict.fromkeys(u.name.rpartition(".")[0] for u in units))
    outputs: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
               for name in layers]
    estimate = torch.zeros(len(units), dtype=torch.float64)
    try:
        for x, y in batches:
            logits = model(x)
            acts = [outputs[name] for name in layers]
            columns = []
            for k in range(logits.shape[1]):
                grads = torch.autograd.grad(logits[:, k].sum(), acts, retain_graph=True)
                columns.append(torch.cat([(a * g).reshape(len(a), a.shape[1], -1).sum(2)
                                          for a, g in zip(acts, grads)], 1))
            jacobian = torch.stack(columns, 2).detach()  # (images, units, classes)
            z = logits.detach()
            perturbed = (z[:, None, :] - jacobian).reshape(-1, z.shape[1])
            after = F.cross_entropy(perturbed, y.repeat_interleave(jacobian.shape[1]), reduction="none")
            estimate += (after.reshape(len(y), -1) - F.cross_entropy(z, y, reduction="none")[:, None]).sum(0).double()
    finally:
        for handle in handles:
            handle.remove()
    return estimate


def timed_forward(model, x, repeats: int = 5) -> float:
    with torch.no_grad():
        model(x)
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    main()
