"""How cost grows: rows/s and peak memory of cache building and training at 1x, 2x, 4x data, 1 and 2 Train workers.

    PYTHONPATH=. RAY_ADDRESS=local .venv/bin/python bench/scaling.py [--config jobs/configs/quickstart.yaml]
        [--rows 3000] [--scales 1,2,4] [--workers 1,2] [--data-mode stream] [--json OUT]

In one run and one local Ray (``pipeline.connect_ray``, as the product starts it), for each scale s
the config's data shrunk to ``s * --rows`` train rows (``data.max_train_samples``; validation and test
``s * --rows * --eval-share`` rows each, ``data.max_eval_samples``, so every split grows alike):

* **cache**: ``pipeline.build_cache`` from scratch (a cache directory of this run's own, removed at
  the end): every split's rows through one Ray Data actor-pool stage per teacher, written as
  Parquet by Ray Data tasks. Rows = all splits' rows; seconds = the call's wall time.
* **train**: ``train.run_training`` (TorchTrainer, ``train.mode=cached``, ``train.data_mode`` from
  ``--data-mode``: ``stream`` by default, each worker reads its id-hashed shard from the cache every
  epoch) for one epoch at each of ``--workers`` Ray Train workers. Rows = the cache's train rows;
  seconds = ``run_training``'s wall time (Ray Train start-up, the epoch, validation, the final
  checkpoint); ``loop/s`` = the loop's own rows/s over the epoch (from the run's history: rows since
  the epoch's first batch / seconds since it).

The teachers are the ones trained for the config's own data, reused through ``teachers[].path``
(``prepare_teachers`` trains nothing). Curriculum off, no mid-epoch checkpoint, no baseline.

**Peak RSS** is the kernel's own high-water mark (``VmHWM`` in ``/proc/PID/status``): reset at every
phase's start (``echo 5 > /proc/PID/clear_refs``) for the driver and every Ray worker process of this
session (the ``ray::`` processes descended from this driver), and read by a thread every 0.2 s, so
processes that start and end within the phase (Train workers, Ray Data tasks and actors) count too.
``driver MB`` is this process's peak; ``workers MB`` the largest peak of one process among the
phase's own workers: the Train workers (``RayTrainWorker``) in training, every Ray worker that ran
something in cache building (teacher actor pools, read/map/write tasks); ``other MB`` the largest
peak of the other Ray workers busy in the phase (in training: the Ray Data tasks feeding the
streams, Train's controller). RSS counts shared pages a process has touched too (object-store
blocks, mapped files), so it overstates what each holds privately.

Printed: one table, then rows/s at 2x and 4x against 1x (constant rows/s = time linear in data;
the fixed costs, e.g. Ray Train's start-up, make the small scale slower, so the marginal rows/s
between the smallest and largest scale is printed too), 2 workers against 1, and peak RSS at the
largest scale against the smallest (aim: flat, <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (wait_for_free_cpus: a finished run's CPUs back before the next)

RSS_AIM = 1.2


# --- peak RSS of this session's processes ------------------------------------------------------------

def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in keys:
                out[key] = int(line.split()[1])
    return out


def session_workers(root: int) -> dict[int, str]:
    """Ray worker processes under ``root`` (the driver: it started the raylet, which forks the
    workers): pid -> process title (``ray::IDLE``, ``ray::RayTrainWorker...``, ``ray::MapWorker(...)``)."""
    parent = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parent[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out = {}
    for pid in parent:
        p, seen = parent.get(pid), 0
        while p and p != root and seen < 64:
            p, seen = parent.get(p), seen + 1
        if p != root:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("ray::"):
            out[pid] = title
    return out


class PeakRss:
    """Per phase: every session process's peak RSS (VmHWM, reset when the phase starts), in MiB."""

    def __init__(self, poll_s: float = 0.2):
        self.poll_s, self.driver = poll_s, os.getpid()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._peaks: dict[int, float] = {}
        self._titles: dict[int, set[str]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        for pid, title in {self.driver: "driver", **session_workers(self.driver)}.items():
            try:
                hwm = _status_kb(pid, ("VmHWM",))["VmHWM"] / 1024.0
            except (OSError, KeyError):
                continue  # gone since the scan
            with self._lock:
                self._peaks[pid] = max(self._peaks.get(pid, 0.0), hwm)
                self._titles.setdefault(pid, set()).add(title)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def start_phase(self) -> None:
        with self._lock:
            for pid in (self.driver, *session_workers(self.driver)):
                try:
                    with open(f"/proc/{pid}/clear_refs", "w") as f:
                        f.write("5")  # resets VmHWM to the current RSS
                except OSError:
                    pass
            self._peaks, self._titles = {}, {}
        self._poll()

    def end_phase(self) -> dict:
        self._poll()
        with self._lock:
            peaks, titles = dict(self._peaks), {pid: sorted(t) for pid, t in self._titles.items()}
        return {"driver": peaks.pop(self.driver), "processes": {
            pid: {"peak_mb": round(mb, 1), "titles": titles[pid]} for pid, mb in peaks.items()}}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def split_roles(processes: dict, own: str | None) -> tuple[dict, dict]:
    """(the phase's own workers, the other busy ones): ``own`` is a title fragment (None: every busy
    worker is the phase's own); a worker only ever seen idle in the phase is neither."""
    mine, other = {}, {}
    for pid, p in processes.items():
        busy = [t for t in p["titles"] if t != "ray::IDLE"]
        if not busy:
            continue
        (mine if own is None or any(own in t for t in busy) else other)[pid] = p
    return mine, other


def largest(processes: dict) -> tuple[float, str]:
    if not processes:
        return 0.0, "-"
    p = max(processes.values(), key=lambda p: p["peak_mb"])
    return p["peak_mb"], next((t for t in p["titles"] if t != "ray::IDLE"), p["titles"][0])


def start_ray(tries: int = 3) -> None:
    """``pipeline.connect_ray`` (RAY_ADDRESS=local: a Ray of this process's own, as the product starts
    it), tried again when the raylet misses Ray's fixed 30 s to register, as on a heavily loaded machine."""
    import ray

    from distill_ray.pipeline import connect_ray

    for attempt in range(1, tries + 1):
        try:
            return connect_ray()
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == tries:
                raise
            ray.shutdown()
            print(f"Ray's start timed out (load average {os.getloadavg()[0]:.0f}); trying again", flush=True)


# --- configs and phases --------------------------------------------------------------------------------

def scaled_config(raw: dict, rows: int, eval_rows: int, dirs: dict, cache_dir: Path, workers: int, args):
    from distill_ray.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(raw, [
        ("data.max_train_samples", rows), ("data.max_eval_samples", eval_rows),
        *((f"teachers.{name}.path", str(d)) for name, d in dirs.items()),
        ("cache.dir", str(cache_dir)), "curriculum.scheduler=none", "train.epochs=1",
        f"train.checkpoint_every_steps={10**9}", "train.baseline=false", "train.max_failures=0",
        "train.mode=cached", f"train.data_mode={args.data_mode}", f"train.num_workers={workers}", *args.set]))


