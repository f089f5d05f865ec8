"""Framework overhead: the product's cached-mode training loop against a plain PyTorch KD loop, side by side.

    .venv/bin/python bench/overhead.py [--configs jobs/configs/quickstart.yaml,jobs/configs/own_text.yaml]
                                       [--min-steps 160] [--json OUT]

For each config (default: the quickstart's MLP student and the text example's tiny BERT), in one run:

* **product**: ``distill_ray.train.loop.run_training`` (TorchTrainer, one worker, ``train.mode=cached``,
  ``train.data_mode=memory``) on the config's verified soft-target cache;
* **plain**: a loop written here, in this process: the same cached train rows (read once into tensors, teacher logits
  stacked as float32 ``[K, N, C]`` once), the same student, batch size, optimizer and seed, and the
  same math per step as the product's cached path (``train_loop_per_worker``): the blend at the
  weights fit once on the labeled validation rows before training, then per row ``alpha * KD(student,
  blend(T)) + (1 - alpha) * CE`` on a labeled row and KD alone on an unlabeled one, one optimizer step. It runs once before the product with ``train.cpus_per_worker`` torch
  threads (what the worker reserves; column ``plain 1thr/s``), and once after it with as many torch
  threads as the product's worker actually ran with (reported by the worker): the ratio compares
  these two, like for like.

Overrides for both (the product through ``config.apply_overrides``): ``curriculum.scheduler=none``
(the plain loop has no curriculum), ``train.checkpoint_every_steps`` past the run (no mid-epoch
checkpoint; the epoch-end checkpoint and validation fall outside the timed epochs), and
``train.epochs`` = 1 + enough epochs for ``--min-steps`` timed steps. The data is the config's own,
so the trained teachers and the cache are reused (``prepare_teachers`` / ``build_cache``).

**Steady state** = samples of epochs 1.. / their seconds (epoch 0 is warm-up, excluded). For the
product the seconds of an epoch come from its own history: the last step row of every epoch is
logged with ``samples_per_s = samples this epoch / seconds since the epoch's first batch``, so
``seconds = steps * batch / samples_per_s``. The plain loop times its epochs the same way.
**Ratio** = plain samples/s / product samples/s (= product time per sample / plain's; aim <= 1.10).

**Fixed cost** = seconds from the ``run_training`` call to the end of the first step (Ray Train's
worker group, reading the shard, building the student). The worker records it through the
product's ``trace_file`` hook; a Ray ``worker_process_setup_hook`` set here makes that hook write
only the first step's wall clock (and the worker's torch threads) and do nothing after, so no
per-step cost is added. The plain loop's fixed cost: reading the rows + building the student + its
first step. **Overhead** = ``run_training``'s wall time less the seconds of its steps (start-up,
validation, checkpoints and reports, the end of the run).

**Before/after**: the product's run is repeated with Ray Train's own controller settings
(``RAY_DEFAULTS``: workers polled every 2 s, a preemption watcher per run), which the product
replaces (``distill_ray/train/controller_env.py``); both fixed costs and overheads are printed. The
product's run comes first, so warm-up, if any, counts against it.

The text example's data (``own_text.yaml``) is written by ``jobs/make_example_data.py``; the bench
writes it when it is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_CONFIGS = "jobs/configs/quickstart.yaml,jobs/configs/own_text.yaml"
REPO = Path(__file__).resolve().parents[1]
# Ray Train's own controller settings, which distill_ray.train.controller_env replaces: the "before".
RAY_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def first_step_hook() -> None:
    """Runs in every Ray worker process: the product's per-batch trace writes the first step's time
    (and torch's thread count) once per trace file, then costs a set lookup per step."""
    import time as _time

    import torch as _torch

    import distill_ray.train.loop as train_module

    done: set[str] = set()

    def first_step_only(path, rank, epoch, step, ids):
        if path and path not in done:
            done.add(path)
            with open(path, "a") as f:
                f.write(f"{_time.time()} {_torch.get_num_threads()}\n")

    train_module._trace_batch = first_step_only


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-cpus", type=int, default=max(4, 2 * (os.cpu_count() or 1)),
                        help="logical CPUs of the local Ray (default: connect_ray's, 2 x cores, at least 4)")
    parser.add_argument("--omp-threads", type=int, default=None,
                        help="set OMP_NUM_THREADS in every Ray worker (default: unset, as the product ships; the "
                             "Train worker then runs torch with all cores' threads whatever CPUs it reserves)")


