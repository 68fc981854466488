"""The two-process (gloo) runs of test_engine_modes.py and test_faults.py in ONE pair of processes:
``python tests/gloo_runs.py RANK PORT OUT WEIGHTS``, started twice (ranks 0 and 1) by the session fixture
``gloo_runs`` in conftest.py, which saves the first 256 shared test images to ``OUT/images.pt`` first (without
../shared it saves none, and the ResNet20 part is left out).

Nothing here imports Lightning (nor conftest, which does), so each process starts in seconds; the processes run
with a bare environment (PATH, PYTHONPATH, OMP_NUM_THREADS=1, PYTHONHASHSEED=12345). The results:

- ``OUT/fresh_process.json``: rank 0 first draws test_perturb's noise in this other process (another hash seed
  than the test's), then calls the public API as test_api does and lists the Lightning modules loaded by then;
- ``OUT/engine/RANK.json``: the exact and halving outcomes of ``evaluate_units`` sharded over the two ranks, and how
  many units each rank evaluated (test_engine_modes);
- ``OUT/faults/rankRANK.json`` and ``OUT/faults/campaign.json``: a fault campaign whose faults the ranks share
  (test_faults).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # tests/conftest.py, not the doctest one at the root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ENGINE_LAYERS = [r"layer1\.2\.conv2", r"layer3\.2\.conv2"]  # every third channel of these: test_engine_modes
FAULTS = dict(layers=[".*"], module_types=None, faults=30, seed=6)  # test_faults


def fresh_process_part(out: Path) -> None:
    """Rank 0, before anything else (and before the gloo group): test_perturb's noise draw in another process, then
    test_api's calls of the public API, after which no Lightning module may be loaded."""
    torch.manual_seed(999)
    from critnet.perturb import Perturbation, Unit

    noise = Perturbation("noise", 1.0, seed=11).apply(torch.zeros(8), Unit("channel", "layer1.0.conv1.weight", 5))
    import critnet

    model = critnet.load_model("resnet20")
    data = (torch.randn(8, 3, 32, 32), torch.arange(8))
    critnet.rank(model, data, unit="tensor", include=["linear"])
    critnet.prune_sweep(model, data, p_prune=[0.0, 0.2])
    critnet.evaluate(model, data)
    lightning = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics"))
    with open(out / "fresh_process.json", "w") as handle:
        json.dump({"noise_int32": noise.view(torch.int32).tolist(), "lightning_modules": lightning}, handle)


def all_gather(obj, world_size: int = 2):
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def engine_setup(out: Path, weights: str):
    """The public ResNet20, its units and the images: before the gloo group, so that rank 1 does this while rank 0
    runs its fresh-process part."""
    from critnet.evaluation_set import EvaluationSet
    from critnet.models import build_model
    from critnet.models.checkpoints import load_weights
    from critnet.selection import select_units

    model = build_model("resnet20")
    load_weights(model, weights, "resnet20")
    model.eval()
    units = select_units(model, "channel", include=ENGINE_LAYERS)[::3]
    return model, units, EvaluationSet.from_batches(torch.load(out / "images.pt"))


def engine_part(rank: int, out: Path, model, units, data) -> None:
    from critnet.engine import evaluate_units
    from critnet.perturb import Perturbation

    result, counts = {}, {}
    for method in ("exact", "halving"):
        # halving with the normal bound: it eliminates units on these few images, so the ranks' agreement on
        # eliminations is exercised (the betting bound decides through the same agreement)
        outcomes = evaluate_units(model, units, Perturbation("zero"), data, method=method, top_k=3, rank=rank,
                                  world_size=2, all_gather=all_gather,
                                  **({"bound": "normal"} if method == "halving" else {}),
                                  progress=lambda done, total: counts.__setitem__(method, total))
        result[method] = [[o.unit.label, o.exact] + [[t.loss_sum, t.top1_correct, t.top5_correct, t.samples]
                          for t in o.halves] for o in outcomes]
    (out / "engine").mkdir(exist_ok=True)
    with open(out / "engine" / f"{rank}.json", "w") as handle:
        json.dump({"result": result, "counts": counts}, handle)


def faults_part(rank: int, out: Path) -> None:
    from tiny_nets import tiny_data, tiny_model

    from critnet.analyses.campaign import fault_campaign
    from critnet.distributed import Distributed

    totals = []
    folder = out / "faults"
    folder.mkdir(exist_ok=True)
    distributed = Distributed.current()
    campaign = fault_campaign(tiny_model(), tiny_data(), **FAULTS, distributed=distributed,
                              progress=lambda d, t: totals.append(t))
    if distributed.is_lead:  # the files are written once
        campaign.report(folder, print_table=False)
    with open(folder / f"rank{rank}.json", "w") as handle:
        json.dump({"rows": repr(campaign.faults), "mine": totals[-1]}, handle)


if __name__ == "__main__":
    rank, port, out, weights = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if rank == 0:
        fresh_process_part(out)
    engine = engine_setup(out, weights) if (out / "images.pt").is_file() else None  # the ResNet20 part needs ../shared
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if engine is not None:
        engine_part(rank, out, *engine)
    dist.barrier()
    faults_part(rank, out)
    # Leave together, then skip interpreter finalization: gloo's worker threads can abort the process there
    # ("terminate called without an active exception", pytorch/pytorch#179291) after all the work is written.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
