"""How often does halving's top k come out wrong? Replays of its own test on per-image matrices (a benchmark).

Each scenario is a fixed population: a matrix of per-image values (units × images) whose row means are the units'
full-set scores, so the true top k is known. Every seed replays ``critnet.engine.certify.sequential_test`` — the
code ``method="halving"`` runs, with its stages, bounds and eliminations — reading the matrix instead of evaluating a
network, and counts a wrong top k when a true top-k unit was eliminated. Per scenario and bound it prints the wrong
rate with its Clopper–Pearson 95 % upper bound, and the work (unit·images) against evaluating every unit on every
image. The scenarios:

- ``gaussian``: 100 units, 2,000 images, Gaussian per-image noise around spread-out means;
- ``lognormal1``, ``lognormal2``: the same means, multiplicative lognormal noise of σ = 1 and 2 (heavy right tails);
- ``resnet20``: ResNet20's 698 output channels zeroed, per-image Δloss on 2,000 CIFAR-10 test images (the shared
  checkpoint and data; computed once, ~20 min on one core, and cached with ``--cache``), top 20;
- ``rare1``, ``rare05``: a true top-k unit whose whole Δloss sits on 1 % (0.5 %) of the images, as a class-specific
  channel's does;
- ``network``: not a replay but ``critnet.rank(..., method="halving")`` itself, on a small network
  (:func:`rare_effect_network`) in which one of the true top 5 channels does all its damage on 1 % of the images; a
  seed is a halving order seed (``--network-seeds``, default 300).

The ``betting`` bound is given the range the engine would declare: for ``resnet20`` each image's Δloss in
``[−loss_i, loss_clip − loss_i]`` from the real reference losses; for the synthetic scenarios each image's lowest
value over the units as its floor and the widest span as the width (a range the population honours). The last line is
machine-readable:

    worst_wrong_rate=<rate> worst_upper95=<bound> bound=betting normal_worst_wrong_rate=<rate> normal_worst_upper95=<b>

Usage: python bench/topk_coverage.py [--seeds 1000] [--scenarios gaussian,...] [--bounds betting,normal]
       [--cache runs/bench_cache/resnet20_delta_loss.pt] [--out bench/results/topk_coverage.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from critnet.engine import certify  # noqa: E402
from critnet.engine.certify import sequential_test  # noqa: E402

SCENARIOS = ("gaussian", "lognormal1", "lognormal2", "resnet20", "rare1", "rare05", "network")
BOUNDS = ("betting", "normal")


def clopper_pearson_upper(failures: int, trials: int, level: float = 0.95) -> float:
    """The one-sided Clopper–Pearson upper bound of a rate with ``failures`` in ``trials``.

    >>> round(clopper_pearson_upper(0, 1000), 5)
    0.00299
    """
    from scipy.stats import beta

    if failures >= trials:
        return 1.0
    return float(beta.ppf(level, failures + 1, trials - failures))


def spread_means(units: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Means shaped like a trained network's: a few large, a boundary with near neighbours, a long small tail."""
    top = torch.linspace(2.0, 0.5, top_k, dtype=torch.float64)
    near = torch.linspace(0.45, 0.3, 5, dtype=torch.float64)
    tail = torch.rand(units - top_k - 5, generator=generator, dtype=torch.float64).pow(3) * 0.3
    return torch.cat([top, near, tail])


def synthetic(name: str, units: int = 100, images: int = 2000, top_k: int = 5) -> dict:
    """A fixed synthetic population (seeded): ``{"matrix", "top_k", "range"}``."""
    g = torch.Generator().manual_seed(SCENARIOS.index(name))
    means = spread_means(units, top_k, g)
    if name == "gaussian":
        matrix = means[:, None] + torch.randn(units, images, generator=g, dtype=torch.float64)
    elif name.startswith("lognormal"):
        sigma = 1.0 if name == "lognormal1" else 2.0
        noise = (sigma * torch.randn(units, images, generator=g, dtype=torch.float64)).exp()
        matrix = means[:, None] * noise / noise.mean(dim=1, keepdim=True)
    else:
        share = 0.01 if name == "rare1" else 0.005
        matrix = means[:, None] + 0.3 * torch.randn(units, images, generator=g, dtype=torch.float64)
        # the rare unit: nothing on most images, a large loss on a few; its mean sits inside the true top k
        rare = torch.zeros(images, dtype=torch.float64)
        hit = torch.randperm(images, generator=g)[: int(share * images)]
        rare[hit] = 0.7 / share  # mean 0.7: ranked between the fourth and fifth of the top five
        matrix[top_k + 5] = rare
    # declared range: each image's floor is the lowest value any unit takes there, the width the widest span
    floor = matrix.min(dim=0).values
    return {"matrix": matrix, "top_k": top_k, "floor": floor, "width": float((matrix - floor).max()), "clip": None}


