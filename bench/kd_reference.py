"""Plain-PyTorch reference for the quickstart setting, outside the product (no distill_ray training code).

    .venv/bin/python bench/kd_reference.py [--student-hidden 100] [--epochs 40] [--temperature 2]
        [--alpha 0.5] [--schedule cosine] [--lr 5e-3] [--seed 0] [--labeled 5000] [--teacher-cache PATH]

Setting: real Fashion-MNIST (``distill_ray.data.bundled.load_fashion_mnist``, val_fraction 0.1, split_seed 0:
54k train / 6k val / 10k test). Only ``--labeled`` seeded train rows (``default_rng(0).permutation``)
keep their labels; the rest is an unlabeled transfer set whose labels are never read.

1. Two teachers of different kinds, trained on the labeled rows only: a CNN (SmallCNN-like,
   channels (32, 64), hidden 256) and a wide MLP (hidden [1024, 1024]), Adam + cosine, each kept at
   its best validation epoch.
2. Scratch baseline: the one-hidden-layer MLP student on the labeled rows with CE, for as many
   optimizer steps as the KD student gets (so many more epochs), same schedule kind.
3. KD student: the same MLP on all train rows. Per row: KD = T^2 * KL(mean_k softmax(z_k / T) ||
   softmax(s / T)); unlabeled rows use KD, labeled rows alpha * KD + (1 - alpha) * CE.

Both students are selected on val (best epoch) and reported on test. Gap recovered =
(student - scratch) / (teacher - scratch), against the teachers' mean ensemble and the best teacher.
Everything runs single-threaded (torch.set_num_threads(1)). ``--teacher-cache`` saves/reuses the
teachers' logits (keyed by the teacher settings and seed) to iterate on student settings quickly.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill_ray.data.bundled import load_fashion_mnist


def cnn(channels=(32, 64), hidden=256, num_classes=10) -> nn.Module:
    layers, in_ch, side = [], 1, 28
    for ch in channels:
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
        in_ch, side = ch, side // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(in_ch * side * side, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def mlp(hidden: list[int], num_classes=10) -> nn.Module:
    layers, width = [nn.Flatten()], 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch=1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def train(model, x, y_or_none, loss_fn, *, epochs=None, steps=None, batch, lr, schedule, warmup_frac,
          val, seed):
    """Adam on (x, targets) for ``epochs`` (or ``steps``); keeps the best-val-epoch weights.

    ``loss_fn(model_logits, idx)`` gets the batch's row indices. Returns (model, best_val, epochs run).
    """
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(x) / batch)
    total = steps if steps is not None else epochs * per_epoch
    n_epochs = math.ceil(total / per_epoch)
    warmup = max(1, int(warmup_frac * total))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, step = -1.0, None, 0
    for _ in range(n_epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, schedule, warmup)
            loss = loss_fn(model(x[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = accuracy(logits_of(model, val[0]), val[1])
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model, best, n_epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student-hidden", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=40, help="KD student epochs over all train rows")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5, help="KD weight on labeled rows")
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of steps")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="teacher and student init/order seed")
    ap.add_argument("--labeled", type=int, default=5000)
    ap.add_argument("--cnn-epochs", type=int, default=10)
    ap.add_argument("--mlp-epochs", type=int, default=20)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--teacher-cache", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    clock = {}

    t0 = time.perf_counter()
    d = load_fashion_mnist(val_fraction=0.1, split_seed=0)
    x, y = torch.from_numpy(d.train.inputs), torch.from_numpy(d.train.labels)
    val = (torch.from_numpy(d.val.inputs), torch.from_numpy(d.val.labels))
    xt, yt = torch.from_numpy(d.test.inputs), torch.from_numpy(d.test.labels)
    lab = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(y))[:a.labeled]))
    is_lab = torch.zeros(len(y), dtype=torch.bool)
    is_lab[lab] = True
    y_masked = torch.where(is_lab, y, torch.full_like(y, -100))  # unlabeled rows' labels are never used
    xl, yl = x[lab], y[lab]
    clock["data"] = time.perf_counter() - t0

    # --- teachers (labeled rows only) ---
    t0 = time.perf_counter()
    teachers = {"teacher_cnn": (lambda: cnn(), a.cnn_epochs), "teacher_mlp": (lambda: mlp([1024, 1024]), a.mlp_epochs)}
    key = f"l{a.labeled}_s{a.seed}_c{a.cnn_epochs}_m{a.mlp_epochs}_lr{a.teacher_lr}"
    cache = a.teacher_cache and a.teacher_cache.with_name(f"{a.teacher_cache.stem}_{key}.pt")
    rows, t_train, t_test = [], [], []
    if cache and cache.exists():
        saved = torch.load(cache)
    else:
        saved = {}
        for name, (make, ep) in teachers.items():
            torch.manual_seed(a.seed)
            m, best_val, _ = train(make(), xl, None, lambda out, idx: F.cross_entropy(out, yl[idx]), epochs=ep,
                                   batch=128, lr=a.teacher_lr, schedule="cosine", warmup_frac=0.05, val=val,
                                   seed=a.seed)
            saved[name] = {"train": logits_of(m, x), "test": logits_of(m, xt), "params": params(m)}
        if cache:
            torch.save(saved, cache)
    for name in teachers:
        t_train.append(saved[name]["train"])
        t_test.append(saved[name]["test"])
        rows.append((name, saved[name]["params"], accuracy(t_test[-1], yt)))
    ens_acc = accuracy(torch.stack([z.softmax(1) for z in t_test]).mean(0), yt)
    rows.append(("teacher_mean_ensemble", sum(r[1] for r in rows), ens_acc))
    clock["teachers"] = time.perf_counter() - t0

    # soft targets: mean of the teachers' softmax at temperature T, fixed for the whole run
    T = a.temperature
    soft = torch.stack([(z / T).softmax(1) for z in t_train]).mean(0)

    def kd_loss(out, idx):
        kd = F.kl_div(F.log_softmax(out / T, 1), soft[idx], reduction="none").sum(1) * T * T
        lab_b = is_lab[idx]
        ce = F.cross_entropy(out, y_masked[idx].clamp(min=0), reduction="none")
        return torch.where(lab_b, a.alpha * kd + (1 - a.alpha) * ce, kd).mean()

    common = dict(batch=a.batch, lr=a.lr, schedule=a.schedule, warmup_frac=a.warmup, val=val, seed=a.seed)
    kd_steps = a.epochs * math.ceil(len(x) / a.batch)

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    scratch, _, sc_ep = train(mlp([a.student_hidden]), xl, None, lambda out, idx: F.cross_entropy(out, yl[idx]),
                              steps=kd_steps, **common)
    clock[f"scratch ({sc_ep} ep)"] = time.perf_counter() - t0
    sc_acc = accuracy(logits_of(scratch, xt), yt)

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    student, _, _ = train(mlp([a.student_hidden]), x, None, kd_loss, epochs=a.epochs, **common)
    clock[f"kd student ({a.epochs} ep)"] = time.perf_counter() - t0
    st_acc = accuracy(logits_of(student, xt), yt)
    rows += [("scratch (labeled only)", params(scratch), sc_acc), ("kd student", params(student), st_acc)]

    print(f"\nseed={a.seed} labeled={a.labeled} hidden={a.student_hidden} epochs={a.epochs} T={T} alpha={a.alpha} "
          f"schedule={a.schedule} lr={a.lr} batch={a.batch} steps={kd_steps}")
    print(f"{'model':<24}{'params':>10}{'test acc':>10}")
    for name, n, acc in rows:
        print(f"{name:<24}{n:>10,}{acc:>10.4f}")
    best_t = max(r[2] for r in rows[:2])
    for label, ref in (("teacher mean ensemble", ens_acc), ("best teacher", best_t)):
        print(f"gap recovered vs {label}: {(st_acc - sc_acc) / (ref - sc_acc):.1%}")
    print("wall s: " + ", ".join(f"{k} {v:.1f}" for k, v in clock.items()))


if __name__ == "__main__":
    main()
