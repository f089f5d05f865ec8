"""Training memory versus data size: Ray Train workers streaming their shard of the cached dataset.

    .venv/bin/python bench/streaming_memory.py [--rows 120000] [--features 256] [--object-store-mb 150]
        [--scales 1,4] [--mode stream|memory] [--workdir DIR] [--json PATH]

The measured run (defaults; about 4 minutes on 2 cores, ~0.8 GB of temporary disk):

    .venv/bin/python bench/streaming_memory.py --json /tmp/streaming_memory.json

What it does, in one run and one local Ray (``num_cpus=4``, an object store of ``--object-store-mb``,
deliberately several times smaller than the largest dataset):

1. For each scale s in ``--scales`` it writes a synthetic soft-target cache of ``s * --rows`` rows
   with the product's own writer (``soft_targets.write_cache``): Ray Data tasks generate the rows
   (``ray.data.range(n).map_batches(...)``: ``id``, ``x`` float32 [F] = class prototype + noise,
   ``label`` = id % 10, two teachers' float16 logits, ``difficulty/ensemble_entropy``, ``split``
   train/val 90/10) and write the Parquet files themselves; the driver never holds the rows.
2. It trains the student (an MLP, hidden [32]) for one epoch on that cache with 2 Ray Train
   workers in cached mode (``pipeline.training_inputs`` + ``train.run_training``), each worker
   streaming its own id-hashed shard (``train.data_mode=stream``; ``--mode memory`` keeps the shard
   in memory instead, for contrast).
3. It reads the run's history from the final checkpoint (``train.load_trained_student``): the epoch
   row's ``peak_rss_mb`` is the largest peak RSS of any worker process (``ru_maxrss``, taken after
   training and validation), the last step row's ``samples_per_s`` the loop's own throughput.

How to read the output: one table row per scale, side by side. ``disk MB`` and ``x store`` are the
cache's bytes on disk and how many object stores they would fill; ``rows/s`` is train rows over the
wall time of ``run_training`` (Ray Train start-up included), ``loop/s`` the loop's own samples/s;
``steps`` must equal ``expected`` (the smaller rank shard // per-rank batch: every full batch the
epoch allows was trained; DDP ranks take equal steps, so the larger shard's surplus and the partial
last batch are dropped, as in every epoch). ``worker MiB`` is the worker peak RSS; ``driver MiB`` the driver's ``ru_maxrss`` after
that scale (a running maximum over the whole process, so it never drops) and ``drv delta`` the change
of the driver's current RSS across that scale. The last lines give the largest/smallest-scale
ratios and the worker's RSS growth in MiB next to the growth of the cache per worker: with streaming
the worker ratio stays below 1.3 ("flat") although the data grows ``s`` times and exceeds the object
store; with ``--mode memory`` the worker holds its shard and the ratio grows with the data ("grows").
``ru_maxrss`` also counts the shared object-store pages a worker has mapped, so a streaming worker's
peak can rise by up to about the object store's size between a small and a large dataset before it
levels off; what it holds privately does not follow the data.
``--json PATH`` writes every number. The work directory (a temporary one unless ``--workdir``) holds
the caches and Ray Train's checkpoints; a temporary one is removed at the end.
"""

from __future__ import annotations

import os

# Ray Train v2 is chosen when ray.train is first imported (distill_ray.train.loop imports it).
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
TEACHERS = ("t1", "t2")
NUM_WORKERS = 2
BATCH_SIZE = 256
FLAT_RATIO = 1.3  # a worker peak RSS ratio below this is reported as flat


# --- the synthetic cache ---------------------------------------------------------------------------

