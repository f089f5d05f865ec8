"""``distill-ray serve``: start Ray Serve locally with the student deployment and wait until it answers.

Ray, Serve and the deployment (``distill_ray.serving.app``) are imported inside ``start_serve`` only,
so importing this module stays cheap and Ray-free. The library never imports ``serve/app.py``: that
file is the entry point for ``serve run`` and imports the deployment from here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Mapping

from distill_ray.config import ServeConfig
from distill_ray.serving.auth import API_KEY_ENV, env_api_key_digest
from distill_ray.serving.model import resolve_student_dir
from distill_ray.serving.options import APP_NAME


INGRESS_KINDS = ("proxy", "haproxy")
"""What answers HTTP on the user's port: Ray Serve's Python proxy actor (Ray's default), or HAProxy
(Ray 2.60's bundled binary) in front of replicas that answer HTTP themselves (direct ingress)."""


def ingress_settings(ingress: str) -> dict[str, str]:
    """Ray Serve's environment settings for ``ingress``, read by Serve's controller, proxy and replicas
    when they start: set before the Ray they run in starts.

    ``haproxy`` takes Ray 2.60's throughput mode (user code and router on the replica's main event
    loop, gRPC between Serve's processes, buffered request logs, the GC frozen after start-up, each
    ingress replica answering HTTP on a port of its own) with HAProxy as the front door. HAProxy binds
    the user's host and port, but Ray renders its stats page and Prometheus exporter as binds on every
    interface, on ports that default to fixed numbers (8404, 9101): here free ports are picked for
    them, and ``start_serve`` says where they listen. Measured: serve/README.md, "Speed"."""
    if ingress not in INGRESS_KINDS:
        raise ValueError(f"ingress {ingress!r} is not one of {', '.join(INGRESS_KINDS)}")
    if ingress == "proxy":
        return {}
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def start_serve(path: str | Path, host: str | None = None, port: int | None = None,
                serve_config: ServeConfig | None = None, blocking: bool = True, ingress: str = "proxy") -> str:
    """Serve a student (run directory or student directory) over HTTP with Ray Serve; return its URL.

    Connects to the running Ray if this process already initialised it, otherwise ``ray.init()``
    (which joins a local ``ray start`` cluster when there is one). ``host``/``port`` default to
    ``serve_config``'s (127.0.0.1:8000); the rest of ``serve_config`` (replicas, batching, limits,
    quantize) configures the deployment. With ``DISTILL_RAY_API_KEY`` set in this process, /predict
    and /model need ``Authorization: Bearer <key>``. ``blocking=True`` waits until Ctrl-C, then
    deletes the application (and shuts Ray down if this call started it). ``ingress="haproxy"`` puts
    HAProxy in front (``ingress_settings``); it needs a Ray this call starts, since Serve reads the
    settings when its processes start (for a ``ray start`` cluster, set them in that command's
    environment).
    """
    cfg = serve_config or ServeConfig()
    cfg = dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port)
    student_dir = resolve_student_dir(path)  # fail before starting anything

    import ray
    from ray import serve

    settings = ingress_settings(ingress)
    started_ray = not ray.is_initialized()
    if settings and not started_ray:
        raise ValueError(f"ingress {ingress!r} needs a Ray that distill-ray serve starts itself: this process "
                         f"already runs one. Set {', '.join(settings)} in the environment of `ray start` instead")
    if started_ray:
        for name, value in settings.items():
            os.environ.setdefault(name, value)  # a user's own value wins
        ray.init(log_to_driver=blocking)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    from distill_ray.serving.app import build_student_app

    app = build_student_app(student_dir, cfg, api_key_sha256=env_api_key_digest())
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = url_for(cfg.host, cfg.port)
    health = wait_until_healthy(url)
    auth = f" (auth: Bearer key from {API_KEY_ENV})" if env_api_key_digest() else ""
    if settings:
        print(f"HAProxy in front; its stats page (:{os.environ['RAY_SERVE_HAPROXY_STATS_PORT']}/stats) and "
              f"Prometheus exporter (:{os.environ['RAY_SERVE_HAPROXY_METRICS_PORT']}) listen on every interface",
              flush=True)
    print(f"Serving {health.get('model')} at {url}{auth}: POST {url}/predict, GET {url}/healthz, GET {url}/model",
          flush=True)
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