def cache_phase(cfg, data, dirs, rss: PeakRss) -> tuple[dict, object]:
    from distill_ray.pipeline import build_cache

    overhead.wait_for_free_cpus()
    rss.start_phase()
    start = time.perf_counter()
    cache = build_cache(cfg, data, dirs, rebuild=True)
    seconds = time.perf_counter() - start
    peaks = rss.end_phase()
    mine, _ = split_roles(peaks["processes"], None)
    worker_mb, who = largest(mine)
    rows = sum(cache.rows(s) for s in ("train", "val", "test"))
    return {"phase": "cache", "rows": rows, "seconds": seconds, "driver_mb": peaks["driver"],
            "workers_mb": worker_mb, "workers_who": who, "workers_count": len(mine),
            "other_mb": None, "other_who": None}, cache


def train_phase(cfg, cache, info, workdir: Path, name: str, rss: PeakRss) -> dict:
    from distill_ray.pipeline import training_inputs
    from distill_ray.train.loop import load_trained_student, run_training

    inputs = training_inputs(cfg, cache, info)
    overhead.wait_for_free_cpus()
    rss.start_phase()
    start = time.perf_counter()
    result = run_training(cfg, inputs, str(workdir / "ray_results"), name)
    seconds = time.perf_counter() - start
    peaks = rss.end_phase()
    if result.error is not None:
        raise RuntimeError(f"{name}: training failed: {result.error}")
    _, history, state = load_trained_student(cfg, inputs, result.checkpoint)
    steps = [r for r in history if r.get("kind") != "epoch"]
    mine, other = split_roles(peaks["processes"], "RayTrainWorker")
    worker_mb, who = largest(mine)
    other_mb, other_who = largest(other)
    return {"phase": "train", "rows": cache.rows("train"), "seconds": seconds,
            "loop_rows_per_s": steps[-1]["samples_per_s"], "steps": int(state["step"]),
            "keep_shard": inputs.keep_shard, "driver_mb": peaks["driver"], "workers_mb": worker_mb,
            "workers_who": who, "workers_count": len(mine), "other_mb": other_mb, "other_who": other_who,
            "worker_ru_maxrss_mb": [r for r in history if r.get("kind") == "epoch"][-1].get("peak_rss_mb")}