def split_of(ids: np.ndarray) -> np.ndarray:
    """'val' for 10% of ids (every 10th block of ten, so labels = id % 10 stay balanced), else 'train'."""
    return np.where((ids // 10) % 10 == 0, "val", "train")


def make_rows(batch: dict[str, np.ndarray], features: int) -> dict[str, np.ndarray]:
    """Cache rows for a batch of ``ray.data.range`` ids, as a Ray Data task makes them: learnable
    (x = the label's prototype + noise) and deterministic (prototypes from a fixed seed, noise seeded
    by the batch's ids)."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    n = len(ids)
    label = ids % NUM_CLASSES
    prototypes = np.random.default_rng(0).standard_normal((NUM_CLASSES, features)).astype(np.float32)
    rng = np.random.default_rng([int(ids.min()) if n else 0, n, 1])
    x = prototypes[label] + 2.0 * rng.standard_normal((n, features), dtype=np.float32)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[label]
    logits = {"t1": 4.0 * onehot + rng.standard_normal((n, NUM_CLASSES), dtype=np.float32),
              "t2": 3.0 * onehot + 1.5 * rng.standard_normal((n, NUM_CLASSES), dtype=np.float32)}
    # Entropy of the mean teacher distribution (what cache/build.py's finish_rows stores, in numpy).
    probs = np.stack([np.exp(v - v.max(1, keepdims=True)) for v in logits.values()])
    probs /= probs.sum(-1, keepdims=True)
    mean = probs.mean(0)
    entropy = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(-1)
    return {"id": ids, "x": x, "label": label.astype(np.int64),
            **{f"{t}/logits": v.astype(np.float16) for t, v in logits.items()},
            "difficulty/ensemble_entropy": entropy.astype(np.float32),
            "split": split_of(ids)}


def write_synthetic_cache(directory: Path, n: int, features: int):
    """Write and open the cache of ``n`` rows; Ray Data tasks make and write the rows."""
    import ray.data

    from distill_ray.cache.soft_targets import CacheSpec, CachedData, write_cache

    spec = CacheSpec(teacher_fingerprints={"t1": "a" * 64, "t2": "b" * 64}, data_fingerprint=f"bench-{n}",
                     num_classes=NUM_CLASSES, topk=None, dtype="float16")
    # Blocks of ~8192 rows (cache.shard_rows' default): one Parquet file per block and split.
    ds = ray.data.range(n, override_num_blocks=max(1, n // 8192)).map_batches(
        make_rows, fn_kwargs={"features": features}, batch_format="numpy", batch_size=4096)
    write_cache(directory, spec, ds)
    return CachedData.open(directory, spec)


# --- one scale: cache, train, measure ---------------------------------------------------------------

def experiment_config(mode: str):
    from distill_ray.config import config_from_dict

    recipe_teacher = {"source": "recipe", "recipe": "mlp"}  # never built: the cache holds their logits
    return config_from_dict({
        "name": "streaming-memory-bench",
        "teachers": [{"name": t, **recipe_teacher} for t in TEACHERS],
        "student": {"arch": "mlp", "options": {"hidden": [32]}},
        "loss": {"kind": "forward_kl"},
        "blend": {"kind": "learned_global"},
        "curriculum": {"scheduler": "none"},
        "train": {"epochs": 1, "num_workers": NUM_WORKERS, "cpus_per_worker": 1, "batch_size": BATCH_SIZE,
                  "data_mode": mode, "checkpoint_every_steps": 10**9, "baseline": False, "max_failures": 0},
        "tracking": {"log_every_steps": 10, "wandb": "disabled"},
    })


def current_rss_mb() -> float:
    """This process's resident memory now (MiB), from /proc; the running peak where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rank_shard_rows(n: int) -> list[int]:
    """Train rows each rank owns (the same id hash the trainer uses), computed from the ids alone."""
    from distill_ray.train.streams import rank_of

    ids = np.arange(n, dtype=np.int64)
    train_ids = ids[split_of(ids) == "train"]
    return np.bincount(rank_of(train_ids, NUM_WORKERS), minlength=NUM_WORKERS).tolist()


def run_scale(scale: int, args, workdir: Path) -> dict:
    from distill_ray.pipeline import training_inputs
    from distill_ray.data.sources import DataInfo
    from distill_ray.train.loop import load_trained_student, run_training

    n = scale * args.rows
    rss_before = current_rss_mb()
    print(f"[{scale}x] writing a cache of {n:,} rows x {args.features} features ...", flush=True)
    start = time.perf_counter()
    cache = write_synthetic_cache(workdir / f"cache-{scale}x", n, args.features)
    write_s = time.perf_counter() - start
    disk_bytes = sum(os.path.getsize(f) for split in ("train", "val", "test") for f in cache.files(split))
    n_train, n_val = cache.rows("train"), cache.rows("val")
    shards = rank_shard_rows(n)
    if sum(shards) != n_train:
        raise RuntimeError(f"the cache holds {n_train} train rows, the split rule gives {sum(shards)}")
    print(f"[{scale}x] {disk_bytes / 1e6:,.1f} MB on disk ({n_train:,} train, {n_val:,} val rows) "
          f"in {write_s:.1f}s; training one epoch ({args.mode}) ...", flush=True)

    cfg = experiment_config(args.mode)
    info = DataInfo(task="classification", kind="tabular", num_classes=NUM_CLASSES,
                    class_names=tuple(map(str, range(NUM_CLASSES))), input_shape=(args.features,),
                    counts={"train": n_train, "val": n_val, "test": 0},
                    labeled={"train": n_train, "val": n_val, "test": 0}, fingerprint="bench")
    inputs = training_inputs(cfg, cache, info)
    start = time.perf_counter()
    result = run_training(cfg, inputs, str(workdir / "ray_results"), f"{args.mode}-{scale}x")
    train_s = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"training at {scale}x failed: {result.error}")
    _, history, state = load_trained_student(cfg, inputs, result.checkpoint)
    epoch = [r for r in history if r.get("kind") == "epoch"][-1]
    steps_rows = [r for r in history if r.get("kind") != "epoch"]
    per_rank = BATCH_SIZE // NUM_WORKERS
    out = {
        "scale": scale, "rows": n, "train_rows": n_train, "val_rows": n_val, "rank_shard_rows": shards,
        "disk_bytes": disk_bytes, "write_s": round(write_s, 2), "train_wall_s": round(train_s, 2),
        "train_rows_per_s": round(n_train / train_s, 1),
        "loop_samples_per_s": round(steps_rows[-1]["samples_per_s"], 1) if steps_rows else None,
        "steps": int(state["step"]), "expected_steps": min(shards) // per_rank,
        "rows_trained": int(state["step"]) * per_rank * NUM_WORKERS,
        "val_accuracy": epoch.get("val_accuracy"),
        "worker_peak_rss_mb": epoch["peak_rss_mb"],
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "driver_rss_before_mb": round(rss_before, 1),
        "driver_rss_after_mb": round(current_rss_mb(), 1),
    }
    out["driver_rss_delta_mb"] = round(out["driver_rss_after_mb"] - out["driver_rss_before_mb"], 1)
    print(f"[{scale}x] {out['steps']} steps in {train_s:.1f}s, worker peak RSS {out['worker_peak_rss_mb']:.0f} MiB, "
          f"val accuracy {out['val_accuracy']:.3f}", flush=True)
    return out


# --- report -----------------------------------------------------------------------------------------

def print_table(rows: list[dict], store_bytes: int) -> None:
    header = (f"{'scale':>5} {'rows':>9} {'train':>9} {'disk MB':>8} {'x store':>7} {'train s':>7} {'rows/s':>8} "
              f"{'loop/s':>8} {'steps':>6} {'expected':>8} {'worker MiB':>10} {'driver MiB':>10} {'drv delta':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        loop = f"{r['loop_samples_per_s']:,.0f}" if r["loop_samples_per_s"] is not None else "-"
        print(f"{str(r['scale']) + 'x':>5} {r['rows']:>9,} {r['train_rows']:>9,} {r['disk_bytes'] / 1e6:>8.1f} "
              f"{r['disk_bytes'] / store_bytes:>7.2f} {r['train_wall_s']:>7.1f} {r['train_rows_per_s']:>8,.0f} "
              f"{loop:>8} {r['steps']:>6} {r['expected_steps']:>8} {r['worker_peak_rss_mb']:>10.1f} "
              f"{r['driver_peak_rss_mb']:>10.1f} {r['driver_rss_delta_mb']:>+9.1f}")


def summary(rows: list[dict], store_bytes: int) -> dict:
    lo, hi = rows[0], rows[-1]
    return {"from_scale": lo["scale"], "to_scale": hi["scale"],
            "data_ratio": round(hi["disk_bytes"] / lo["disk_bytes"], 3),
            "largest_data_over_object_store": round(hi["disk_bytes"] / store_bytes, 3),
            "worker_peak_rss_ratio": round(hi["worker_peak_rss_mb"] / lo["worker_peak_rss_mb"], 3),
            "worker_peak_rss_growth_mb": round(hi["worker_peak_rss_mb"] - lo["worker_peak_rss_mb"], 1),
            "driver_peak_rss_ratio": round(hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"], 3)}


# --- main -------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120_000, help="rows of the 1x cache (default 120000)")
    parser.add_argument("--features", type=int, default=256, help="float32 features per row (default 256)")
    parser.add_argument("--object-store-mb", type=int, default=150, help="Ray object store size (default 150)")
    parser.add_argument("--scales", default="1,4", help="comma-separated multiples of --rows (default 1,4)")
    parser.add_argument("--mode", choices=("stream", "memory"), default="stream",
                        help="train.data_mode of the workers (default stream; memory keeps the shard)")
    parser.add_argument("--workdir", default=None, help="where caches and checkpoints go (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    scales = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    if not scales or scales[0] < 1:
        parser.error("--scales needs positive integers, e.g. 1,4")

    import ray
    import ray.data

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="streaming-memory-")) if temporary else Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=4, object_store_memory=args.object_store_mb * 2**20,
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        store_bytes = int(ray.cluster_resources().get("object_store_memory", args.object_store_mb * 2**20))
        print(f"object store {store_bytes / 2**20:.0f} MiB; mode {args.mode}; {NUM_WORKERS} workers, batch "
              f"{BATCH_SIZE}; driver RSS {current_rss_mb():.0f} MiB at start", flush=True)
        rows = [run_scale(s, args, workdir) for s in scales]
    finally:
        ray.shutdown()
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"training memory vs data size ({args.mode} mode, object store {store_bytes / 2**20:.0f} MiB, "
          f"{args.features} features)")
    print_table(rows, store_bytes)
    s = summary(rows, store_bytes)
    if len(rows) > 1:
        ratio = s["worker_peak_rss_ratio"]
        verdict = "flat" if ratio < FLAT_RATIO else "grows"
        tag = f"{s['to_scale']}x/{s['from_scale']}x"
        print(f"driver peak RSS {tag} = {s['driver_peak_rss_ratio']:.2f} (running max; driver RSS delta at "
              f"{s['to_scale']}x {rows[-1]['driver_rss_delta_mb']:+.1f} MiB)")
        grown = rows[-1]["worker_peak_rss_mb"] - rows[0]["worker_peak_rss_mb"]
        per_worker = (rows[-1]["disk_bytes"] - rows[0]["disk_bytes"]) / NUM_WORKERS / 2**20
        print(f"worker peak RSS {tag} = {ratio:.2f} ({verdict}: data {s['data_ratio']:.1f}x larger, "
              f"{s['largest_data_over_object_store']:.1f}x the object store; RSS {grown:+.0f} MiB for "
              f"{per_worker:+.0f} MiB more cache per worker)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "mode": args.mode, "features": args.features, "num_workers": NUM_WORKERS, "batch_size": BATCH_SIZE,
            "object_store_bytes": store_bytes, "scales": rows, "summary": s}, indent=2) + "\n")
        print(f"numbers: {args.json}")


if __name__ == "__main__":
    main()
