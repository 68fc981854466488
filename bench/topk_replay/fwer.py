"""The whole test replayed over 200 random image orders on mat_5.pt resampled to 10,000 images: how often the top 20 is wrong.

One-off replay scripts behind the README's "What the guarantee rests on" (run as they are).
"""
import sys, torch
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
torch.set_num_threads(1)
exec(open(HERE / "simulate.py").read().split("mode = sys.argv")[0].replace("M = torch.load(sys.argv[1])", "M = torch.load(HERE / 'mat_5.pt')"))
g = torch.Generator().manual_seed(1)
cols = torch.randint(0, n0, (10000,), generator=g)
D10, T10 = D[:, cols], T[:, cols]
for cv in (True, False):
    wrong, speed = 0, []
    for seed in range(100, 300):
        s, ok, full, z, log = run(D10, T10, 256, 0.99, cv, seed=seed)
        wrong += not ok; speed.append(s)
    print(f"cv={cv}: wrong top-20 in {wrong} of 200 random orders; unit·image speedup mean {sum(speed)/len(speed):.2f} min {min(speed):.2f}", flush=True)
