"""How the student is deployed: ServeConfig from plain data or app args, and Ray Serve options.

Shared by the launcher (``serving.launch.start_serve``) and the deployment (``serving.app``); imports
neither Ray nor FastAPI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from distill_ray.config import ConfigError, ServeConfig, build_section, validate_serve
from distill_ray.serving.canary import TrafficSplit
from distill_ray.serving.model import resolve_student_dir

APP_NAME = "distill_student"
"""Serve application name used by ``start_serve`` and serve/config.yaml."""
DEPLOYMENT_NAME = "StudentDeployment"
"""The student deployment's name in that application (its per-deployment overrides use it)."""
APP_IMPORT_PATH = "distill_ray.serving.app:build_app"
"""The builder a canary is deployed from: Serve's declarative path, whose in-place user_config updates
promote and rollback rely on (an app deployed with ``serve.run`` restarts its replicas on every redeploy)."""


def serve_config_from_dict(raw: Mapping[str, Any]) -> ServeConfig:
    """A validated ServeConfig from plain data (strings from `serve run k=v` are coerced)."""
    return validate_serve(build_section(ServeConfig, dict(raw), "serve"))


def replica_settings(cfg: ServeConfig) -> dict[str, Any]:
    """The ServeConfig a replica is constructed with: everything but who answers (that is the
    user_config, ``traffic_split``), so changing the split never changes the replicas' init args."""
    defaults = ServeConfig()
    return dataclasses.asdict(dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in cfg.routing_keys()}))


def traffic_split(champion_dir: str | Path, cfg: ServeConfig) -> TrafficSplit | None:
    """The canary's split for a champion and ``cfg``'s challenger settings; None without a challenger."""
    if not cfg.challenger:
        return None
    return TrafficSplit(champion=str(resolve_student_dir(champion_dir)),
                        challenger=str(resolve_student_dir(cfg.challenger)),
                        challenger_fraction=cfg.challenger_fraction, sticky_header=cfg.sticky_header)


MIN_ONGOING_REQUESTS = 64
"""Serve's default max_ongoing_requests (5) starves batching, and requests over the limit wait in the
proxy's router with backoff: with max_batch_size=1 and a limit of 8, 64 concurrent clients got 8 QPS
instead of ~125 on the bench machine. A replica here queues cheaply, so the floor is generous."""


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options for the student. ``max_ongoing_requests`` is at least twice the
    batch size so one batch can fill while the previous one runs, and never below MIN_ONGOING_REQUESTS."""
    return {"num_replicas": cfg.num_replicas,
            "max_ongoing_requests": max(2 * cfg.max_batch_size, MIN_ONGOING_REQUESTS),
            "ray_actor_options": {"num_cpus": 1}}


def batch_wait_timeout_s(cfg: ServeConfig) -> float:
    """The wait for more inputs before a partial batch runs. Ray's batch queue waits it out even when
    the batch is already full at one input, so batching off (max_batch_size=1) means no wait."""
    return 0.0 if cfg.max_batch_size == 1 else cfg.batch_wait_timeout_s


APP_ARG_ALIASES = ("student_dir", "run_dir", "path")
RAY_WIDE_KEYS = ("host", "port", "metrics_port")
"""ServeConfig fields that configure Serve's proxy or Ray itself, not the app: ``serve run`` takes host and
port from ``http_options`` and the metrics port from ``ray start --metrics-export-port``."""
APP_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ServeConfig) if f.name not in RAY_WIDE_KEYS)
API_KEY_ARG = "api_key_sha256"
"""App argument carrying the API key's sha256 when the app is built on the cluster (a canary), where
the launching process's DISTILL_RAY_API_KEY is not in the environment. Never the key itself."""


def settings_from_app_args(args: Mapping[str, Any]) -> tuple[Path, ServeConfig]:
    """Student directory and ServeConfig from the args of ``serve run serve.app:build_app k=v ...`` or
    serve/config.yaml: ``student_dir`` (or run_dir/path), an optional ``config`` (an experiment YAML whose
    ``serve`` section is the base), and any ServeConfig field but host/port (those are Serve-wide
    http_options)."""
    args = dict(args)
    given = [k for k in APP_ARG_ALIASES if k in args]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of {', '.join(APP_ARG_ALIASES)} (the run or student directory); got "
                         f"{given or 'none'}")
    student_dir = resolve_student_dir(args.pop(given[0]))
    base: dict[str, Any] = {}
    if args.get("config"):
        from distill_ray.config import config_to_dict, load_config

        base = config_to_dict(load_config(args.pop("config")).serve)
    args.pop("config", None)
    unknown = [k for k in args if k not in APP_CONFIG_KEYS]
    if unknown:
        raise ValueError(f"unknown app argument(s) {', '.join(unknown)}; allowed: {', '.join(APP_ARG_ALIASES)}, "
                         f"config, {', '.join(APP_CONFIG_KEYS)} (host and port go in http_options, the metrics port "
                         "in `ray start --metrics-export-port`)")
    try:
        return student_dir, serve_config_from_dict({**base, **args})
    except ConfigError as err:
        raise ValueError(str(err)) from None