def start_ray(args) -> None:
    """A Ray of its own (never one a test suite runs beside it), sized like connect_ray's local one."""
    import ray

    from distill_ray.pipeline import local_parquet_settings, local_worker_pool_settings

    local_parquet_settings(str(max(1, (os.cpu_count() or 2) // 2)))  # the product's local-Ray Parquet reader
    local_worker_pool_settings()  # and its worker pool
    env = {"worker_process_setup_hook": first_step_hook}
    if args.omp_threads:
        env["env_vars"] = {"OMP_NUM_THREADS": str(args.omp_threads)}
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env,
             logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False


# --- configs ------------------------------------------------------------------------------------------

def bench_config(path: str, epochs: int, extra: list[str]):
    import yaml

    from distill_ray.config import apply_overrides, config_from_dict

    raw = yaml.safe_load(Path(path).read_text())
    overrides = ["train.mode=cached", "train.data_mode=memory", "train.num_workers=1", "curriculum.scheduler=none",
                 f"train.epochs={epochs}", f"train.checkpoint_every_steps={10**9}", "train.baseline=false",
                 "train.max_failures=0", *extra]
    return config_from_dict(apply_overrides(raw, overrides))


# --- the plain loop -----------------------------------------------------------------------------------

def read_rows(cache, names: tuple[str, ...], split: str = "train") -> dict[str, np.ndarray]:
    """A cached split's rows as numpy, sorted by id (what the product's kept shard holds)."""
    cols = ["id", "x", "label", *(f"{n}/logits" for n in names)]
    parts: dict[str, list[np.ndarray]] = {}
    for batch in cache.dataset(split, cols).iter_batches(batch_size=4096, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.asarray(v))
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(rows["id"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


def fit_weights(blend, teachers: torch.Tensor, labels: torch.Tensor, lr: float, steps: int) -> None:
    """The learned blend's weights fit once, before training, to the labeled validation rows (the
    product's rule): full-batch Adam on the blended teachers' NLL of the labels."""
    params = [p for p in blend.parameters() if p.requires_grad]
    keep = labels >= 0
    teachers, labels = teachers[:, keep], labels[keep]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = blend.weight_loss(teachers, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def plain_loop(cfg, cache, info, threads: int) -> dict:
    """A plain PyTorch KD loop, the product's cached-mode math, timed per epoch: blend weights fit on
    validation before the first step and fixed after; per row, a labeled row learns
    ``alpha * KD + (1 - alpha) * CE``, an unlabeled one (label -1, the transfer set) KD alone."""
    import torch.nn.functional as F

    from distill_ray.kd.blending import TeacherBlend
    from distill_ray.kd.losses import kd_divergence_to_probs
    from distill_ray.models import build_model, forward_logits

    t, loss_cfg = cfg.train, cfg.loss
    torch.set_num_threads(threads)
    names = cfg.teacher_names()
    start = time.perf_counter()
    rows, val = read_rows(cache, names), read_rows(cache, names, "val")
    x_all = torch.from_numpy(np.ascontiguousarray(rows["x"]))
    y_all = torch.from_numpy(rows["label"].astype(np.int64))
    teachers = torch.from_numpy(np.stack([rows[f"{n}/logits"].astype(np.float32) for n in names]))  # [K, N, C]
    torch.manual_seed(t.seed)
    student = build_model(cfg.student.arch, tuple(info.input_shape), info.num_classes, cfg.student.options)
    student.train()
    if cfg.blend.kind not in ("uniform", "learned_global"):
        raise SystemExit(f"the plain loop blends uniform or learned_global teachers, not {cfg.blend.kind}")
    blend = TeacherBlend(cfg.blend.kind, len(names), num_classes=info.num_classes)
    if cfg.blend.kind == "learned_global":
        fit_weights(blend, torch.from_numpy(np.stack([val[f"{n}/logits"].astype(np.float32) for n in names])),
                    torch.from_numpy(val["label"].astype(np.int64)), cfg.blend.lr, cfg.blend.fit_steps)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay),
           "adam": lambda p: torch.optim.Adam(p, lr=t.lr, weight_decay=t.weight_decay),
           "adamw": lambda p: torch.optim.AdamW(p, lr=t.lr, weight_decay=t.weight_decay)}[t.optimizer](
        student.parameters())
    T, alpha, smoothing = loss_cfg.temperature, loss_cfg.alpha, loss_cfg.label_smoothing
    n, batch = len(y_all), t.batch_size
    steps_per_epoch = n // batch
    generator = torch.Generator().manual_seed(t.seed)
    epochs, first_step_s = [], None
    for epoch in range(t.epochs):
        order = torch.randperm(n, generator=generator)
        epoch_start = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            x, y, teacher = x_all[idx], y_all[idx], teachers[:, idx]
            logits = forward_logits(student, x).float()
            with torch.no_grad():
                target = blend(teacher, temperature=T)
            kd = kd_divergence_to_probs(logits, target, kind=loss_cfg.kind, temperature=T,
                                        skew_alpha=loss_cfg.skew_alpha, reduction="none")
            task = F.cross_entropy(logits, y.clamp_min(0), reduction="none", label_smoothing=smoothing)
            loss = torch.where(y >= 0, alpha * kd + (1 - alpha) * task, kd).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if first_step_s is None:
                first_step_s = time.perf_counter() - start
        epochs.append({"steps": steps_per_epoch, "seconds": time.perf_counter() - epoch_start})
    return {"epochs": epochs, "fixed_s": first_step_s, "final_loss": loss.item(), "threads": torch.get_num_threads()}


# --- the product ----------------------------------------------------------------------------------------

def watch_first_line(path: Path, stop: threading.Event, out: dict) -> None:
    while not stop.is_set():
        if path.exists() and path.stat().st_size:
            out["seen_at"] = time.time()
            return
        time.sleep(0.005)


def wait_for_free_cpus(timeout_s: float = 120.0) -> None:
    """Until the previous run's Train worker has given its CPU back: Ray tears a finished run down
    asynchronously, and a run started meanwhile (online: worker + teacher stages) left no CPU for its
    Ray Data read tasks and hung on 2 cores ("Cluster resources are not enough to run any task")."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0) - 1e-6:
            return
        time.sleep(0.5)
    print(f"warning: {ray.available_resources().get('CPU', 0)} of {ray.cluster_resources().get('CPU', 0)} "
          "logical CPUs free after waiting; starting anyway", flush=True)


def product_run(cfg, inputs, workdir: Path, name: str, env: dict | None = None) -> dict:
    """One ``run_training``, timed; ``env``: variables set for it only (Ray's defaults for the "before")."""
    from distill_ray.train.loop import load_trained_student, run_training

    wait_for_free_cpus()
    trace = workdir / f"{name}.first_step"
    trace.unlink(missing_ok=True)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    called = time.time()
    start = time.perf_counter()
    try:
        result = run_training(cfg, inputs, str(workdir / "ray_results"), name, trace_file=str(trace))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    wall = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"{name}: training failed: {result.error}")
    _, history, state = load_trained_student(cfg, inputs, result.checkpoint)
    first_at, threads = trace.read_text().split()[:2]
    per_rank_batch = max(1, cfg.train.batch_size // cfg.train.num_workers)
    steps = [r for r in history if r.get("kind") != "epoch"]
    epochs, prev_step = [], 0
    for row in (r for r in history if r.get("kind") == "epoch"):
        last = [r for r in steps if r["epoch"] == row["epoch"]][-1]  # logged at the epoch's last step
        n_steps = row["step"] - prev_step
        prev_step = row["step"]
        epochs.append({"steps": n_steps, "seconds": n_steps * per_rank_batch / last["samples_per_s"],
                       "first_batch_s": row.get("first_batch_s", 0.0)})
    stepping = sum(e["seconds"] for e in epochs)
    return {"epochs": epochs, "fixed_s": float(first_at) - called, "wall_s": wall, "threads": int(threads),
            "overhead_s": wall - stepping,
            "steps": int(state["step"]), "final_loss": steps[-1]["loss"],
            "val_accuracy": [r for r in history if r.get("kind") == "epoch"][-1].get("val_accuracy")}


def steady(run: dict, batch: int) -> dict:
    timed = run["epochs"][1:]
    steps = sum(e["steps"] for e in timed)
    seconds = sum(e["seconds"] for e in timed)
    per_epoch = [e["steps"] * batch / e["seconds"] for e in timed]
    # With the wait for each epoch's first batch: what an epoch costs per step once it is asked for
    # (online, the teacher stages can fill ahead while that wait runs, so steps alone flatter it).
    waited = seconds + sum(e.get("first_batch_s", 0.0) for e in timed)
    return {"steps": steps, "seconds": seconds, "samples_per_s": steps * batch / seconds,
            "ms_per_step": 1000 * seconds / steps, "ms_per_step_with_wait": 1000 * waited / steps,
            "first_batch_s": [e.get("first_batch_s", 0.0) for e in timed],
            "epoch_spread": (min(per_epoch), max(per_epoch))}


def ensure_example_data(cfg) -> None:
    """The own-data examples (own_text.yaml's JSONL) live in the cache, written by jobs/make_example_data.py:
    write them when the config's file is missing there."""
    import runpy

    from distill_ray.data.bundled import cache_root

    examples = cache_root() / "examples"
    path = Path(cfg.data.path).expanduser() if cfg.data.path else None
    if path is not None and not path.exists() and path.resolve().is_relative_to(examples.resolve()):
        print(f"{path} is missing: writing the examples (jobs/make_example_data.py)", flush=True)
        runpy.run_path(str(REPO / "jobs/make_example_data.py"))["main"](examples)


def bench_one(path: str, args, workdir: Path) -> dict:
    from distill_ray.models import build_model, num_params
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers, training_inputs

    probe = bench_config(path, 2, args.set)
    ensure_example_data(probe)
    data = load_data(probe)
    dirs = prepare_teachers(probe, data)  # reused when trained for this data
    cache = build_cache(probe, data, dirs)  # reused when verified
    rows = cache.rows("train")
    batch = probe.train.batch_size
    steps_per_epoch = rows // batch
    epochs = 1 + max(1, math.ceil(args.min_steps / steps_per_epoch))
    cfg = bench_config(path, epochs, args.set)
    info = data.info
    params = num_params(build_model(cfg.student.arch, tuple(info.input_shape), info.num_classes, cfg.student.options))
    print(f"[{cfg.name}] {rows:,} train rows, batch {batch}, {steps_per_epoch} steps/epoch, {epochs} epochs "
          f"(epoch 0 warm-up), student {cfg.student.arch} {params:,} params", flush=True)
    reserved = max(1, int(cfg.train.cpus_per_worker))
    plain_reserved = plain_loop(cfg, cache, info, reserved)
    print(f"[{cfg.name}] plain, {reserved} thread(s): {steady(plain_reserved, batch)['samples_per_s']:,.0f} samples/s",
          flush=True)
    inputs = training_inputs(cfg, cache, info)
    product = product_run(cfg, inputs, workdir, f"overhead-{cfg.name}")
    print(f"[{cfg.name}] product: {steady(product, batch)['samples_per_s']:,.0f} samples/s, worker torch threads "
          f"{product['threads']}, fixed cost {product['fixed_s']:.1f}s, run_training wall {product['wall_s']:.1f}s",
          flush=True)
    before = product_run(cfg, inputs, workdir, f"overhead-{cfg.name}-ray-defaults", env=RAY_DEFAULTS)
    print(f"[{cfg.name}] product with Ray Train's own controller settings: fixed cost {before['fixed_s']:.1f}s, "
          f"overhead {before['overhead_s']:.1f}s (run_training wall {before['wall_s']:.1f}s)", flush=True)
    # Like for like: the plain loop again, with as many torch threads as the product's worker had.
    plain_same = plain_loop(cfg, cache, info, product["threads"])
    print(f"[{cfg.name}] plain, {product['threads']} thread(s): {steady(plain_same, batch)['samples_per_s']:,.0f} "
          f"samples/s", flush=True)
    if product["steps"] != epochs * steps_per_epoch:
        raise RuntimeError(f"the product took {product['steps']} steps, the plain loop {epochs * steps_per_epoch}")
    p, pa, pb = steady(product, batch), steady(plain_same, batch), steady(plain_reserved, batch)
    plain_sps, plain_ms = pa["samples_per_s"], pa["ms_per_step"]

    return {
        "config": path, "name": cfg.name, "student": cfg.student.arch, "params": params, "batch_size": batch,
        "train_rows": rows, "epochs": epochs, "timed_steps": p["steps"],
        "plain_samples_per_s": plain_sps, "plain_reserved_threads": reserved, "plain_reserved_samples_per_s": pb["samples_per_s"],
        "ratio_vs_reserved_threads": pb["samples_per_s"] / p["samples_per_s"],
        "product_samples_per_s": p["samples_per_s"], "ratio": plain_sps / p["samples_per_s"],
        "plain_ms_per_step": plain_ms, "product_ms_per_step": p["ms_per_step"],
        "extra_ms_per_step": p["ms_per_step"] - plain_ms,
        "product_epoch_samples_per_s_range": p["epoch_spread"],
        "plain_fixed_s": plain_same["fixed_s"], "product_fixed_s": product["fixed_s"],
        "product_wall_s": product["wall_s"], "product_overhead_s": product["overhead_s"],
        "before": {"fixed_s": before["fixed_s"], "overhead_s": before["overhead_s"], "wall_s": before["wall_s"],
                   "env": RAY_DEFAULTS}, "threads": {"plain": plain_same["threads"], "worker": product["threads"]},
        "final_loss": {"plain": plain_same["final_loss"], "product": product["final_loss"]},
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'student':<22} {'params':>8} {'batch':>5} {'steps':>5} {'thr':>3} {'plain/s':>8} {'product/s':>9} "
              f"{'ratio':>6} {'plain ms':>8} {'prod ms':>8} {'+ms/step':>8} {'plain 1thr/s':>12} {'fixed plain':>11} "
              f"{'fixed prod':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        label = f"{r['name']} ({r['student']})"
        print(f"{label:<22} {r['params']:>8,} {r['batch_size']:>5} {r['timed_steps']:>5} {r['threads']['worker']:>3} "
              f"{r['plain_samples_per_s']:>8,.0f} {r['product_samples_per_s']:>9,.0f} {r['ratio']:>6.2f} "
              f"{r['plain_ms_per_step']:>8.2f} {r['product_ms_per_step']:>8.2f} {r['extra_ms_per_step']:>+8.2f} "
              f"{r['plain_reserved_samples_per_s']:>12,.0f} {r['plain_fixed_s']:>10.1f}s {r['product_fixed_s']:>9.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated configs (default {DEFAULT_CONFIGS})")
    parser.add_argument("--min-steps", type=int, default=160, help="steps timed after the warm-up epoch (default 160)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for both loops (repeatable); data.* overrides change the "
                             "data fingerprint, so teachers are retrained and the cache rebuilt")
    add_ray_args(parser)
    parser.add_argument("--workdir", default=None, help="checkpoints go here (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    import ray

    from distill_ray.pipeline import connect_ray

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="overhead-")) if temporary else Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    start_ray(args)
    connect_ray()  # already up: only sets the Ray Data context
    try:
        rows = [bench_one(path, args, workdir) for path in args.configs.split(",") if path.strip()]
    finally:
        ray.shutdown()
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"framework overhead, cached mode, 1 worker, data_mode=memory ({os.cpu_count()} cores, Ray {args.num_cpus} "
          f"logical CPUs, OMP_NUM_THREADS {args.omp_threads or 'unset'}; load average {os.getloadavg()[0]:.1f} "
          f"at the end)")
    print_table(rows)
    for r in rows:
        lo, hi = r["product_epoch_samples_per_s_range"]
        verdict = "met" if r["ratio"] <= 1.10 else "missed"
        print(f"{r['name']}: steady-state ratio plain/product = {r['ratio']:.2f} at {r['threads']['worker']} torch "
              f"thread(s) each (aim <= 1.10: {verdict}); {r['ratio_vs_reserved_threads']:.2f} against the plain loop at "
              f"the worker's reserved {r['plain_reserved_threads']} CPU; product epochs {lo:,.0f}..{hi:,.0f} samples/s; "
              f"fixed cost {r['product_fixed_s']:.1f}s (run_training wall {r['product_wall_s']:.1f}s)")
        b = r["before"]
        print(f"{r['name']}: Ray Train run's fixed cost (call to first step) {b['fixed_s']:.1f}s before -> "
              f"{r['product_fixed_s']:.1f}s after; overhead (wall less steps) {b['overhead_s']:.1f}s before -> "
              f"{r['product_overhead_s']:.1f}s after (before: Ray Train's controller settings {RAY_DEFAULTS})")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "ray_cpus": args.num_cpus,
                                               "omp_threads": args.omp_threads, "rows": rows},
                                              indent=2) + "\n")
        print(f"numbers: {args.json}")


if __name__ == "__main__":
    main()
