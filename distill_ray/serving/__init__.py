"""Serving a distilled student over HTTP: the names other code imports, from the modules that hold them.

One job per module, each usable and testable without the ones above it:

- ``model``: find (a run or student directory, ``models:/NAME@ALIAS`` of the MLflow registry in
  ``distill_ray.registry``) and load a student (safetensors, no pickle), int8, ``StudentPredictor`` /
  ``GeneratorPredictor``. No Ray, no HTTP.
- ``schemas``: pydantic request models of ``/predict`` and ``/generate`` and the 4xx
  ``RequestError`` saying what was wrong and what is allowed. Pure.
- ``auth``: bearer-key auth (FastAPI's ``HTTPBearer``, sha256 digest, constant-time compare).
- ``service``: ``StudentService``, what one replica does per request, minus Ray.
- ``canary``: champion/challenger routing inside a replica: the ``TrafficSplit`` (the deployment's
  user_config), sha256 sticky buckets, ``StudentRouter``. No Ray, no HTTP.
- ``options``: ServeConfig from app args, Ray Serve deployment options.
- ``metrics``: the deployment's Prometheus metrics (``StudentMetrics`` per replica and model version,
  the ASGI middleware that counts and times every answer, the metric names the dashboard uses); Ray
  is imported only when a replica builds ``StudentMetrics``.
- ``app``: the Ray Serve deployment with its FastAPI ingress (imports Ray; ``serve/app.py``
  re-exports its ``build_app``).
- ``launch``: ``start_serve`` (``distill-ray serve RUN_DIR``), and ``promote`` / ``rollback`` of a
  running canary (``distill-ray serve promote|rollback``).

Importing this package stays Ray-free.
"""

from distill_ray.serving.auth import API_KEY_ENV, ApiKeyCheck, api_key_digest, env_api_key_digest
from distill_ray.serving.canary import (
    STICKY_HEADER,
    VERSION_HEADER,
    StudentRouter,
    TrafficSplit,
    TrafficSplitError,
    key_bucket,
)
from distill_ray.serving.launch import change_traffic, promote, rollback, start_serve, url_for, wait_until_healthy
from distill_ray.serving.metrics import METRIC_NAMES, StudentMetrics
from distill_ray.serving.model import (
    GeneratorPredictor,
    StudentLoadError,
    StudentPredictor,
    format_predictions,
    is_causal_lm,
    load_student_model,
    normalize_quantize,
    quantize_int8,
    read_card,
    resolve_student_dir,
    state_dict_bytes,
)
from distill_ray.serving.options import (
    APP_NAME,
    batch_wait_timeout_s,
    deployment_options,
    serve_config_from_dict,
    settings_from_app_args,
)
from distill_ray.serving.schemas import (
    GenerateRequest,
    InputSchema,
    PredictRequest,
    RequestError,
    RequestLimits,
    parse_generate_request,
    parse_predict_request,
)
from distill_ray.serving.service import StudentService

__all__ = [
    "API_KEY_ENV", "APP_NAME", "ApiKeyCheck", "GenerateRequest", "GeneratorPredictor", "InputSchema", "METRIC_NAMES",
    "PredictRequest", "RequestError", "RequestLimits", "STICKY_HEADER", "StudentLoadError", "StudentMetrics", "StudentPredictor",
    "StudentRouter", "StudentService", "TrafficSplit", "TrafficSplitError", "VERSION_HEADER", "api_key_digest",
    "batch_wait_timeout_s", "change_traffic", "deployment_options", "env_api_key_digest", "format_predictions",
    "is_causal_lm", "key_bucket", "load_student_model", "normalize_quantize", "parse_generate_request",
    "parse_predict_request", "promote", "quantize_int8", "read_card", "resolve_student_dir", "rollback",
    "serve_config_from_dict", "settings_from_app_args", "start_serve", "state_dict_bytes", "url_for",
    "wait_until_healthy",
]
