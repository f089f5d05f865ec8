"""Plain-PyTorch reference outside the product (no distill_ray import) for docs/first_try.md: satellite, teacher MLP[512,512], student MLP[8],
baseline (CE, labeled rows) vs KD (labeled + 4 mixup copies, T=2, alpha=0.5), equal steps, best val epoch.

    .venv/bin/python bench/first_try_reference.py SEED      # after `make check-data`

Its own seeded 65/15/20 split (not the product's id hash), the same models and schedule as
jobs/configs/firsttry/satellite.yaml with distill-ray's defaults."""
import argparse
from pathlib import Path
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("seed", nargs="?", type=int, default=0)
seed = parser.parse_args().seed
DATA = Path.home() / ".cache/distill-ray/check/satellite.parquet"
if not DATA.is_file():
    raise SystemExit(f"bench/first_try_reference.py reads {DATA}: run `make check-data` first")
import numpy as np, pandas as pd, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
df = pd.read_parquet(DATA)
y = pd.Categorical(df["land_cover"]).codes.astype(np.int64); X = df.drop(columns=["land_cover"]).to_numpy(np.float32)
rng = np.random.default_rng(seed); p = rng.permutation(len(y)); n = len(y)
te, va, tr = p[:int(.2*n)], p[int(.2*n):int(.35*n)], p[int(.35*n):]
mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6; X = (X - mu) / sd
Xt = {k: torch.tensor(X[i]) for k, i in (("tr", tr), ("va", va), ("te", te))}; Yt = {k: torch.tensor(y[i]) for k, i in (("tr", tr), ("va", va), ("te", te))}
def mk(hs):
    layers, d = [], 36
    for h in hs: layers += [nn.Linear(d, h), nn.ReLU()]; d = h
    return nn.Sequential(*layers, nn.Linear(d, 6))
def acc(m, k):
    with torch.no_grad(): return (m(Xt[k]).argmax(1) == Yt[k]).float().mean().item()
def fit(m, X_, targets, steps, epochs_batch=64, lr=3e-3, kd=None):
    torch.manual_seed(seed); opt = torch.optim.AdamW(m.parameters(), lr=lr); n = len(X_); best=(-1, 0, None)
    per_epoch = n // epochs_batch; epochs = max(1, steps // per_epoch)
    for ep in range(epochs):
        perm = torch.randperm(n)
        for b in range(per_epoch):
            i = perm[b*epochs_batch:(b+1)*epochs_batch]; out = m(X_[i])
            loss = targets(out, i); opt.zero_grad(); loss.backward(); opt.step()
        a = acc(m, "va")
        if a > best[0]: best = (a, ep, {k: v.clone() for k, v in m.state_dict().items()})
    m.load_state_dict(best[2]); return m, best
torch.manual_seed(seed)
teacher, _ = fit(mk([512, 512]), Xt["tr"], lambda o, i: F.cross_entropy(o, Yt["tr"][i]), steps=30 * (len(tr) // 64))
g = np.random.default_rng(seed + 1); Xtr = Xt["tr"].numpy()
mix = []
for c in range(4):
    j = g.permutation(len(Xtr)); lam = g.random(len(Xtr)).astype(np.float32)[:, None]; mix.append(lam * Xtr + (1 - lam) * Xtr[j])
Xall = torch.tensor(np.concatenate([Xtr, *mix])); lab = torch.cat([Yt["tr"], torch.full((4 * len(Xtr),), -1)])
with torch.no_grad(): tlog = teacher(Xall)
T, alpha = 2.0, 0.5
def kd_loss(o, i):
    kd = F.kl_div(F.log_softmax(o / T, 1), F.softmax(tlog[i] / T, 1), reduction="none").sum(1) * T * T
    l = lab[i]; ce = F.cross_entropy(o, l.clamp_min(0), reduction="none")
    per = torch.where(l >= 0, alpha * kd + (1 - alpha) * ce, kd); return per.mean()
steps = 30 * (len(Xall) // 64)
student, sb = fit(mk([8]), Xall, kd_loss, steps)
base, bb = fit(mk([8]), Xt["tr"], lambda o, i: F.cross_entropy(o, Yt["tr"][i]), steps)
nomix, nb = fit(mk([8]), Xt["tr"], lambda o, i: kd_loss(o, i), 30 * (len(tr) // 64))  # KD on labeled rows only
print(f"seed {seed}: teacher {acc(teacher,'te'):.4f} baseline {acc(base,'te'):.4f} (best ep {bb[1]}) "
      f"kd+mixup {acc(student,'te'):.4f} (best ep {sb[1]}) kd labeled only {acc(nomix,'te'):.4f}")