def resnet20(cache: Path, images: int = 2000) -> dict:
    """Per-image Δloss of ResNet20's 698 channels zeroed, on ``images`` test images spread over the split."""
    if not cache.is_file():
        build_resnet20_matrix(cache, images)
    saved = torch.load(cache)
    matrix = saved["losses"] - saved["ref_loss"][None]
    reference = (saved["ref_loss"], saved["ref_top1"], saved["ref_top1"])
    clip = certify.LOSS_CLIP
    floor, width = certify.per_image_range("delta_loss", reference, clip)
    return {"matrix": matrix, "top_k": 20, "floor": floor, "width": width, "clip": clip}


def build_resnet20_matrix(cache: Path, images: int) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from topk import OPTIONS, load_split, spread

    import critnet
    from critnet.engine.suffix import SuffixEvaluator
    from critnet.evaluation import sample_pass
    from critnet.modes import evaluation_mode

    shared = REPO.parent / "shared"
    model = critnet.load_model("resnet20", str(shared / "checkpoints/cifar10/resnet20-12fca82f.th")).eval()
    data = spread(load_split(shared / "data/cifar10"), images)
    units = critnet.select_units(model, "channel", OPTIONS["include"], (), OPTIONS["module_types"])
    perturbation = critnet.Perturbation("zero")
    started = time.perf_counter()
    found: dict[int, tuple] = {}
    with evaluation_mode(model, data.device, deterministic=True), torch.no_grad():
        reference = sample_pass(model, data)
        SuffixEvaluator(model, perturbation, data).run(list(enumerate(units)), found.__setitem__, per_sample=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"units": [u.label for u in units], "images": images,
                "losses": torch.stack([found[i][0].double().cpu() for i in range(len(units))]),
                "ref_loss": reference[0].double().cpu(), "ref_top1": reference[1].cpu()}, cache)
    print(f"resnet20 matrix: {len(units)} units × {images} images in {time.perf_counter() - started:.0f} s", flush=True)


