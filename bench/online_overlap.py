"""Overlap in online mode: does the online step cost only its slowest part (student step or a teacher)?

    .venv/bin/python bench/online_overlap.py [--config jobs/configs/quickstart.yaml] [--train-rows 8192]
                                             [--eval-rows 1024] [--epochs 3] [--json OUT]

Online mode is a Ray Data pipeline: each rank's stream = rows -> one stage per teacher asking the
teacher's service (``teachers/service.py``: replicas loaded once per run) -> the Train worker, so the
teachers should answer the next batches while the student steps. Measured in one run, per student
batch (``train.batch_size`` rows), on the same rows:

* **teacher forward**, each teacher: ``TeacherRunner.infer`` timed in this process on the train rows
  in the batches its stage gets (``teacher_specs``' batch size), with the stage's torch threads
  (``max(1, int(num_cpus))``) and nothing else running here; median seconds per row x batch size;
* **student step**: the product's cached-mode step (``run_training``, ``train.mode=cached``,
  ``data_mode=memory``) on the same rows' cache: steady-state time per step;
* **online step**: the product in ``train.mode=online`` on the same rows: steady-state time per step;
* **online step before services** (the "before"): the same run with the teacher stages as distill-ray
  0.2 ran them, a Ray Data actor pool per teacher whose actors load the teacher (``BEFORE_STAGE``
  below, ``TeacherRunner`` inside), started anew by Ray Data for every epoch; ``--no-before`` skips it;
* **teacher loads** of each online run: the services' replicas from Ray's actor table (actors created,
  and restarts); the "before" stages' actors each leave a marker file when they load their teacher;
* **per-request overhead** of a service: one caller's request to the first teacher's service against
  ``TeacherRunner.infer`` in this process, batch sizes 1, 32 and 256 (median of repeated calls).

Steady state, both runs: epochs 1.. (epoch 0 is warm-up), each epoch's seconds from the product's
own history (the epoch's last step row: ``samples_per_s`` since the epoch's first batch; see
``bench/overhead.py``) **plus the epoch's wait for its first batch** (the epoch row's
``first_batch_s``), per step. The wait must count: online, each epoch's stream starts anew (its
stage tasks, not the teachers) and fills ahead while the student waits, so with short epochs the steps alone never wait on a teacher
and the ratio reads far below 1 (0.10 in an earlier version of this bench), which is not overlap.
The default 16,384 rows make the epochs long enough that the fill is a small part of them. Printed: ``online / max(student step, slowest teacher forward)`` (the bound
when every teacher and the student have cores of their own; aim <= 1.15) and, since this machine
has fewer cores than teachers + student, ``online / max(that, (student + all teachers) / cores)``,
the bound the cores allow. Also printed: per epoch after the first step, the run's wall seconds
against the seconds of its steps (the steady state above leaves out each epoch's wait for its first
batch, validation and checkpoint; online, Ray Data also starts each epoch's stream anew).

Data: the config's data shrunk with ``data.max_train_samples`` / ``data.max_eval_samples``; the
teachers are the ones trained for the config's own data, reused through ``teachers[].path`` (so
``prepare_teachers`` trains nothing); the shrunk data's cache is built once and reused after.
Curriculum off, no mid-epoch checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the product-run timing and first-step hook, shared)


def configs(path: str, train_rows: int, eval_rows: int, epochs: int, extra: list[str]):
    """The shrunk (cached, online) configs, their teachers pointed at the ones trained for the full data."""
    import yaml

    from distill_ray.config import apply_overrides, config_from_dict
    from distill_ray.pipeline import load_data, prepare_teachers

    raw = yaml.safe_load(Path(path).read_text())
    full = config_from_dict(raw)
    dirs = prepare_teachers(full, load_data(full))  # trained for the config's own data: reused
    common = [("data.max_train_samples", train_rows), ("data.max_eval_samples", eval_rows),
              *((f"teachers.{name}.path", str(d)) for name, d in dirs.items()),
              "curriculum.scheduler=none", f"train.epochs={epochs}", f"train.checkpoint_every_steps={10**9}",
              "train.num_workers=1", "train.baseline=false", "train.max_failures=0", *extra]
    cached = config_from_dict(apply_overrides(raw, [*common, "train.mode=cached", "train.data_mode=memory"]))
    online = config_from_dict(apply_overrides(raw, [*common, "train.mode=online"]))
    return cached, online


def teacher_times(cfg, dirs, cache) -> list[dict]:
    """Each teacher's forward, in this process, on the shrunk train rows in its stage's batch size."""
    import torch

    from distill_ray.teachers.setup import teacher_specs
    from distill_ray.teachers.runner import TeacherRunner

    out = []
    for spec in teacher_specs(cfg, dirs):
        threads = max(1, int(spec.num_cpus))
        runner = TeacherRunner(spec.name, spec.model_dir, spec.dtype, spec.topk, torch_threads=threads)
        per_row = []
        for i, batch in enumerate(cache.dataset("train", ["x"]).iter_batches(batch_size=spec.batch_size,
                                                                           batch_format="numpy", drop_last=True)):
            x = np.asarray(batch["x"])
            start = time.perf_counter()
            runner.infer(x, spec.features)
            if i:  # the first batch warms up
                per_row.append((time.perf_counter() - start) / len(x))
        ms_row = 1000 * float(np.median(per_row))
        out.append({"name": spec.name, "num_cpus": spec.num_cpus, "threads": threads, "stage_batch": spec.batch_size,
                    "batches": len(per_row), "ms_per_stage_batch": ms_row * spec.batch_size,
                    "ms_per_student_batch": ms_row * cfg.train.batch_size, "runner_stats": runner.stats()})
        print(f"teacher {spec.name}: {ms_row * cfg.train.batch_size:.2f} ms per student batch "
              f"({ms_row * spec.batch_size:.1f} ms per {spec.batch_size}-row stage batch, {threads} thread)", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    return out


class BeforeStage:
    """distill-ray 0.2's teacher stage: a Ray Data actor that loads its teacher in its constructor (so
    once per epoch, as Ray Data starts an execution's actor pools anew) and answers its batches."""

    def __init__(self, spec, markers: str):
        import uuid

        from distill_ray.teachers.runner import TeacherRunner

        (Path(markers) / uuid.uuid4().hex).touch()  # one file per teacher load, counted by the driver
        self.runner = TeacherRunner.from_spec(spec, torch_threads=max(1, int(spec.num_cpus)))
        self.name, self.features = spec.name, spec.features

    def __call__(self, batch):
        if not len(batch["id"]):
            return batch
        out = self.runner.infer(np.asarray(batch["x"]), self.features)
        return {**batch, **{f"{self.name}/{key}": value for key, value in out.items()}}


