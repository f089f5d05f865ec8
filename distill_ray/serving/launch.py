"""``distill-ray serve``: start Ray Serve locally with the student deployment and wait until it answers;
``distill-ray serve promote`` / ``rollback``: move a running canary's traffic.

Ray, Serve and the deployment (``distill_ray.serving.app``) are imported inside the functions only,
so importing this module stays cheap and Ray-free. The library never imports ``serve/app.py``: that
file is the entry point for ``serve run`` and imports the deployment from here.

A plain student is deployed with ``serve.run``. A canary is deployed from a config naming
``options.APP_IMPORT_PATH`` (Serve's declarative path, what ``serve deploy`` does) because only there
does a redeploy that changes nothing but a deployment's ``user_config`` update the replicas in place:
``serve.run`` gives every redeploy a fresh random code version (Ray 2.60's ``ServeControllerClient.
deploy_applications``; ``Deployment.options(version=...)`` was removed), so the replicas would restart.
``promote`` and ``rollback`` read the running app's config and split from the Serve controller and
apply the same config with only the student deployment's ``user_config`` changed.
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
from distill_ray.serving.canary import LoadedStudent, TrafficSplit, TrafficSplitError, check_same_kind, version_label
from distill_ray.serving.model import resolve_student_dir
from distill_ray.serving.options import (
    API_KEY_ARG,
    APP_CONFIG_KEYS,
    APP_IMPORT_PATH,
    APP_NAME,
    DEPLOYMENT_NAME,
    traffic_split,
)

DEPLOY_TIMEOUT_S = 120.0
"""How long promote/rollback and a canary's start wait for the application to be RUNNING again."""


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
                serve_config: ServeConfig | None = None, blocking: bool = True, ingress: str = "proxy") -> str:
    """Serve a student (run directory or student directory) over HTTP with Ray Serve; return its URL.

    Connects to the running Ray if this process already initialised it, otherwise ``ray.init()``
    (which joins a local ``ray start`` cluster when there is one). ``host``/``port`` default to
    ``serve_config``'s (127.0.0.1:8000); the rest of ``serve_config`` (replicas, batching, limits,
    quantize) configures the deployment. With ``DISTILL_RAY_API_KEY`` set in this process, /predict
    and /model need ``Authorization: Bearer <key>``. ``blocking=True`` waits until Ctrl-C, then
    deletes the application (and shuts Ray down if this call started it). A Ray started here exports
    Prometheus metrics (``serving.metrics``) on ``serve_config.metrics_port``, a joined Ray on its own
    port; the scrape URL is printed. ``ingress="haproxy"`` puts
    HAProxy in front (``ingress_settings``); it needs a Ray this call starts, since Serve reads the
    settings when its processes start (for a ``ray start`` cluster, set them in that command's
    environment).
    """
    cfg = serve_config or ServeConfig()
    cfg = dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port)
    student_dir = resolve_student_dir(path)  # fail before starting anything
    split = traffic_split(student_dir, cfg)
    if split:
        check_canary_students(split, cfg)

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
    if split:
        deploy_canary(student_dir, cfg, api_key_sha256=env_api_key_digest())
    else:
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
    if split:
        print(f"Canary: {split.challenger_fraction:.0%} of requests to {split.challenger} (sticky by header "
              f"{split.sticky_header}); `distill-ray serve promote` or `distill-ray serve rollback` ends it",
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


# --- canary: start, promote, rollback -----------------------------------------------------------

def check_canary_students(split: TrafficSplit, cfg: ServeConfig) -> None:
    """Load champion and challenger here, before anything is deployed, and refuse two students of
    different kinds (or that cannot be told apart) with the reason."""
    from distill_ray.serving.service import StudentService

    champion_service = StudentService.load(split.champion, cfg)
    champion = LoadedStudent(split.champion, champion_service,
                             version_label(champion_service.model_card(), champion_service.predictor.model_id))
    challenger_service = StudentService.load(split.challenger, cfg)
    check_same_kind(champion, LoadedStudent(split.challenger, challenger_service, version_label(
        challenger_service.model_card(), challenger_service.predictor.model_id, [champion.version])))


def canary_app_config(student_dir: str | Path, cfg: ServeConfig, api_key_sha256: str | None) -> dict:
    """The Serve application config of a canary: ``build_app``'s import path and its args (paths
    resolved, so the app means the same wherever it is built)."""
    split = traffic_split(student_dir, cfg)
    args = {k: v for k, v in dataclasses.asdict(cfg).items() if k in APP_CONFIG_KEYS}
    args.update(student_dir=split.champion, challenger=split.challenger)
    if api_key_sha256:
        args[API_KEY_ARG] = api_key_sha256
    return {"name": APP_NAME, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": args}


def _serve_client():
    """The Serve controller's client (what ``serve deploy`` / ``serve run CONFIG`` use); a clear error
    when Serve is not running on this Ray."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        return _get_global_client()
    except RayServeException:
        raise TrafficSplitError("Ray Serve is not running on this Ray cluster; start a canary with "
                                "`distill-ray serve CHAMPION --challenger PATH --challenger-fraction F`") from None


def _apply_app_config(app_config: dict, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Deploy ``app_config`` beside the cluster's other config-deployed apps (a config deploy removes
    the ones it does not name) and wait until the application is RUNNING."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

    client = _serve_client()
    details = ServeInstanceDetails.model_validate(client.get_serve_details())
    others = [app.deployed_app_config.model_dump(exclude_unset=True) for name, app in details.applications.items()
              if name != app_config["name"] and app.deployed_app_config is not None]
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [*others, app_config]}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_config["name"])
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve could not deploy {app_config['name']}: {app.message.strip()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"{app_config['name']} was not RUNNING within {timeout_s:.0f} s; see `serve status`")


def deploy_canary(student_dir: str | Path, cfg: ServeConfig, api_key_sha256: str | None = None) -> None:
    """Deploy champion + challenger as ``APP_NAME`` from the config (Serve must be started)."""
    _apply_app_config(canary_app_config(student_dir, cfg, api_key_sha256))


def running_split() -> tuple[dict, TrafficSplit]:
    """The running canary's application config (as deployed) and its current split."""
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails.model_validate(_serve_client().get_serve_details())
    app = details.applications.get(APP_NAME)
    if app is None:
        raise TrafficSplitError(f"no {APP_NAME!r} application runs on this Ray cluster; start one with "
                                "`distill-ray serve CHAMPION --challenger PATH --challenger-fraction F`")
    deployment = app.deployments.get(DEPLOYMENT_NAME)
    user_config = deployment.deployment_config.user_config if deployment else None
    if not user_config:
        raise TrafficSplitError(f"{APP_NAME!r} runs without a challenger (started without --challenger); there "
                                "is no canary to promote or roll back")
    if app.deployed_app_config is None:
        raise TrafficSplitError(f"{APP_NAME!r} was deployed with serve.run (e.g. `serve run serve.app:build_app "
                                "...`), whose redeploys restart the replicas; start the canary with `distill-ray "
                                "serve CHAMPION --challenger PATH` or a config (`serve run serve/config.yaml`)")
    return app.deployed_app_config.model_dump(exclude_unset=True), TrafficSplit.from_user_config(user_config)


def change_traffic(action: str, address: str | None = None, timeout_s: float = DEPLOY_TIMEOUT_S) -> TrafficSplit:
    """``promote`` (the challenger becomes the champion, all traffic to it) or ``rollback`` (all traffic
    to the champion, the challenger unloaded) on the running canary; returns the new split.

    Only the student deployment's ``user_config`` changes, so Serve reconfigures the replicas in place:
    no restart, and requests in flight finish on the student they picked. Joins the Ray this process
    initialised, else ``address`` (default ``auto``, the cluster running on this machine)."""
    if action not in ("promote", "rollback"):
        raise ValueError(f"action {action!r} is not valid; choose one of: promote, rollback")
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", log_to_driver=False)
        except ConnectionError as err:
            raise RuntimeError(f"no Ray cluster to join at {address or 'auto'} ({err}); run promote/rollback "
                               "where the canary runs, or pass --address HOST:PORT") from None
    app_config, split = running_split()
    new = split.promoted() if action == "promote" else split.rolled_back()
    overrides = [d for d in app_config.get("deployments", []) if d.get("name") != DEPLOYMENT_NAME]
    mine = next((d for d in app_config.get("deployments", []) if d.get("name") == DEPLOYMENT_NAME), {})
    app_config["deployments"] = [*overrides, {**mine, "name": DEPLOYMENT_NAME, "user_config": new.to_user_config()}]
    _apply_app_config(app_config, timeout_s)
    return new


def promote(address: str | None = None) -> TrafficSplit:
    """``distill-ray serve promote``: the challenger becomes the champion and answers everything."""
    return change_traffic("promote", address)


def rollback(address: str | None = None) -> TrafficSplit:
    """``distill-ray serve rollback``: everything back to the champion; the challenger is unloaded."""
    return change_traffic("rollback", address)
