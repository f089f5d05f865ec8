"""Load test of the served student: distill-ray's Serve app against a plain FastAPI/uvicorn server with
the same model code, side by side in one run, plus dynamic batching and the int8 effect.

    .venv/bin/python bench/serve_load.py
        [--student RUN_OR_STUDENT_DIR | --arch mlp|cnn|text [--text-epochs 1]] [--requests 2000] [--rounds 2]
        [--concurrency 64] [--servers plain,serve,serve-nobatch] [--batch-size 32] [--batch-wait-timeout-s 0.01]
        [--quantize none|int8] [--url URL] [--no-quantization | --quantization-only]

Every server runs in its own process, started by this script and idle while the others are measured:

- ``plain``: a minimal FastAPI app under one uvicorn process using distill-ray's own request parsing,
  model code and answer format (``StudentService``), one forward per request, no batching;
- ``serve``: ``serving.launch.start_serve`` (what ``distill-ray serve`` runs) on its own local Ray, with
  ``--batch-size`` as ``serve.max_batch_size`` and Ray Serve's settings as ``start_serve`` chooses them;
- ``serve-nobatch``: the same with ``max_batch_size=1`` (the batching speed-up is serve / serve-nobatch);
- ``serve-tp``: ``serve`` with Ray 2.60's throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code
  and router on the replica's main loop, gRPC between Serve's processes) behind the same Python proxy;
- ``serve-direct``: the ``serve-tp`` process's replica asked on its own HTTP port (Ray's direct ingress;
  the bench sets ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` to a free port), skipping the proxy: what the
  proxy costs;
- ``serve-haproxy`` (and ``serve-haproxy-nobatch``): ``distill-ray serve --ingress haproxy``, HAProxy in
  front of the replica's own HTTP server.

A SECOND PROCESS (asyncio + httpx) then sends single-input POST /predict requests, ``--concurrency`` in
flight at once, to one server after the other, ``--rounds`` times in turn (``--requests`` per server in
all), so drift in the load of a shared machine hits all alike. It reports QPS, p50/p95/p99 latency and
the non-2xx count per server, and every server's QPS over the first one's (the plain server by
default), overall and per round. With ``--url`` an already running deployment is measured as it is.

Without ``--student`` a quick student is built so the bench runs standalone: an MLP (or ``--arch
cnn``) trained on real Fashion-MNIST (2000 images), requests are test images; or ``--arch text``:
the student of jobs/configs/fortunes_text.yaml (4-layer 64-wide BERT, MiniLM tokenizer, texts cut
at 64 tokens), trained ``--text-epochs`` on the labeled fortunes (0: untrained, the same forward
cost) and exported as the pipeline exports it; requests are raw fortune texts of the test split,
tokenized by the server. Before the load test it prints the int8 effect on the student:
state-dict bytes, serialized size and single-sample latency, float vs int8, and their top-1
agreement.
"""
# No `from __future__ import annotations`: FastAPI reads plain_app's route annotations as real classes.

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

            start, cpu_start = time.perf_counter(), time.process_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return {"latencies": latencies, "statuses": dict(statuses), "wall_s": wall, "client_cpu_s": cpu}

    return asyncio.run(main())


def merge(results: list[dict]) -> dict:
    """Rounds of one deployment as one result: all latencies and statuses, the walls summed."""
    statuses: Counter = Counter()
    for r in results:
        statuses.update(r["statuses"])
    cpu: Counter = Counter()
    for r in results:
        cpu.update(r.get("cpu_s", {}))
    return {"latencies": [t for r in results for t in r["latencies"]], "statuses": dict(statuses),
            "wall_s": sum(r["wall_s"] for r in results), "cpu_s": dict(cpu)}