def before_stages(ds, services, markers: str):
    import ray

    for service in services:
        spec = service.spec
        ds = ds.map_batches(BeforeStage, fn_constructor_args=(spec, markers), batch_format="numpy", batch_size=spec.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=spec.replicas), num_cpus=spec.num_cpus)
    return ds


def teacher_loads(class_name: str, before: set[str]) -> int:
    """Teacher loads since ``before`` (actor ids): actors of ``class_name`` created, plus their restarts."""
    from ray._private.state import actors

    made = [a for a in actors().values() if a["ActorClassName"].endswith(class_name) and a["ActorID"] not in before]
    return len(made) + sum(int(a["NumRestarts"]) for a in made)


def actor_ids() -> set[str]:
    from ray._private.state import actors

    return set(actors())


def request_overhead(cfg, dirs, cache) -> list[dict]:
    """One caller's request to the first teacher's service against the same call in this process."""
    from distill_ray.teachers.runner import TeacherRunner
    from distill_ray.teachers.service import new_scope, start_service, stop_service
    from distill_ray.teachers.setup import teacher_specs

    spec = teacher_specs(cfg, dirs)[0]
    x = np.asarray(cache.dataset("train", ["x"]).take_batch(256, batch_format="numpy")["x"])
    runner = TeacherRunner.from_spec(spec, torch_threads=max(1, int(spec.num_cpus)))
    service = start_service(spec, new_scope())
    out = []
    try:
        for size in (1, 32, 256):
            rows = x[:size]
            times = {"local": [], "service": []}
            for i in range(31):  # the first call of each warms up
                for kind, call in (("local", lambda: runner.infer(rows)), ("service", lambda: service.infer(rows))):
                    start = time.perf_counter()
                    call()
                    if i:
                        times[kind].append(time.perf_counter() - start)
            local, remote = 1000 * float(np.median(times["local"])), 1000 * float(np.median(times["service"]))
            out.append({"teacher": spec.name, "batch": size, "local_ms": local, "service_ms": remote,
                        "ratio": remote / local, "added_ms": remote - local})
            print(f"request overhead, {spec.name}, batch {size}: service {remote:.2f} ms vs in-process {local:.2f} ms",
                  flush=True)
    finally:
        stop_service(service)
    return out


