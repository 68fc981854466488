"""Replays halving's sequential test on the matrix of collect.py (first stage and control variate); 10k resamples it to 10,000 images. Usage: python simulate.py mat_5.pt [2k|10k]

One-off replay scripts behind the README's "What the guarantee rests on" (run as they are).
"""
import sys, math, torch
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from critnet.engine.certify import stage_sizes, sample_order, critical_z, bounds, survivors
M = torch.load(sys.argv[1])
D, T = M["D"], M["T"]
N, n0 = D.shape
k = 20
def run(D, T, first, conf, cv, seed=0, pop=None):
    N, n = D.shape
    sizes = stage_sizes(n, first)
    z = critical_z(N, len(sizes) - 1, conf)
    order = sample_order(n, seed)
    tmean = T.mean(1)
    remaining = torch.arange(N)
    cost = 0; prev = 0; log = []
    for j, m in enumerate(sizes):
        cost += len(remaining) * (m - prev); prev = m
        if j == len(sizes) - 1: break
        idx = order[:m]
        y = D[remaining][:, idx]
        if cv:
            est, lo, hi = bounds(y, n, z, T[remaining][:, idx], tmean[remaining])
        else:
            est, lo, hi = bounds(y, n, z)
        keep = survivors(lo, hi, k)
        remaining = remaining[keep]
        log.append((m, len(remaining)))
    full = D.mean(1)
    true_top = set(full.topk(k).indices.tolist())
    got = set(remaining[full[remaining].topk(min(k, len(remaining))).indices].tolist())
    return N * n / cost, got == true_top, len(remaining), z, log
mode = sys.argv[2] if len(sys.argv) > 2 else "2k"
if mode == "10k":
    g = torch.Generator().manual_seed(1)
    cols = torch.randint(0, n0, (10000,), generator=g)
    D, T = D[:, cols], T[:, cols]
for first in (64, 128, 256, 512):
    for cv in (False, True):
        r = [run(D, T, first, 0.99, cv, seed=s) for s in range(3)]
        print(f"first={first} cv={cv} z={r[0][3]:.2f} speedup={[round(x[0],2) for x in r]} ok={[x[1] for x in r]} full={[x[2] for x in r]} log={r[0][4]}")
# correlation
full = D.mean(1); top = full.topk(40).indices
rr = [torch.corrcoef(torch.stack([D[u], T[u]]))[0,1].item() for u in top[:40]]
print("corr top40", [round(x,2) for x in rr])
print("top20 scores", full.topk(22).values.tolist())