def summarize(result: dict) -> dict:
    ms = np.asarray(result["latencies"]) * 1000.0
    ok = sum(n for status, n in result["statuses"].items() if isinstance(status, int) and 200 <= status < 300)
    return {"requests": len(ms), "qps": len(ms) / result["wall_s"], "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "non_2xx": len(ms) - ok, "statuses": result["statuses"], "cpu_s": result.get("cpu_s", {})}


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


# --- the servers, each in its own process -----------------------------------------------------------

SERVERS = ("plain", "serve", "serve-nobatch", "serve-tp", "serve-direct", "serve-haproxy", "serve-haproxy-nobatch")


def plain_app(student_dir: str, quantize: str = "none"):
    """The plain server: FastAPI with the same StudentService a Serve replica holds (auth, parsing,
    model, answer), one forward per request on the event loop, no Ray."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from distill_ray.config import ServeConfig
    from distill_ray.serving.app import install_error_handlers
    from distill_ray.serving.auth import env_api_key_digest
    from distill_ray.serving.service import StudentService

    service = StudentService.load(student_dir, ServeConfig(quantize=quantize), env_api_key_digest())
    app = install_error_handlers(FastAPI(docs_url=None, redoc_url=None, openapi_url=None))

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        service.authorize(request.headers.get("authorization"))
        parsed = service.parse(await request.body())
        return JSONResponse(service.respond(service.batch_probabilities(parsed.inputs), parsed.top_k))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(service.health())

    return app


def run_server(kind: str, student_dir: str, port: int, batch_size: int, wait_s: float, quantize: str) -> None:
    """The body of a server process (``--run-server``): serve until killed."""
    import torch

    if kind == "plain":
        import uvicorn

        torch.set_num_threads(1)  # as a Serve replica with num_cpus=1 gets (OMP_NUM_THREADS=1)
        uvicorn.run(plain_app(student_dir, quantize), host="127.0.0.1", port=port, log_level="warning",
                    access_log=False)
        return
    from distill_ray.config import ServeConfig
    from distill_ray.serving.launch import start_serve

    cfg = ServeConfig(max_batch_size=1 if kind.endswith("-nobatch") else batch_size, batch_wait_timeout_s=wait_s,
                      quantize=quantize, metrics_port=free_port())  # each server's Ray its own metrics port
    start_serve(student_dir, host="127.0.0.1", port=port, serve_config=cfg, blocking=True,
                ingress="haproxy" if kind.startswith("serve-haproxy") else "proxy")


def start_servers(kinds: list[str], student_dir: Path, args, logdir: Path) -> tuple[dict[str, str], list]:
    """Start every server process; return label -> URL once each answers /healthz, and the processes."""
    import subprocess
    import sys

    from distill_ray.serving import wait_until_healthy

    urls, procs = {}, []
    direct_port = free_port()  # the serve-tp replica's own port (its first direct-ingress port)
    for kind in kinds:
        if kind == "serve-direct":
            continue  # the serve process's replica, on its own port
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_ADDRESS"] = "local"  # each Serve server on a Ray of its own
        if kind == "serve-tp":
            env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
            env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(direct_port)
            env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(direct_port + 1)  # an exclusive bound
        log = open(logdir / f"{kind}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--run-server", kind, "--student", str(student_dir), "--port", str(port),
             "--batch-size", str(args.batch_size), "--batch-wait-timeout-s", str(args.batch_wait_timeout_s),
             "--quantize", args.quantize], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        urls[kind] = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(urls[kind], timeout_s=180)
        except RuntimeError as err:
            log.flush()
            stop_servers(procs)  # the ones already up, and this one: no Ray left behind
            raise RuntimeError(f"server {kind} did not start; the end of its log:\n"
                               f"{(logdir / f'{kind}.log').read_text()[-3000:]}") from err
    if "serve-direct" in kinds:
        urls["serve-direct"] = f"http://127.0.0.1:{direct_port}"
        wait_until_healthy(urls["serve-direct"], timeout_s=30)
    return {kind: urls[kind] for kind in kinds}, procs


COMPONENTS = (("haproxy", "HAProxy"), ("ray::ProxyActo", "Serve proxy"), ("ray::ServeRepli", "Serve replica"),
              ("ray::", "Ray workers (other)"), ("raylet", "Ray core"), ("gcs_server", "Ray core"))


def component_of(comm: str, plain: bool) -> str:
    """What a process of a server's session is, from its name (/proc/PID/comm, 15 characters)."""
    if plain:
        return "plain server"
    for prefix, name in COMPONENTS:
        if comm.startswith(prefix):
            return name
    return "Ray core" if comm not in ("python", "python3") else "driver (start_serve)"


def session_cpu_s(session: int, plain: bool) -> Counter:
    """CPU seconds (user + system) each component of one server's process session has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: Counter = Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == session:  # after the name: state, ppid, pgrp, session, ..., utime (11), stime (12)
            used[component_of(comm, plain)] += (int(fields[11]) + int(fields[12])) / ticks
    return used


def stop_servers(procs: list) -> None:
    import signal

    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGINT)  # start_serve deletes its app and shuts its Ray down
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="run or student directory; default: train a quick student (--arch)")
    parser.add_argument("--arch", default="mlp", choices=ARCHS,
                        help="quick student trained without --student: an MLP or CNN on Fashion-MNIST, or "
                             "text: the fortunes_text example's BERT student on fortunes (text requests)")
    parser.add_argument("--text-epochs", type=int, default=1,
                        help="--arch text: epochs of supervised training (0: untrained; same forward cost)")
    parser.add_argument("--requests", type=int, default=2000, help="per server, over all rounds")
    parser.add_argument("--rounds", type=int, default=2,
                        help="the servers take turns this many times (shared machines drift)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--servers", default="plain,serve,serve-nobatch",
                        help=f"servers to compare, the first is the reference ({', '.join(SERVERS)})")
    parser.add_argument("--batch-size", type=int, default=32, help="serve.max_batch_size of the serve servers")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--quantize", default="none", choices=("none", "int8"), help="serve the int8 student")
    parser.add_argument("--url", help="measure this running deployment instead of starting servers")
    parser.add_argument("--no-quantization", action="store_true", help="skip the float vs int8 report")
    parser.add_argument("--quantization-only", action="store_true", help="print the float vs int8 report and stop")
    parser.add_argument("--run-server", choices=SERVERS, help=argparse.SUPPRESS)  # a server process's body
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_server:
        run_server(args.run_server, args.student, args.port, args.batch_size, args.batch_wait_timeout_s,
                   args.quantize)
        return
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    if "serve-direct" in kinds and "serve-tp" not in kinds:
        parser.error("serve-direct asks the serve-tp server's replica: list serve-tp too")

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
    print(f"\nLoad: {args.requests} single-input requests per server ({'texts' if text else 'images'}), "
          f"{args.concurrency} in flight, from a second process, in {args.rounds} alternating rounds; "
          f"serve max_batch_size {args.batch_size}, wait {args.batch_wait_timeout_s} s; "
          f"{os.cpu_count()} CPU cores on this machine")
    client = multiprocessing.get_context("spawn").Pool(1)
    rounds: dict[str, list[dict]] = {}
    procs: list = []
    try:
        if args.url:
            urls = {"as deployed": args.url}
        else:
            urls, procs = start_servers(kinds, student_dir, args, Path(workdir.name))
        for url in urls.values():
            warm_up(url, bodies, headers)
        share = [args.requests // args.rounds + (r < args.requests % args.rounds) for r in range(args.rounds)]
        sessions = {kind: proc.pid for kind, proc in zip([k for k in urls if k != "serve-direct"], procs)}
        sessions["serve-direct"] = sessions.get("serve-tp")
        for n in share:
            for label, url in urls.items():
                session = sessions.get(label)
                before = session_cpu_s(session, label == "plain") if session else Counter()
                result = client.apply(run_load, (url, bodies, n, args.concurrency, headers))
                if session:
                    after = session_cpu_s(session, label == "plain")
                    result["cpu_s"] = {k: after[k] - before[k] for k in after}
                result.setdefault("cpu_s", {})["load client"] = result["client_cpu_s"]
                rounds.setdefault(label, []).append(result)
    finally:
        client.close()
        stop_servers(procs)

    print(f"  {'server':<22}{'requests':>9}{'QPS':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'non-2xx':>9}")
    results = {label: summarize(merge(parts)) for label, parts in rounds.items()}
    for label, s in results.items():
        print_row(label, s)
    (first, base), *others = list(rounds.items())
    for label, parts in others:  # each server against the first (the plain server by default)
        per_round = [len(x["latencies"]) / x["wall_s"] / (len(y["latencies"]) / y["wall_s"])
                     for x, y in zip(parts, base)]
        print(f"  QPS {label} / {first}: {results[label]['qps'] / results[first]['qps']:.2f}x "
              f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)}); "
              f"p99 {results[label]['p99_ms']:.0f} vs {results[first]['p99_ms']:.0f} ms")
    print("\n  CPU ms per request, by process (user + system, /proc; the machine's other work not counted):")
    parts = sorted({part for r in results.values() for part in r["cpu_s"]})
    print(f"  {'server':<22}" + "".join(f"{part[:13]:>14}" for part in parts) + f"{'total':>10}")
    for label, s in results.items():
        per = {part: 1000.0 * s["cpu_s"].get(part, 0.0) / s["requests"] for part in parts}
        print(f"  {label:<22}" + "".join(f"{per[part]:>14.2f}" for part in parts) + f"{sum(per.values()):>10.2f}")
    for batched in ("serve", "serve-haproxy"):
        if batched in results and f"{batched}-nobatch" in results:
            print(f"  batching ({batched} / {batched}-nobatch): "
                  f"{results[batched]['qps'] / results[f'{batched}-nobatch']['qps']:.2f}x")
    print(f"  non-2xx answers in total: {sum(r['non_2xx'] for r in results.values())}")
    workdir.cleanup()


if __name__ == "__main__":
    main()