def run(args, workdir: Path) -> dict:
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers, training_inputs
    from distill_ray.train import stages
    from distill_ray.train.inputs import online_teachers

    cached_cfg, online_cfg = configs(args.config, args.train_rows, args.eval_rows, args.epochs, args.set)
    data = load_data(cached_cfg)
    dirs = prepare_teachers(cached_cfg, data)  # teachers[].path: reused, never trained
    cache = build_cache(cached_cfg, data, dirs)  # the shrunk rows' targets: built once, reused after
    info, batch = data.info, cached_cfg.train.batch_size
    print(f"[{cached_cfg.name}] {cache.rows('train'):,} train rows, batch {batch}, {args.epochs} epochs "
          f"(epoch 0 warm-up)", flush=True)

    teachers = teacher_times(cached_cfg, dirs, cache)

    student_run = overhead.product_run(cached_cfg, training_inputs(cached_cfg, cache, info), workdir, "overlap-cached")
    student = overhead.steady(student_run, batch)
    print(f"student step (cached mode): {student['ms_per_step_with_wait']:.2f} ms ({student['ms_per_step']:.2f} ms "
          f"without the first-batch waits), worker torch threads {student_run['threads']}", flush=True)
    # Validation reads the cache's targets; the train stream goes through the teacher stages.
    before_actors = actor_ids()
    with online_teachers(online_cfg, dirs, info.task) as services:
        online_inputs = training_inputs(online_cfg, cache, info, services=services)
        online_run = overhead.product_run(online_cfg, online_inputs, workdir, "overlap-online")
    online = overhead.steady(online_run, batch)
    online_loads = teacher_loads("TeacherReplica", before_actors)
    old = None
    if not args.no_before:  # the same run with 0.2's stages: a teacher loaded by every epoch's actor pool
        asking = stages.with_teachers
        markers = workdir / "before-loads"
        markers.mkdir(parents=True, exist_ok=True)
        # rank_stream builds the streams on this driver, so the swap reaches every epoch's stream.
        stages.with_teachers = lambda ds, services: before_stages(ds, services, str(markers))
        try:
            with online_teachers(online_cfg, dirs, info.task) as services:  # only their specs are read
                old_run = overhead.product_run(online_cfg, training_inputs(online_cfg, cache, info, services=services),
                                               workdir, "overlap-online-before")
        finally:
            stages.with_teachers = asking
        old = overhead.steady(old_run, batch)
        old["loads"] = len(list(markers.iterdir()))
        print(f"online step before services: {old['ms_per_step_with_wait']:.2f} ms ({old['loads']} teacher loads)",
              flush=True)
    overheads = request_overhead(cached_cfg, dirs, cache)
    print(f"online step: {online['ms_per_step_with_wait']:.2f} ms ({online['ms_per_step']:.2f} ms without the "
          f"first-batch waits {', '.join(f'{w:.1f}s' for w in online['first_batch_s'])}; run_training wall "
          f"{online_run['wall_s']:.1f}s for {args.epochs} epochs)", flush=True)

    cores = os.cpu_count() or 1
    slowest = max(teachers, key=lambda t: t["ms_per_student_batch"])
    # Per step of the timed epochs, each epoch's wait for its first batch included: while the student
    # waits, the teacher stages fill ahead, so the steps alone would count teacher work as free.
    student_ms, online_ms = student["ms_per_step_with_wait"], online["ms_per_step_with_wait"]
    ideal = max(student_ms, slowest["ms_per_student_batch"])
    total = student_ms + sum(t["ms_per_student_batch"] for t in teachers)
    core_bound = max(ideal, total / cores)
    import ray

    return {
        "online_teacher_loads": online_loads, "before": old, "request_overhead": overheads,
        "ratio_ideal_before": old["ms_per_step_with_wait"] / ideal if old else None,
        "config": args.config, "name": cached_cfg.name, "train_rows": cache.rows("train"), "batch_size": batch,
        "epochs": args.epochs, "cores": cores, "ray_cpus": int(ray.cluster_resources().get("CPU", 0)),
        "worker_cpus": cached_cfg.train.cpus_per_worker, "worker_threads": online_run["threads"],
        "teachers": teachers, "student_ms_per_step": student_ms, "online_ms_per_step": online_ms,
        "student_ms_per_step_without_wait": student["ms_per_step"],
        "online_ms_per_step_without_wait": online["ms_per_step"], "online_first_batch_s": online["first_batch_s"],
        "student_first_batch_s": student["first_batch_s"],
        "online_epoch_samples_per_s_range": online["epoch_spread"], "online_wall_s": online_run["wall_s"],
        "online_fixed_s": online_run["fixed_s"], "online_timed_steps": online["steps"],
        "cached_wall_s": student_run["wall_s"], "cached_fixed_s": student_run["fixed_s"],
        # After the first step: wall seconds per epoch (steps, validation, checkpoint and, online, the
        # epoch's stream started anew) against the seconds of the steps themselves.
        "online_epoch_wall_s": (online_run["wall_s"] - online_run["fixed_s"]) / args.epochs,
        "cached_epoch_wall_s": (student_run["wall_s"] - student_run["fixed_s"]) / args.epochs,
        "online_epoch_steps_s": sum(e["seconds"] for e in online_run["epochs"]) / args.epochs,
        "cached_epoch_steps_s": sum(e["seconds"] for e in student_run["epochs"]) / args.epochs,
        "slowest_teacher": slowest["name"], "ideal_ms": ideal, "serial_ms": total, "core_bound_ms": core_bound,
        "ratio_ideal": online_ms / ideal, "ratio_core_bound": online_ms / core_bound,
        "ratio_serial": online_ms / total, "ratio_ideal_without_wait": online["ms_per_step"] / ideal,
    }


