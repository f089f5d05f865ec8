"""Teacher services as Ray actors (what distill-ray uses) against a Ray Serve deployment, side by side.

    .venv/bin/python bench/service_vs_serve.py [--config jobs/configs/quickstart.yaml] [--teacher cnn]

The same teacher (the config's, trained or reused by ``prepare_teachers``), one replica each with the
teacher's ``num_cpus`` and one torch thread, both batching their callers' requests with the same
5 ms wait: distill-ray's ``TeacherReplica`` reached through ``TeacherService`` (an actor call), and a
Serve deployment with ``@serve.batch`` reached through a ``DeploymentHandle``. Printed: start-up
seconds, one caller's median latency at batch sizes 1, 32 and 256 against the same call in-process,
and 16 concurrent callers of 16 rows each (median of repeated rounds).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def median_ms(call, repeats: int = 15) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml")
    parser.add_argument("--teacher", default=None, help="teacher name (default: the config's first)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from distill_ray.config import load_config
    from distill_ray.pipeline import connect_ray, load_data, prepare_teachers
    from distill_ray.teachers.runner import TeacherRunner
    from distill_ray.teachers.service import BATCH_WAIT_S, new_scope, start_service, stop_service
    from distill_ray.teachers.setup import teacher_specs

    cfg = load_config(args.config)
    connect_ray()
    data = load_data(cfg)
    specs = teacher_specs(cfg, prepare_teachers(cfg, data))
    spec = next(s for s in specs if args.teacher in (None, s.name))
    x = np.asarray(data.train.take_batch(256, batch_format="numpy")["x"])
    runner = TeacherRunner.from_spec(spec, torch_threads=1)

    @serve.deployment(ray_actor_options={"num_cpus": spec.num_cpus}, max_ongoing_requests=64)
    class Teacher:
        def __init__(self):
            self.runner = TeacherRunner.from_spec(spec, torch_threads=1)

        @serve.batch(max_batch_size=spec.batch_size, batch_wait_timeout_s=BATCH_WAIT_S)
        async def __call__(self, inputs: list[np.ndarray]) -> list[dict]:
            out = self.runner.infer(np.concatenate(inputs))
            bounds = np.cumsum([0] + [len(i) for i in inputs])
            return [{k: v[lo:hi] for k, v in out.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]

    start = time.perf_counter()
    handle = serve.run(Teacher.bind(), name="teacher-bench", route_prefix=None)
    serve_start = time.perf_counter() - start
    start = time.perf_counter()
    service = start_service(spec, new_scope())
    service_start = time.perf_counter() - start
    try:
        print(f"teacher {spec.name}, one replica, {spec.num_cpus} CPU, 1 torch thread; "
              f"start-up: actor service {service_start:.1f} s, Serve deployment {serve_start:.1f} s")
        for size in (1, 32, 256):
            rows = x[:size]
            local = median_ms(lambda: runner.infer(rows))
            actor = median_ms(lambda: service.infer(rows))
            served = median_ms(lambda: handle.remote(rows).result())
            print(f"batch {size:>3}: in-process {local:8.2f} ms  actor service {actor:8.2f} ms  "
                  f"Serve handle {served:8.2f} ms  Serve / actor {served / actor:.2f}")
        rows = x[:16]
        actor = median_ms(lambda: ray.get([service.infer_async(rows) for _ in range(16)]), 8)
        served = median_ms(lambda: [r.result() for r in [handle.remote(rows) for _ in range(16)]], 8)
        print(f"16 callers x 16 rows: actor service {actor:.2f} ms  Serve handle {served:.2f} ms  "
              f"Serve / actor {served / actor:.2f}")
    finally:
        stop_service(service)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
