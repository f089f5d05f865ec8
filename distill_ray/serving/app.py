"""The Ray Serve deployment of a distilled student: ``POST /predict``, ``POST /generate``,
``GET /healthz``, ``GET /model`` behind a FastAPI ingress, with dynamic batching.

Thin on purpose: auth, validation, inference and answer formatting live in ``StudentService``
(``distill_ray.serving.service``); this module adds HTTP, Ray Serve and batching. Importing it defines
the app and the deployment and does nothing else (no model loading, no Ray calls).

- ``start_serve`` (``distill-ray serve RUN_DIR``) binds ``build_student_app``;
- ``serve run serve.app:build_app student_dir=RUN_DIR`` and ``serve run serve/config.yaml`` reach
  ``build_app`` through ``serve/app.py``, which only re-exports it.

Errors: every ``RequestError`` a route raises (validation, auth) and every ``RequestValidationError``
FastAPI raises itself become ``{"error": "<what was wrong and what is allowed>", "status": N}``, with
``WWW-Authenticate: Bearer`` on 401s. The bodies are validated by the replica's pydantic models
(``serving.schemas``), built at replica start from its ServeConfig limits and the loaded student's
input shape, which is why a route reads the raw body instead of declaring a static model.

Metrics (``serving.metrics``): ``RequestMetricsMiddleware`` counts and times every answer with its
final status, outside the error handlers so 4xx answers count too; the batched call records batch
size and the predicted-class mix. Each replica's ``StudentMetrics`` lives on the replica object,
which the middleware reaches through Serve's replica context.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as real classes.
import asyncio
import dataclasses
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from distill_ray.config import ServeConfig
from distill_ray.serving.auth import bearer_scheme, env_api_key_digest
from distill_ray.serving.metrics import RequestMetricsMiddleware, StudentMetrics, model_version_of
from distill_ray.serving.options import (
    batch_wait_timeout_s,
    deployment_options,
    serve_config_from_dict,
    settings_from_app_args,
)
from distill_ray.serving.schemas import RequestError, validation_error_body
from distill_ray.serving.service import StudentService


def error_response(err: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> FastAPI:
    """Answer ``RequestError`` and FastAPI's own ``RequestValidationError`` with the JSON error body."""

    async def on_request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err)

    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_body(list(err.errors())))

    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    return app


def replica_metrics() -> Optional[StudentMetrics]:
    """The serving replica's metrics (None until its constructor has set them, or outside a replica)."""
    try:
        replica = serve.get_replica_context().servable_object
    except RayServeException:  # `api` run in process, e.g. under TestClient: nothing to record into
        return None
    return getattr(replica, "metrics", None)


api = install_error_handlers(FastAPI(title="distill-ray student", docs_url=None, redoc_url=None, openapi_url=None))
api.add_middleware(RequestMetricsMiddleware, metrics_of=replica_metrics)
Credentials = Optional[HTTPAuthorizationCredentials]


@serve.deployment(name="StudentDeployment")
@serve.ingress(api)
class StudentDeployment:
    """One replica: a loaded student behind FastAPI routes; single inputs are batched across requests."""

    def __init__(self, student_dir: str, serve_config: Optional[dict[str, Any]] = None,
                 api_key_sha256: Optional[str] = None):
        cfg = serve_config_from_dict(serve_config or {})
        self.service = StudentService.load(student_dir, cfg, api_key_sha256)
        predictor = self.service.predictor
        self.metrics = StudentMetrics(model_version_of(predictor.card, predictor.model_id))
        # @serve.batch takes its limits at decoration time; the configured ones are set per replica here.
        self.batched_probabilities.set_max_batch_size(cfg.max_batch_size)
        self.batched_probabilities.set_batch_wait_timeout_s(batch_wait_timeout_s(cfg))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def batched_probabilities(self, inputs: list[Any]) -> list[Any]:
        # In a thread so the event loop keeps accepting (and queueing) requests while torch runs.
        return await asyncio.to_thread(self.recorded_probabilities, inputs)

    def recorded_probabilities(self, inputs: list[Any]) -> list[Any]:
        rows = self.service.batch_probabilities(inputs)
        self.metrics.record_batch(len(rows))
        self.metrics.record_predictions(rows, self.service.predictor.class_names)
        return rows

    @api.post("/predict")
    async def predict(self, request: Request, credentials: Credentials = Depends(bearer_scheme)) -> JSONResponse:
        self.service.check_credentials(credentials)
        parsed = self.service.parse(await request.body())
        rows = await asyncio.gather(*(self.batched_probabilities(x) for x in parsed.inputs))
        return JSONResponse(self.service.respond(rows, parsed.top_k))

    @api.post("/generate")
    async def generate(self, request: Request, credentials: Credentials = Depends(bearer_scheme)) -> JSONResponse:
        # Causal-LM students only; generation runs per request (its own batch of prompts), in a thread.
        self.service.check_credentials(credentials)
        parsed = self.service.parse_generate(await request.body())
        return JSONResponse(await asyncio.to_thread(self.service.generate, parsed))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse(self.service.health())

    @api.get("/model")
    async def model(self, credentials: Credentials = Depends(bearer_scheme)) -> JSONResponse:
        self.service.check_credentials(credentials)
        return JSONResponse(self.service.model_card())


def build_student_app(student_dir: str | Path, cfg: Optional[ServeConfig] = None,
                      api_key_sha256: Optional[str] = None) -> Application:
    """The bound application for a student directory and a ServeConfig."""
    cfg = cfg or ServeConfig()
    return StudentDeployment.options(**deployment_options(cfg)).bind(
        str(student_dir), dataclasses.asdict(cfg), api_key_sha256)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: ``serve run serve.app:build_app student_dir=RUN_DIR [max_batch_size=8 ...]``.

    Args: student_dir (or run_dir/path), optional config (experiment YAML whose serve section is the
    base) and ServeConfig fields but host/port. ``DISTILL_RAY_API_KEY`` is read here, in the process
    that builds the app, and only its sha256 is handed to the replicas.
    """
    student_dir, cfg = settings_from_app_args(args)
    return build_student_app(student_dir, cfg, api_key_sha256=env_api_key_digest())
