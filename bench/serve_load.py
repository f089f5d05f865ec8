"""Load test of the served student: QPS and latency with dynamic batching on and off, plus int8 effect.

    .venv/bin/python bench/serve_load.py [--student RUN_OR_STUDENT_DIR | --arch mlp|cnn] [--requests 2000]
        [--concurrency 64] [--batch-sizes 32,1] [--quantize none|int8] [--url URL]
        [--no-quantization | --quantization-only]

For each max batch size (default 32, then 1) the student is (re)deployed on local Ray Serve with
``distill_ray.serving.start_serve``; then a SECOND PROCESS sends ``--requests`` single-input
POST /predict requests (real Fashion-MNIST test images), ``--concurrency`` in flight at once
(asyncio + httpx), and reports QPS, p50/p95/p99 latency and the non-2xx count. The QPS ratio of
the first to the last batch size is the batching speed-up. With ``--url`` an already running
deployment is measured as it is (its batch size cannot be changed from here).

Without ``--student`` a quick MLP (or ``--arch cnn``) is trained on real Fashion-MNIST (2000 train images) so the bench
runs standalone. Before the load test it prints the int8 effect on the student: state-dict bytes,
serialized size and single-sample latency, float vs int8, and their top-1 agreement.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

API_KEY_ENV = "DISTILL_RAY_API_KEY"


# --- the client, run in a second process ------------------------------------------------------------

def run_load(url: str, bodies: list[bytes], total: int, concurrency: int, headers: dict[str, str]) -> dict:
    """Send ``total`` requests, ``concurrency`` at a time; latencies in seconds, status counts, wall time."""
    import httpx

    async def main() -> dict:
        latencies: list[float] = []
        statuses: Counter = Counter()
        sent = 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=120,
                                     headers={"Content-Type": "application/json", **headers}) as client:
            async def worker() -> None:
                nonlocal sent
                while sent < total:
                    body = bodies[sent % len(bodies)]
                    sent += 1
                    start = time.perf_counter()
                    try:
                        reply = await client.post(f"{url}/predict", content=body)
                        statuses[reply.status_code] += 1
                    except httpx.HTTPError as err:
                        statuses[type(err).__name__] += 1
                    latencies.append(time.perf_counter() - start)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
        return {"latencies": latencies, "statuses": dict(statuses), "wall_s": wall}

    return asyncio.run(main())


def load_in_second_process(url: str, bodies: list[bytes], total: int, concurrency: int,
                           headers: dict[str, str]) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_load, (url, bodies, total, concurrency, headers))


def summarize(result: dict) -> dict:
    ms = np.asarray(result["latencies"]) * 1000.0
    ok = sum(n for status, n in result["statuses"].items() if isinstance(status, int) and 200 <= status < 300)
    return {"requests": len(ms), "qps": len(ms) / result["wall_s"], "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "non_2xx": len(ms) - ok, "statuses": result["statuses"]}


# --- the student -----------------------------------------------------------------------------------

QUICK_STUDENTS = {"mlp": {"hidden": [256]}, "cnn": {"channels": [32, 64], "hidden": 128}}


def train_quick_student(directory: Path, data, arch: str = "mlp") -> Path:
    """A small MLP (or CNN) on real Fashion-MNIST, saved as a student directory with its card."""
    import torch

    from distill_ray.evaluate import accuracy, predict_logits
    from distill_ray.models import build_model, save_model
    from distill_ray.recipes import train_classifier

    torch.manual_seed(0)
    options = QUICK_STUDENTS[arch]
    model = build_model(arch, data.input_shape, data.num_classes, options)
    train_classifier(model, data.train, epochs=5 if arch == "mlp" else 3, lr=3e-3)
    save_model(model, directory, {"arch": arch, "input_shape": list(data.input_shape),
                                  "num_classes": data.num_classes, "options": options, "task": "classification"})
    card = {"name": f"bench-{arch}", "version": "v1", "task": "classification", "dataset": "fashion_mnist",
            "teachers": [], "metrics": {"test_accuracy": accuracy(predict_logits(model, data.test.inputs),
                                                                  data.test.labels)},
            "class_names": list(data.class_names)}
    (directory / "distill_card.json").write_text(json.dumps(card, indent=2))
    return directory


def serialized_bytes(model) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def batch_latency_ms(model, batch, repeats: int = 100) -> float:
    """Median wall time of one forward pass over ``batch``, in milliseconds."""
    import torch

    from distill_ray.models import forward_logits

    times = []
    with torch.no_grad():
        for i in range(repeats + 10):
            start = time.perf_counter()
            forward_logits(model, batch)
            if i >= 10:  # the first passes warm up
                times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def quantization_report(student_dir: Path, test_inputs: np.ndarray) -> None:
    import torch

    from distill_ray.evaluate import single_sample_latency_ms
    from distill_ray.serving import StudentPredictor, state_dict_bytes

    float_student = StudentPredictor(student_dir)
    int8_student = StudentPredictor(student_dir, quantize="int8")
    x = torch.as_tensor(test_inputs)
    agreement = (float_student.probabilities(x).argmax(-1) == int8_student.probabilities(x).argmax(-1)).float().mean()
    print(f"\nint8 dynamic quantization of {float_student.model_id} ({student_dir}), torch threads "
          f"{torch.get_num_threads()}:")
    print(f"  on disk (float safetensors)   {(student_dir / 'model.safetensors').stat().st_size:>10,} B")
    print(f"  {'':28}{'float32':>12}{'int8':>12}")
    for label, measure in (("state-dict bytes", state_dict_bytes), ("torch.save size (B)", serialized_bytes),
                           ("1-sample latency (ms)", lambda m: single_sample_latency_ms(m, x[:1], repeats=500)),
                           ("32-sample batch (ms)", lambda m: batch_latency_ms(m, x[:32]))):
        a, b = measure(float_student.model), measure(int8_student.model)
        fmt = "{:>12,.0f}" if isinstance(a, int) else "{:>12.4f}"
        print(f"  {label:<28}{fmt.format(a)}{fmt.format(b)}")
    print(f"  top-1 agreement float vs int8 on {len(x)} test images: {agreement.item():.4f}")


# --- main ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def warm_up(url: str, bodies: list[bytes], headers: dict[str, str], n: int = 20) -> None:
    import httpx

    for body in bodies[:n]:
        reply = httpx.post(f"{url}/predict", content=body, timeout=60,
                           headers={"Content-Type": "application/json", **headers})
        reply.raise_for_status()


def print_row(label: str, s: dict) -> None:
    print(f"  {label:<22}{s['requests']:>9}{s['qps']:>10.1f}{s['p50_ms']:>10.1f}{s['p95_ms']:>10.1f}"
          f"{s['p99_ms']:>10.1f}{s['non_2xx']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="run or student directory; default: train a quick MLP")
    parser.add_argument("--arch", default="mlp", choices=sorted(QUICK_STUDENTS),
                        help="architecture of the quick student trained without --student")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-sizes", default="32,1", help="max_batch_size values to compare, in order")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="serve the int8 student")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--url", help="measure this running deployment instead of starting one")
    parser.add_argument("--no-quantization", action="store_true", help="skip the float vs int8 report")
    parser.add_argument("--quantization-only", action="store_true", help="print the float vs int8 report and stop")
    args = parser.parse_args()

    from distill_ray.data import load_fashion_mnist

    data = load_fashion_mnist(max_train_samples=2000, max_eval_samples=500)
    workdir = tempfile.TemporaryDirectory(prefix="serve_load_")
    if args.student:
        from distill_ray.serving import resolve_student_dir

        student_dir = resolve_student_dir(args.student)
    else:
        print(f"No --student: training a quick {args.arch} {QUICK_STUDENTS[args.arch]} on 2000 Fashion-MNIST images")
        student_dir = train_quick_student(Path(workdir.name) / "student", data, args.arch)
    if not args.no_quantization:
        quantization_report(student_dir, data.test.inputs)
    if args.quantization_only:
        return

    bodies = [json.dumps({"inputs": [image.reshape(-1).tolist()]}).encode() for image in data.test.inputs]
    key = os.environ.get(API_KEY_ENV, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"\nLoad: {args.requests} single-input requests, {args.concurrency} in flight, from a second process; "
          f"{os.cpu_count()} CPU cores on this machine")
    print(f"  {'deployment':<22}{'requests':>9}{'QPS':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'non-2xx':>9}")

    results: dict[str, dict] = {}
    if args.url:
        warm_up(args.url, bodies, headers)
        results["as deployed"] = summarize(load_in_second_process(args.url, bodies, args.requests,
                                                                  args.concurrency, headers))
        print_row("as deployed", results["as deployed"])
    else:
        import ray
        from ray import serve

        from distill_ray.config import ServeConfig
        from distill_ray.serving import start_serve

        port = args.port or free_port()
        try:
            for size in batch_sizes:
                cfg = ServeConfig(port=port, max_batch_size=size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                                  quantize=args.quantize)
                url = start_serve(student_dir, serve_config=cfg, blocking=False)
                warm_up(url, bodies, headers)
                label = f"max_batch_size={size}"
                results[label] = summarize(load_in_second_process(url, bodies, args.requests,
                                                                  args.concurrency, headers))
                print_row(label, results[label])
        finally:
            serve.shutdown()
            ray.shutdown()
    if len(results) > 1:
        first, last = list(results.values())[0], list(results.values())[-1]
        print(f"  QPS ratio {list(results)[0]} / {list(results)[-1]}: {first['qps'] / last['qps']:.2f}x")
    print(f"  non-2xx answers in total: {sum(r['non_2xx'] for r in results.values())}")
    workdir.cleanup()


if __name__ == "__main__":
    main()
