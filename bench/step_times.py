"""Step time of the same student and batch in three modes, measured side by side in one run.

    .venv/bin/python bench/step_times.py [--config jobs/configs/quickstart.yaml] [--steps 60]

student-only: forward + CE + backward + step (no teachers). cached: the same plus gathering cached
teacher logits, the learned blend update and the KD term. online: the same, but the targets come
from the teacher actors, the next batch requested before the current step runs (prefetch).
Teachers come from the config's recipes (trained on first use, reused after).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from distill_ray.blending import TeacherBlend
from distill_ray.config import load_config
from distill_ray.losses import kd_divergence_to_probs
from distill_ray.models import build_model, forward_logits
from distill_ray.pipeline import build_cache, connect_ray, load_data, prepare_teachers, teacher_specs
from distill_ray.teachers import TeacherPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cfg = load_config(args.config)
    connect_ray()
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    cache = build_cache(cfg, data, dirs)
    pool = TeacherPool(teacher_specs(cfg, dirs))
    b, T, alpha = cfg.train.batch_size, cfg.loss.temperature, cfg.loss.alpha
    # The first (steps + 1) batches of the cached train split, in memory (what a kept shard holds).
    rows = cache.dataset("train").take_batch((args.steps + 1) * b, batch_format="numpy")
    x_all, y_all = torch.from_numpy(np.array(rows["x"])), torch.from_numpy(np.array(rows["label"]))
    cached = np.stack([rows[f"{n}/logits"] for n in cfg.teacher_names()])
    batches = [torch.arange(i * b, (i + 1) * b) for i in range(args.steps + 1)]

    def run(mode: str) -> float:
        torch.manual_seed(0)
        student = build_model(cfg.student.arch, data.info.input_shape, data.info.num_classes, cfg.student.options)
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr)
        blend = TeacherBlend("learned_global", len(cfg.teachers))
        blend_opt = torch.optim.Adam(blend.parameters(), lr=cfg.blend.lr)
        pending = pool.submit(x_all[batches[0]].numpy()) if mode == "online" else None
        times = []
        for step in range(args.steps):
            start = time.perf_counter()
            idx = batches[step]
            x, y = x_all[idx], y_all[idx]
            logits = forward_logits(student, x)
            loss = F.cross_entropy(logits, y)
            if mode != "student-only":
                if mode == "online":
                    answers = pending.result()
                    pending = pool.submit(x_all[batches[step + 1]].numpy())
                    teacher = torch.stack([torch.tensor(answers[n]["logits"]) for n in cfg.teacher_names()])
                else:
                    teacher = torch.as_tensor(cached[:, idx.numpy()]).float()
                blend_loss = blend.weight_loss(teacher, y)
                blend_opt.zero_grad()
                blend_loss.backward()
                blend_opt.step()
                target = blend(teacher, temperature=T).detach()
                loss = alpha * kd_divergence_to_probs(logits, target, temperature=T) + (1 - alpha) * loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        if pending is not None:
            pending.result()
        return float(np.median(times[5:]) * 1000)  # skip warm-up steps

    results = {mode: run(mode) for mode in ("student-only", "cached", "online")}
    pool.shutdown()
    base = results["student-only"]
    print(f"\nstudent {cfg.student.arch} {dict(cfg.student.options)}, batch {b}, {len(cfg.teachers)} teachers, "
          f"{args.steps} steps, median ms/step:")
    for mode, ms in results.items():
        print(f"  {mode:<13} {ms:8.2f} ms   x{ms / base:6.2f} vs student-only")


if __name__ == "__main__":
    main()