def run(args, workdir: Path, rss: PeakRss) -> list[dict]:
    import yaml

    from distill_ray.config import config_from_dict
    from distill_ray.pipeline import load_data, prepare_teachers

    raw = yaml.safe_load(Path(args.config).read_text())
    full = config_from_dict(raw)
    dirs = prepare_teachers(full, load_data(full))  # trained for the config's own data: reused
    scales = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    # Every scale's data first (a preset's table is written once per size, in this process): not measured.
    prepared = []
    for s in scales:
        rows, eval_rows = s * args.rows, max(1, round(s * args.rows * args.eval_share))
        cfgs = {w: scaled_config(raw, rows, eval_rows, dirs, workdir / "cache", w, args) for w in workers}
        prepared.append((s, cfgs, load_data(cfgs[workers[0]])))
    out = []
    for s, cfgs, data in prepared:
        row, cache = cache_phase(cfgs[workers[0]], data, dirs, rss)
        out.append({"scale": s, "workers": None, **row})
        print(f"[{s}x] cache: {row['rows']:,} rows in {row['seconds']:.1f}s (peak RSS driver {row['driver_mb']:.0f} "
              f"MB, workers {row['workers_mb']:.0f} MB)", flush=True)
        for w in workers:
            row = train_phase(cfgs[w], cache, data.info, workdir, f"scaling-{s}x-{w}w", rss)
            out.append({"scale": s, "workers": w, **row})
            print(f"[{s}x] train, {w} worker(s): {row['rows']:,} rows in {row['seconds']:.1f}s "
                  f"(loop {row['loop_rows_per_s']:,.0f} rows/s, {row['steps']} steps; peak RSS driver "
                  f"{row['driver_mb']:.0f} MB, Train workers {row['workers_mb']:.0f} MB)", flush=True)
    return out


# --- report ------------------------------------------------------------------------------------------

def rate(r: dict) -> float:
    return r["rows"] / r["seconds"]


def find(rows: list[dict], phase: str, scale: int, workers: int | None) -> dict:
    return next(r for r in rows if r["phase"] == phase and r["scale"] == scale and r["workers"] == workers)


def marginal_rate(small: dict, large: dict) -> float:
    """Rows per second of the extra rows: (rows_large - rows_small) / (seconds_large - seconds_small),
    the slope of time over rows with the fixed costs taken out."""
    extra_s = large["seconds"] - small["seconds"]
    return (large["rows"] - small["rows"]) / extra_s if extra_s > 0 else float("inf")


