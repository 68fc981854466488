"""How often the one-sided normal bounds of certify.bounds fail on random samples of 256 and 512 images, for the 60 units nearest the top (uses mat_5.pt).

One-off replay scripts behind the README's "What the guarantee rests on" (run as they are).
"""
import sys, math, torch
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from critnet.engine.certify import bounds
torch.set_num_threads(1)
M = torch.load(HERE / "mat_5.pt")
D, T = M["D"], M["T"]
N, n = D.shape
mu = D.mean(1)
top = mu.topk(60).indices  # the units near the top, where wrong eliminations would matter
g = torch.Generator().manual_seed(0)
for m in (256, 512):
    for cv in (False, True):
        fails = {2.326: [0, 0], 3.09: [0, 0], 3.72: [0, 0]}
        draws = 400
        for d in range(draws):
            idx = torch.randperm(n, generator=g)[:m]
            for z in fails:
                if cv:
                    est, lo, hi = bounds(D[top][:, idx], n, z, T[top][:, idx], T[top].mean(1))
                else:
                    est, lo, hi = bounds(D[top][:, idx], n, z)
                fails[z][0] += int((hi < mu[top]).sum())
                fails[z][1] += int((lo > mu[top]).sum())
        total = draws * len(top)
        print(f"m={m} cv={cv}: " + ", ".join(f"z={z}: upper fails {a/total:.5f} lower fails {b/total:.5f} (nominal {0.5*math.erfc(z/math.sqrt(2)):.5f})" for z, (a, b) in fails.items()), flush=True)
