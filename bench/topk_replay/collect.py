"""Per-image paired Δloss (exact) and first-order Taylor estimates of ResNet20's 698 zeroed channels on every STEP-th test image (default 5: 2,000 images) -> mat_STEP.pt. Usage: python collect.py [STEP]

One-off replay scripts behind the README's "What the guarantee rests on" (run as they are).
"""
import sys, time, torch
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
torch.set_num_threads(1)
import critnet
from torch import nn
from critnet.engine.suffix import SuffixEvaluator
from critnet.engine.data import EvaluationSet
from critnet.evaluation import sample_pass, evaluation_mode
from critnet.perturb import Perturbation
from torchvision import datasets, transforms
from critnet.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
step = int(sys.argv[1]) if len(sys.argv) > 1 else 5
tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
ds = torch.utils.data.Subset(datasets.ImageFolder(str(HERE.parents[2] / "shared/data/cifar10/test"), tf), range(0, 10000, step))
data = EvaluationSet.from_batches(torch.utils.data.DataLoader(ds, batch_size=128))
model = critnet.load_model("resnet20", str(HERE.parents[2] / "shared/checkpoints/cifar10/resnet20-12fca82f.th"))
units = critnet.select_units(model, "channel")
p = Perturbation("zero")
t0 = time.time()
with evaluation_mode(model):
    base = sample_pass(model, data)
    # per-sample first-order taylor: conv/linear output o, zeroed filter c -> delta o_c = -(o_c - bias_c)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    outs = {}
    hs = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o)) for n, m in convs.items()]
    tay = {u: [] for u in units}
    with torch.enable_grad():
        for x, y in data:
            outs.clear()
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            names = list(outs)
            grads = torch.autograd.grad(loss, [outs[n] for n in names])
            g = dict(zip(names, grads))
            for u in units:
                layer = u.name.rpartition(".")[0]
                o = outs[layer].detach(); m = convs[layer]
                oc = o[:, u.index]
                if m.bias is not None: oc = oc - m.bias[u.index]
                d = (-oc.double() * g[layer][:, u.index].double()).reshape(len(y), -1).sum(1)
                tay[u].append(d)
    for h in hs: h.remove()
    T = torch.stack([torch.cat(tay[u]) for u in units])
    print("taylor", time.time() - t0, flush=True)
    res = {}
    ev = SuffixEvaluator(model, p, data)
    with torch.no_grad():
        ev.run(list(enumerate(units)), lambda i, r: res.__setitem__(i, r), per_sample=True)
D = torch.stack([res[i][0] - base[0] for i in range(len(units))])
H1 = torch.stack([base[1].double() - res[i][1].double() for i in range(len(units))])
print("exact", time.time() - t0, flush=True)
torch.save({"D": D, "T": T, "H1": H1, "labels": [u.label for u in units], "base": base}, HERE / f"mat_{step}.pt")
