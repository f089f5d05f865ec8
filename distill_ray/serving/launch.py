"""``distill-ray serve``: start Ray Serve locally with the student deployment and wait until it answers.

Ray, Serve and the deployment (``distill_ray.serving.app``) are imported inside ``start_serve`` only,
so importing this module stays cheap and Ray-free. The library never imports ``serve/app.py``: that
file is the entry point for ``serve run`` and imports the deployment from here.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import Mapping

from distill_ray.config import ServeConfig
from distill_ray.serving.auth import API_KEY_ENV, env_api_key_digest
from distill_ray.serving.model import resolve_student_dir
from distill_ray.serving.options import APP_NAME


def url_for(host: str, port: int) -> str:
    """The URL a client on this machine uses: wildcard binds are reached over loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def wait_until_healthy(url: str, timeout_s: float = 30.0, headers: Mapping[str, str] | None = None) -> dict:
    """Poll ``GET url/healthz`` until it answers 200; raise with the last problem after ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/healthz", headers=dict(headers or {}), timeout=2.0)
            if reply.status_code == 200:
                return reply.json()
            problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}: {err}"
        time.sleep(0.25)
    raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s ({problem}). If Serve was "
                       "already running on this Ray cluster with other HTTP options, they were kept: run "
                       "`serve shutdown` (or serve.shutdown()) first, or use that host/port")


def port_in_use(port: int) -> bool:
    """Whether ``port`` cannot be bound as Ray's metrics agent binds it (all interfaces, address reuse)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def metrics_url() -> str | None:
    """The Prometheus scrape URL of Ray's metrics agent on this process's node (None if Ray reports none)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"{url_for(node['NodeManagerAddress'], node['MetricsExportPort'])}/metrics"
    return None


def start_serve(path: str | Path, host: str | None = None, port: int | None = None,
                serve_config: ServeConfig | None = None, blocking: bool = True) -> str:
    """Serve a student (run directory or student directory) over HTTP with Ray Serve; return its URL.

    Connects to the running Ray if this process already initialised it, otherwise ``ray.init()``
    (which joins a local ``ray start`` cluster when there is one). ``host``/``port`` default to
    ``serve_config``'s (127.0.0.1:8000); the rest of ``serve_config`` (replicas, batching, limits,
    quantize) configures the deployment. With ``DISTILL_RAY_API_KEY`` set in this process, /predict
    and /model need ``Authorization: Bearer <key>``. A Ray started here exports Prometheus metrics
    (``serving.metrics``) on ``serve_config.metrics_port``; a joined Ray on its own port; the scrape
    URL is printed. ``blocking=True`` waits until Ctrl-C, then deletes the application (and shuts Ray
    down if this call started it).
    """
    cfg = serve_config or ServeConfig()
    cfg = dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port)
    student_dir = resolve_student_dir(path)  # fail before starting anything

    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        # A Ray started here puts its metrics (Serve's and the student's, serving.metrics) on a fixed port.
        # A taken port only matters if ray.init starts a Ray (it may join a `ray start` one, whose agent
        # may be what holds it); Ray 2.60 then fails once its raylet start times out, naming no port.
        metrics_port_taken = port_in_use(cfg.metrics_port)
        try:
            ray.init(log_to_driver=blocking, _metrics_export_port=cfg.metrics_port)
        except Exception as err:
            if metrics_port_taken:
                raise RuntimeError(f"Ray did not start, and serve.metrics_port {cfg.metrics_port} (its Prometheus "
                                   "port) is taken: pass --metrics-port N or set serve.metrics_port") from err
            raise
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    from distill_ray.serving.app import build_student_app

    app = build_student_app(student_dir, cfg, api_key_sha256=env_api_key_digest())
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = url_for(cfg.host, cfg.port)
    health = wait_until_healthy(url)
    auth = f" (auth: Bearer key from {API_KEY_ENV})" if env_api_key_digest() else ""
    print(f"Serving {health.get('model')} at {url}{auth}: POST {url}/predict, GET {url}/healthz, GET {url}/model",
          flush=True)
    scrape = metrics_url()
    if scrape:
        print(f"Prometheus metrics (Ray's agent; the student's are ray_distill_student_*): {scrape}", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("Stopping the student deployment", flush=True)
        finally:
            serve.delete(APP_NAME)
            if started_ray:
                ray.shutdown()
    return url