def print_table(r: dict) -> None:
    header = f"{'part':<28} {'CPU share':>9} {'threads':>7} {'ms / batch':>10}"
    print(header)
    print("-" * len(header))
    print(f"{'student step (cached mode)':<28} {r['worker_cpus']:>9} {r['worker_threads']:>7} "
          f"{r['student_ms_per_step']:>10.2f}")
    for t in r["teachers"]:
        print(f"{'teacher ' + t['name'] + ' forward':<28} {t['num_cpus']:>9} {t['threads']:>7} "
              f"{t['ms_per_student_batch']:>10.2f}")
    print(f"{'online step':<28} {'':>9} {'':>7} {r['online_ms_per_step']:>10.2f}")
    print("-" * len(header))
    print(f"{'max(student, slowest)':<28} {'':>9} {'':>7} {r['ideal_ms']:>10.2f}")
    print(f"{'(student + teachers) / cores':<28} {'':>9} {'':>7} {r['serial_ms'] / r['cores']:>10.2f}")
    print(f"{'student + teachers (serial)':<28} {'':>9} {'':>7} {r['serial_ms']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--train-rows", type=int, default=16384, help="data.max_train_samples (default 16384)")
    parser.add_argument("--eval-rows", type=int, default=1024, help="data.max_eval_samples (default 1024)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of both runs, the first one untimed (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--no-before", action="store_true", help="skip the run with 0.2's per-epoch teacher stages")
    overhead.add_ray_args(parser)
    parser.add_argument("--workdir", default=None, help="checkpoints go here (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 0 is not timed)")

    import ray.cloudpickle

    from distill_ray.pipeline import connect_ray

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="online-overlap-")) if temporary else Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    ray.cloudpickle.register_pickle_by_value(overhead)  # the hook travels by value: workers cannot import bench/
    overhead.start_ray(args)
    connect_ray()  # already up: only sets the Ray Data context
    try:
        r = run(args, workdir)
    finally:
        ray.shutdown()
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"online overlap, {r['name']}: {r['train_rows']:,} train rows, batch {r['batch_size']}, "
          f"{r['online_timed_steps']} timed online steps; {r['cores']} cores, Ray {r['ray_cpus']} logical CPUs "
          f"OMP_NUM_THREADS {args.omp_threads or 'unset'} (load average {os.getloadavg()[0]:.1f} at the end)")
    print_table(r)
    verdict = "met" if r["ratio_ideal"] <= 1.15 else "missed"
    lo, hi = r["online_epoch_samples_per_s_range"]
    print(f"online / max(student step, slowest teacher {r['slowest_teacher']}) = {r['ratio_ideal']:.2f} "
          f"(aim <= 1.15 with a core per part: {verdict}; this machine has {r['cores']} cores for "
          f"{len(r['teachers'])} teachers + 1 student)")
    print(f"teacher loads in the online run: {r['online_teacher_loads']} for {len(r['teachers'])} teachers and "
          f"{args.epochs} epochs")
    if r["before"]:
        print(f"before services (0.2's per-epoch stages): online / max(student step, slowest teacher) = "
              f"{r['ratio_ideal_before']:.2f}, {r['before']['loads']} teacher loads")
    for o in r["request_overhead"]:
        print(f"service request / in-process call, {o['teacher']}, batch {o['batch']:>3}: {o['ratio']:.2f} "
              f"({o['service_ms']:.2f} ms vs {o['local_ms']:.2f} ms)")
    print(f"online / max(that, (student + teachers) / {r['cores']} cores) = {r['ratio_core_bound']:.2f} "
          f"(what {r['cores']} cores allow); online / serial sum = {r['ratio_serial']:.2f} (1.00 = no overlap)")
    print(f"without the first-batch waits ({', '.join(f'{w:.1f}s' for w in r['online_first_batch_s'])} online): "
          f"online / max(student step, slowest teacher) = {r['ratio_ideal_without_wait']:.2f} (flattering: the "
          f"stages fill ahead during the wait)")
    print(f"online epochs {lo:,.0f}..{hi:,.0f} samples/s; run_training wall {r['online_wall_s']:.1f}s, first step "
          f"after {r['online_fixed_s']:.1f}s")
    print(f"per epoch after the first step, wall / its steps' seconds: online {r['online_epoch_wall_s']:.1f}s / "
          f"{r['online_epoch_steps_s']:.1f}s, cached {r['cached_epoch_wall_s']:.1f}s / {r['cached_epoch_steps_s']:.1f}s "
          f"(the rest: validation, checkpoint and, online, each epoch's stream starting and filling)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str) + "\n")
        print(f"numbers: {args.json}")


if __name__ == "__main__":
    main()