class RareEffectNet(torch.nn.Module):
    """Five-class logits from nonnegative per-unit contributions: ``features`` (identity weights) passes each
    input column through a ReLU as one unit's contribution to the true class's logit; the last input column sets
    every image's logit margin to the same value, so that zeroing a unit's channel lowers that image's margin by
    exactly the unit's contribution there."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.features = torch.nn.Linear(units, units, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = torch.relu(self.features(x[:, :-1])).sum(dim=1) + x[:, -1]
        return torch.nn.functional.pad(margin[:, None], (0, 4))  # the true class 0 and four at logit 0


#: The per-image logit margin of the unperturbed network: a loss of log(1 + 4 e^-8) ≈ 0.0013 on every image.
MARGIN = 8.0


def rare_effect_network(images: int = 2000, share: float = 0.01, seed: int = 0):
    """A network, its data (batches of 250) and its true top 5, in which the fifth most critical unit does all its
    damage on ``share`` of the images (a 24-logit drop there: a per-image Δloss of about 17.4 nats, a mean of
    about 0.17) and none elsewhere, four units harm every image a little more, two come close behind it, and 40
    harm little. Units are the output channels of ``features``; every target is class 0."""
    g = torch.Generator().manual_seed(seed)
    loss = lambda margin: torch.log1p(4 * torch.exp(-margin))  # noqa: E731 - the loss at a class-0 logit margin
    targets = torch.tensor([0.6, 0.45, 0.35, 0.25, 0.14, 0.12], dtype=torch.float64)
    # the constant contribution whose removal costs each target mean: solve loss(MARGIN - c) - loss(MARGIN) = t
    base = loss(torch.tensor(MARGIN, dtype=torch.float64))
    constant = MARGIN + torch.log((torch.expm1(targets + base)) / 4)
    broad = constant[:, None] * (1 + 0.2 * (torch.rand(len(targets), images, generator=g, dtype=torch.float64) - 0.5))
    rare = torch.zeros(1, images, dtype=torch.float64)
    rare[0, torch.randperm(images, generator=g)[: max(1, round(share * images))]] = MARGIN + 16.0
    small = torch.rand(40, 1, generator=g, dtype=torch.float64) * 2.5 * torch.rand(40, images, generator=g,
                                                                                    dtype=torch.float64)
    contributions = torch.cat([broad[:4], rare, broad[4:], small]).T  # images × units
    offset = MARGIN - contributions.sum(dim=1, keepdim=True)
    x = torch.cat([contributions, offset], dim=1).float()
    data = [(x[i : i + 250], torch.zeros(len(x[i : i + 250]), dtype=torch.long)) for i in range(0, images, 250)]
    model = RareEffectNet(contributions.shape[1]).eval()
    top = [f"features.weight[{i}]" for i in range(5)]
    return model, data, top


def network_run(seeds: int) -> list[dict]:
    """``critnet.rank`` with halving, default settings but the bound, on :func:`rare_effect_network`."""
    import critnet

    model, data, truth = rare_effect_network()
    rows = []
    for bound in BOUNDS:
        started = time.perf_counter()
        wrong, work = 0, 0.0
        for seed in range(seeds):
            ranking = critnet.rank(model, data, unit="channel", perturbation="zero", include=["features.weight"],
                                   score="delta_loss", method="halving", top_k=5, seed=seed, bound=bound)
            wrong += sorted(r["unit"] for r in ranking.top(5)) != sorted(truth)
            test = ranking.levels[0].top_k_test
            work += test["unit_images"] / (len(ranking.units) * ranking.samples)
        rows.append({"scenario": "network", "bound": bound, "seeds": seeds, "wrong": wrong,
                     "wrong_rate": wrong / seeds, "upper95": clopper_pearson_upper(wrong, seeds),
                     "work_fraction": work / seeds, "saving": seeds / work, "units": len(ranking.units),
                     "images": ranking.samples, "top_k": 5, "width": test.get("range_width"),
                     "seconds": time.perf_counter() - started})
        report(rows[-1])
    return rows


def report(row: dict) -> None:
    print(f"{row['scenario']:<11} {row['bound']:<8} wrong {row['wrong']:>4}/{row['seeds']} = {row['wrong_rate']:.4f} "
          f"(95 % upper {row['upper95']:.4f}); work {row['work_fraction']:.3f} of exact "
          f"({row['saving']:.2f}× less); {row['seconds']:.0f} s", flush=True)


def replay(population: dict, bound: str, seed: int, confidence: float) -> tuple[bool, float]:
    """One run of the test on the population: (wrong top k, work fraction)."""
    matrix, k = population["matrix"], population["top_k"]
    units, images = matrix.shape
    truth = set(matrix.mean(dim=1).topk(k).indices.tolist())
    survivors, _, record = sequential_test(
        units, images, k, lambda stage, remaining, positions: matrix[remaining][:, positions], bound=bound,
        confidence=confidence, floor=population["floor"], width=population["width"], seed=seed)
    return not truth <= set(survivors), record.unit_images / (units * images)


def run(populations: dict, bounds, seeds: int, confidence: float) -> list[dict]:
    rows = []
    for name, population in populations.items():
        for bound in bounds:
            started = time.perf_counter()
            wrong, work = 0, 0.0
            for seed in range(seeds):
                failed, fraction = replay(population, bound, seed, confidence)
                wrong += failed
                work += fraction
            row = {"scenario": name, "bound": bound, "seeds": seeds, "wrong": wrong, "wrong_rate": wrong / seeds,
                   "upper95": clopper_pearson_upper(wrong, seeds), "work_fraction": work / seeds,
                   "saving": seeds / work if work else math.inf, "units": population["matrix"].shape[0],
                   "images": population["matrix"].shape[1], "top_k": population["top_k"],
                   "width": population["width"], "seconds": time.perf_counter() - started}
            rows.append(row)
            report(row)
    return rows


def last_line(rows: list[dict]) -> str:
    parts = []
    for bound, prefix in (("betting", ""), ("normal", "normal_")):
        mine = [r for r in rows if r["bound"] == bound]
        if not mine:
            continue
        worst = max(mine, key=lambda r: (r["upper95"], r["wrong_rate"]))
        parts.append(f"{prefix}worst_wrong_rate={max(r['wrong_rate'] for r in mine):.4f} "
                     f"{prefix}worst_upper95={worst['upper95']:.4f}" + (" bound=betting" if bound == "betting" else ""))
    return " ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--bounds", default=",".join(BOUNDS))
    parser.add_argument("--confidence", type=float, default=certify.TOP_K_CONFIDENCE)
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench_cache" / "resnet20_delta_loss.pt"),
                        help="where the ResNet20 matrix is kept (built on first use)")
    parser.add_argument("--network-seeds", type=int, default=300, help="seeds of the network scenario")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    bounds = [b for b in args.bounds.split(",") if b]
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"--scenarios: {name!r} is not one of {', '.join(SCENARIOS)}")
    for bound in bounds:
        if bound not in BOUNDS:
            parser.error(f"--bounds: {bound!r} is not one of {', '.join(BOUNDS)}")
    torch.set_num_threads(args.threads)
    populations = {name: resnet20(Path(args.cache)) if name == "resnet20" else synthetic(name)
                   for name in names if name != "network"}
    rows = run(populations, bounds, args.seeds, args.confidence)
    if "network" in names:
        rows += network_run(args.network_seeds)
    line = last_line(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", "bench/topk_coverage.py",
                                                                    *(argv if argv is not None else sys.argv[1:])]),
                                              "confidence": args.confidence, "rows": rows, "last_line": line},
                                             indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