def print_table(rows: list[dict]) -> None:
    header = (f"{'size':>4} {'workers':>7} {'phase':>5} {'rows':>7} {'seconds':>7} {'rows/s':>7} {'loop/s':>7} "
              f"{'driver MB':>9} {'workers MB':>10} {'other MB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        loop = f"{r['loop_rows_per_s']:,.0f}" if r.get("loop_rows_per_s") else "-"
        other = f"{r['other_mb']:.0f}" if r["other_mb"] is not None else "-"
        print(f"{str(r['scale']) + 'x':>4} {r['workers'] or '-':>7} {r['phase']:>5} {r['rows']:>7,} "
              f"{r['seconds']:>7.1f} {rate(r):>7,.0f} {loop:>7} {r['driver_mb']:>9.0f} {r['workers_mb']:>10.0f} "
              f"{other:>8}")


def print_ratios(rows: list[dict]) -> dict:
    scales = sorted({r["scale"] for r in rows})
    workers = sorted({r["workers"] for r in rows if r["workers"]})
    lo, hi = scales[0], scales[-1]
    lines = [(("cache", None), "cache")] + [(("train", w), f"train {w}w") for w in workers]
    out: dict = {"rows_per_s_vs_smallest": {}, "marginal_rows_per_s": {}, "rss_largest_over_smallest": {},
                 "workers_speedup": {}}
    print(f"rows/s against {lo}x (1.00 = time linear in rows; fixed costs pull the small scale down):")
    for (phase, w), label in lines:
        base = find(rows, phase, lo, w)
        ratios = {s: rate(find(rows, phase, s, w)) / rate(base) for s in scales[1:]}
        marginal = marginal_rate(base, find(rows, phase, hi, w))
        out["rows_per_s_vs_smallest"][label] = ratios
        out["marginal_rows_per_s"][label] = marginal
        text = ", ".join(f"{s}x {v:.2f}" for s, v in ratios.items())
        print(f"  {label:<9} {text}; marginal rows/s {lo}x->{hi}x {marginal:,.0f} "
              f"(vs {rate(base):,.0f} at {lo}x, {rate(find(rows, phase, hi, w)):,.0f} at {hi}x)")
    if len(workers) > 1:
        a, b = workers[0], workers[-1]
        print(f"train rows/s, {b} workers against {a}:")
        for s in scales:
            wall = rate(find(rows, "train", s, b)) / rate(find(rows, "train", s, a))
            loop = find(rows, "train", s, b)["loop_rows_per_s"] / find(rows, "train", s, a)["loop_rows_per_s"]
            out["workers_speedup"][s] = {"wall": wall, "loop": loop}
            print(f"  {s}x: {wall:.2f} (wall), {loop:.2f} (loop)")
    print(f"peak RSS {hi}x / {lo}x (aim <= {RSS_AIM}):")
    for (phase, w), label in lines:
        a, b = find(rows, phase, lo, w), find(rows, phase, hi, w)
        driver, worker = b["driver_mb"] / a["driver_mb"], b["workers_mb"] / a["workers_mb"]
        out["rss_largest_over_smallest"][label] = {"driver": driver, "workers": worker}
        verdict = "met" if max(driver, worker) <= RSS_AIM else "missed"
        print(f"  {label:<9} driver {driver:.2f} ({a['driver_mb']:.0f} -> {b['driver_mb']:.0f} MB), workers "
              f"{worker:.2f} ({a['workers_mb']:.0f} -> {b['workers_mb']:.0f} MB, largest: {b['workers_who']}): {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml", help="the experiment (default: quickstart)")
    parser.add_argument("--rows", type=int, default=3000, help="train rows at 1x (default 3000)")
    parser.add_argument("--eval-share", type=float, default=1 / 6,
                        help="validation and test rows each, as a share of the train rows (default 1/6)")
    parser.add_argument("--scales", default="1,2,4", help="comma-separated multiples of --rows (default 1,2,4)")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray Train worker counts (default 1,2)")
    parser.add_argument("--data-mode", choices=("stream", "memory", "auto"), default="stream",
                        help="train.data_mode (default stream: the shard is read anew each epoch, not kept)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    import ray

    workdir = Path(tempfile.mkdtemp(prefix="scaling-"))
    started = time.perf_counter()
    start_ray()
    rss = PeakRss()
    try:
        rows = run(args, workdir, rss)
    finally:
        rss.close()
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:  # the raw numbers first, whatever the report below does
        Path(args.json).write_text(json.dumps({"config": args.config, "rows": args.rows, "data_mode": args.data_mode,
                                               "cores": os.cpu_count(), "runs": rows}, indent=2, default=str) + "\n")
    print()
    print(f"how cost grows: {args.config}, 1x = {args.rows:,} train rows, 1 epoch, train.data_mode={args.data_mode}, "
          f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end), "
          f"wall {time.perf_counter() - started:.0f}s")
    print_table(rows)
    ratios = print_ratios(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "rows": args.rows, "data_mode": args.data_mode,
                                               "cores": os.cpu_count(), "runs": rows, "ratios": ratios},
                                              indent=2, default=str) + "\n")
        print(f"numbers: {args.json}")


if __name__ == "__main__":
    main()
