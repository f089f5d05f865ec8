"""Load test of the served student: QPS and latency with dynamic batching on and off, plus int8 effect.

    PYTHONPATH=. RAY_ADDRESS=local .venv/bin/python bench/serve_load.py
        [--student RUN_OR_STUDENT_DIR | --arch mlp|cnn|text [--text-epochs 1]] [--requests 2000] [--rounds 2]
        [--concurrency 64] [--batch-sizes 32,1] [--batch-wait-timeout-s 0.01] [--quantize none|int8]
        [--url URL] [--no-quantization | --quantization-only]

Each max batch size (default 32 and 1) is deployed at once, side by side, as its own Serve
application on one local Ray Serve (``serving.app.build_student_app``, what ``start_serve`` binds;
route prefixes /bench_0, /bench_1, ...). A SECOND PROCESS (asyncio + httpx) then sends single-input
POST /predict requests, ``--concurrency`` in flight at once, to one deployment after the other,
``--rounds`` times in turn (``--requests`` per deployment in all), so drift in the load of a shared
machine hits both alike. It reports QPS, p50/p95/p99 latency and the non-2xx count per deployment,
and the QPS ratio of the first to the last batch size (the batching speed-up) overall and per
round. With ``--url`` an already running deployment is measured as it is.

Without ``--student`` a quick student is built so the bench runs standalone: an MLP (or ``--arch
cnn``) trained on real Fashion-MNIST (2000 images), requests are test images; or ``--arch text``:
the student of jobs/configs/fortunes_text.yaml (4-layer 64-wide BERT, MiniLM tokenizer, texts cut
at 64 tokens), trained ``--text-epochs`` on the labeled fortunes (0: untrained, the same forward
cost) and exported as the pipeline exports it; requests are raw fortune texts of the test split,
tokenized by the replica. Before the load test it prints the int8 effect on the student:
state-dict bytes, serialized size and single-sample latency, float vs int8, and their top-1
agreement.
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


def merge(results: list[dict]) -> dict:
    """Rounds of one deployment as one result: all latencies and statuses, the walls summed."""
    statuses: Counter = Counter()
    for r in results:
        statuses.update(r["statuses"])
    return {"latencies": [t for r in results for t in r["latencies"]], "statuses": dict(statuses),
            "wall_s": sum(r["wall_s"] for r in results)}


def summarize(result: dict) -> dict:
    ms = np.asarray(result["latencies"]) * 1000.0
    ok = sum(n for status, n in result["statuses"].items() if isinstance(status, int) and 200 <= status < 300)
    return {"requests": len(ms), "qps": len(ms) / result["wall_s"], "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "non_2xx": len(ms) - ok, "statuses": result["statuses"]}


# --- the student -----------------------------------------------------------------------------------

QUICK_STUDENTS = {"mlp": {"hidden": [256]}, "cnn": {"channels": [32, 64], "hidden": 128}}
TEXT_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "fortunes_text.yaml"
ARCHS = (*QUICK_STUDENTS, "text")


def train_quick_student(directory: Path, data, arch: str = "mlp") -> Path:
    """A small MLP (or CNN) on real Fashion-MNIST, saved as a student directory with its card."""
    import torch

    from distill_ray.evaluation.metrics import accuracy, predict_logits
    from distill_ray.models import build_model, save_model
    from distill_ray.teachers.recipes import train_classifier

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


def train_text_student(directory: Path, data, epochs: int) -> Path:
    """The fortunes text example's student (jobs/configs/fortunes_text.yaml: a 4-layer, 64-wide BERT with
    the MiniLM tokenizer), trained ``epochs`` epochs from the labeled fortunes (0: untrained, same
    forward cost), exported as the pipeline exports it: spec, card and tokenizer beside the weights."""
    import torch

    from distill_ray.config import load_config
    from distill_ray.evaluation.metrics import accuracy, predict_logits
    from distill_ray.models import build_model, save_model, save_tokenizer
    from distill_ray.teachers.recipes import train_classifier

    cfg = load_config(TEXT_CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg.student.arch, data.input_shape, data.num_classes, cfg.student.options)
    if epochs:
        train_classifier(model, data.train, epochs=epochs, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                         pad_id=data.pad_id)
    save_model(model.eval(), directory, {"arch": cfg.student.arch, "input_shape": list(data.input_shape),
                                         "num_classes": data.num_classes, "options": dict(cfg.student.options),
                                         "task": "classification", "class_names": list(data.class_names)})
    save_tokenizer(data.tokenizer, directory, max_length=data.input_shape[-1])
    card = {"name": "bench-text", "version": "v1", "task": "classification", "dataset": "fortunes", "teachers": [],
            "metrics": {"test_accuracy": accuracy(predict_logits(model, data.test.inputs), data.test.labels)},
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


def quantization_report(student_dir: Path, test_inputs: np.ndarray, texts: list[str] | None = None) -> None:
    """Float vs int8: sizes, latency of the model on ``test_inputs`` (images or padded token ids) and
    top-1 agreement of the predictors on the same inputs (on ``texts`` for a text student)."""
    import torch

    from distill_ray.evaluation.metrics import single_sample_latency_ms
    from distill_ray.serving import StudentPredictor, state_dict_bytes

    float_student = StudentPredictor(student_dir)
    int8_student = StudentPredictor(student_dir, quantize="int8")
    x = torch.as_tensor(test_inputs)
    agreement_inputs = texts if texts is not None else x
    agreement = (float_student.probabilities(agreement_inputs).argmax(-1)
                 == int8_student.probabilities(agreement_inputs).argmax(-1)).float().mean()
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
    print(f"  top-1 agreement float vs int8 on {len(x)} test {'texts' if texts else 'images'}: {agreement.item():.4f}")


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


def load_data(arch: str):
    if arch == "text":
        from distill_ray.config import load_config
        from distill_ray.data.bundled import load_fortunes

        data_cfg = load_config(TEXT_CONFIG).data
        return load_fortunes(split_seed=data_cfg.split_seed, max_length=data_cfg.max_length,
                             tokenizer=data_cfg.tokenizer)
    from distill_ray.data.bundled import load_fashion_mnist

    return load_fashion_mnist(max_train_samples=2000, max_eval_samples=500)


def request_bodies(data, text: bool) -> list[bytes]:
    """One single-input /predict body per test sample: the raw text, or the flat image."""
    if text:
        return [json.dumps({"inputs": [str(t)]}).encode() for t in data.test.texts]
    return [json.dumps({"inputs": [image.reshape(-1).tolist()]}).encode() for image in data.test.inputs]


def deploy_side_by_side(student_dir: Path, configs: dict[str, object], port: int) -> dict[str, str]:
    """Every ServeConfig as its own Serve application (``serving.app.build_student_app``, what
    ``start_serve`` binds) under its own route prefix on one port; returns label -> URL."""
    from ray import serve

    from distill_ray.serving.app import build_student_app
    from distill_ray.serving import url_for, wait_until_healthy

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for i, (label, cfg) in enumerate(configs.items()):
        serve.run(build_student_app(student_dir, cfg), name=f"bench_{i}", route_prefix=f"/bench_{i}")
        urls[label] = f"{url_for('127.0.0.1', port)}/bench_{i}"
        wait_until_healthy(urls[label], timeout_s=120)
    return urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="run or student directory; default: train a quick student (--arch)")
    parser.add_argument("--arch", default="mlp", choices=ARCHS,
                        help="quick student trained without --student: an MLP or CNN on Fashion-MNIST, or "
                             "text: the fortunes_text example's BERT student on fortunes (text requests)")
    parser.add_argument("--text-epochs", type=int, default=1,
                        help="--arch text: epochs of supervised training (0: untrained; same forward cost)")
    parser.add_argument("--requests", type=int, default=2000, help="per deployment, over all rounds")
    parser.add_argument("--rounds", type=int, default=2,
                        help="the deployments take turns this many times (shared machines drift)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-sizes", default="32,1", help="max_batch_size values to compare")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="serve the int8 student")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--url", help="measure this running deployment instead of starting one")
    parser.add_argument("--no-quantization", action="store_true", help="skip the float vs int8 report")
    parser.add_argument("--quantization-only", action="store_true", help="print the float vs int8 report and stop")
    args = parser.parse_args()

    text = args.arch == "text"
    data = load_data(args.arch)
    workdir = tempfile.TemporaryDirectory(prefix="serve_load_")
    if args.student:
        from distill_ray.serving import resolve_student_dir

        student_dir = resolve_student_dir(args.student)
    elif text:
        print(f"No --student: the {TEXT_CONFIG.name} student, trained {args.text_epochs} epoch(s) on "
              f"{len(data.train.labels)} labeled fortunes")
        student_dir = train_text_student(Path(workdir.name) / "student", data, args.text_epochs)
    else:
        print(f"No --student: training a quick {args.arch} {QUICK_STUDENTS[args.arch]} on 2000 Fashion-MNIST images")
        student_dir = train_quick_student(Path(workdir.name) / "student", data, args.arch)
    card = json.loads((student_dir / "distill_card.json").read_text()) \
        if (student_dir / "distill_card.json").is_file() else {}
    if card.get("metrics"):
        print(f"  student {student_dir}: {card['metrics']}")
    if not args.no_quantization:
        quantization_report(student_dir, data.test.inputs, [str(t) for t in data.test.texts] if text else None)
    if args.quantization_only:
        return

    bodies = request_bodies(data, text)
    key = os.environ.get(API_KEY_ENV, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"\nLoad: {args.requests} single-input requests per deployment ({'texts' if text else 'images'}), "
          f"{args.concurrency} in flight, from a second process, in {args.rounds} alternating rounds; "
          f"{os.cpu_count()} CPU cores on this machine")
    client = multiprocessing.get_context("spawn").Pool(1)
    rounds: dict[str, list[dict]] = {}
    try:
        if args.url:
            urls = {"as deployed": args.url}
        else:
            import ray

            from distill_ray.config import ServeConfig

            # One logical CPU per replica (each asks for 1) even where the machine has fewer cores.
            ray.init(num_cpus=max(os.cpu_count() or 1, len(batch_sizes)), include_dashboard=False,
                     log_to_driver=False)
            configs = {f"max_batch_size={size}": ServeConfig(max_batch_size=size, quantize=args.quantize,
                                                             batch_wait_timeout_s=args.batch_wait_timeout_s)
                       for size in batch_sizes}
            urls = deploy_side_by_side(student_dir, configs, args.port or free_port())
        for url in urls.values():
            warm_up(url, bodies, headers)
        share = [args.requests // args.rounds + (r < args.requests % args.rounds) for r in range(args.rounds)]
        for n in share:
            for label, url in urls.items():
                rounds.setdefault(label, []).append(client.apply(run_load, (url, bodies, n, args.concurrency,
                                                                            headers)))
    finally:
        client.close()
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()

    print(f"  {'deployment':<22}{'requests':>9}{'QPS':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'non-2xx':>9}")
    results = {label: summarize(merge(parts)) for label, parts in rounds.items()}
    for label, s in results.items():
        print_row(label, s)
    *others, (last, base) = list(rounds.items())
    for label, parts in others:  # each deployment against the last one (batching off by default)
        per_round = [len(x["latencies"]) / x["wall_s"] / (len(y["latencies"]) / y["wall_s"])
                     for x, y in zip(parts, base)]
        print(f"  QPS ratio {label} / {last}: {results[label]['qps'] / results[last]['qps']:.2f}x "
              f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)})")
    print(f"  non-2xx answers in total: {sum(r['non_2xx'] for r in results.values())}")
    workdir.cleanup()


if __name__ == "__main__":
    main()
