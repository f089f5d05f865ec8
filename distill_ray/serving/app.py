"""The Ray Serve deployment of a distilled student: ``POST /predict``, ``POST /generate``,
``GET /healthz``, ``GET /model`` behind a FastAPI ingress, with dynamic batching.

Thin on purpose: auth, validation, inference and answer formatting live in ``StudentService``
(``distill_ray.serving.service``); this module adds HTTP, Ray Serve and batching. Importing it defines
the app and the deployment and does nothing else (no model loading, no Ray calls).

- ``start_serve`` (``distill-ray serve RUN_DIR``) binds ``build_student_app``;
- ``serve run serve.app:build_app student_dir=RUN_DIR`` and ``serve run serve/config.yaml`` reach
  ``build_app`` through ``serve/app.py``, which only re-exports it;
- a canary (``distill-ray serve CHAMPION --challenger PATH``) is deployed from ``build_app``'s import
  path, so promote/rollback change only its ``user_config``, which ``reconfigure`` applies in place.

Canary: each replica holds the champion and, with a challenger, the challenger too
(``serving.canary.StudentRouter``), picks one per request from the sticky header or a random draw,
and names it in the ``X-Model-Version`` response header. One ``@serve.batch`` queue serves both: a
batch is split by student (``canary.batch_by_student``).

Errors: every ``RequestError`` a route raises (validation, auth) and every ``RequestValidationError``
FastAPI raises itself become ``{"error": "<what was wrong and what is allowed>", "status": N}``, with
``WWW-Authenticate: Bearer`` on 401s. The bodies are validated by the replica's pydantic models
(``serving.schemas``), built at replica start from its ServeConfig limits and the loaded student's
input shape, which is why a route reads the raw body instead of declaring a static model.

Metrics (``serving.metrics``): ``RequestMetricsMiddleware`` counts and times every answer with its
final status, outside the error handlers so 4xx answers count too; the batched call records batch
size and the predicted-class mix. A replica keeps one ``StudentMetrics`` per version it answers for
(tagged ``model_version``: a canary's champion and challenger apart), which the middleware reaches
through Serve's replica context and the answer's ``X-Model-Version``.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations as real classes.
import asyncio
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
from distill_ray.serving.canary import VERSION_HEADER, LoadedStudent, StudentRouter, TrafficSplit, batch_by_student
from distill_ray.serving.canary import version_label
from distill_ray.serving.metrics import RequestMetricsMiddleware, StudentMetrics
from distill_ray.serving.options import (
    API_KEY_ARG,
    DEPLOYMENT_NAME,
    batch_wait_timeout_s,
    deployment_options,
    replica_settings,
    serve_config_from_dict,
    settings_from_app_args,
    traffic_split,
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


def replica_metrics(version: Optional[str]) -> Optional[StudentMetrics]:
    """The serving replica's metrics for ``version`` (None until its constructor has loaded the
    champion, or outside a replica)."""
    try:
        replica = serve.get_replica_context().servable_object
    except RayServeException:  # `api` run in process, e.g. under TestClient: nothing to record into
        return None
    if replica is None or not hasattr(replica, "router"):
        return None
    return replica.metrics_for(version)


api = install_error_handlers(FastAPI(title="distill-ray student", docs_url=None, redoc_url=None, openapi_url=None))
api.add_middleware(RequestMetricsMiddleware, metrics_of=replica_metrics)
Credentials = Optional[HTTPAuthorizationCredentials]


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class StudentDeployment:
    """One replica: the champion student (and a challenger, with a canary) behind FastAPI routes;
    single inputs are batched across requests."""

    def __init__(self, student_dir: str, serve_config: Optional[dict[str, Any]] = None,
                 api_key_sha256: Optional[str] = None):
        self.cfg = serve_config_from_dict(serve_config or {})
        self.api_key_sha256 = api_key_sha256
        self.metrics_by_version: dict[str, StudentMetrics] = {}
        self.router = StudentRouter.single(self.load_student(student_dir, []))
        # @serve.batch takes its limits at decoration time; the configured ones are set per replica here.
        self.batched_probabilities.set_max_batch_size(self.cfg.max_batch_size)
        self.batched_probabilities.set_batch_wait_timeout_s(batch_wait_timeout_s(self.cfg))

    def load_student(self, path: str, versions_taken: list[str]) -> LoadedStudent:
        service = StudentService.load(path, self.cfg, self.api_key_sha256)
        version = version_label(service.model_card(), service.predictor.model_id, versions_taken)
        return LoadedStudent(str(service.predictor.student_dir), service, version)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new traffic split (Serve's in-place update): new students load in a thread while the
        current router keeps answering, then the router is swapped in one assignment."""
        split = TrafficSplit.from_user_config(user_config)
        self.router = await asyncio.to_thread(self.router.rerouted, split, self.load_student)

    @property
    def service(self) -> StudentService:
        """The champion's service: /healthz, /model and auth answer for it."""
        return self.router.champion.service

    def pick(self, request: Request) -> LoadedStudent:
        router = self.router
        return router.pick(request.headers.get(router.sticky_header))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def batched_probabilities(self, items: list[tuple[LoadedStudent, Any]]) -> list[Any]:
        # In a thread so the event loop keeps accepting (and queueing) requests while torch runs.
        return await asyncio.to_thread(self.recorded_probabilities, items)

    def recorded_probabilities(self, items: list[tuple[LoadedStudent, Any]]) -> list[Any]:
        return batch_by_student(items, on_group=self.record_group)

    def record_group(self, student: LoadedStudent, rows: list[Any]) -> None:
        """One batch-size and class-mix record per version in a batch."""
        metrics = self.metrics_for(student.version)
        metrics.record_batch(len(rows))
        metrics.record_predictions(rows, student.service.predictor.class_names)

    def metrics_for(self, version: Optional[str]) -> StudentMetrics:
        """The metrics tagged with ``version`` (None: the champion's), made on first use: one per version
        this replica has answered for, so a promote or rollback keeps each version's series apart."""
        version = version or self.router.champion.version
        if version not in self.metrics_by_version:
            self.metrics_by_version[version] = StudentMetrics(version)
        return self.metrics_by_version[version]

    @api.post("/predict")
    async def predict(self, request: Request, credentials: Credentials = Depends(bearer_scheme)) -> JSONResponse:
        student = self.pick(request)
        student.service.check_credentials(credentials)
        parsed = student.service.parse(await request.body())
        rows = await asyncio.gather(*(self.batched_probabilities((student, x)) for x in parsed.inputs))
        return JSONResponse(student.service.respond(rows, parsed.top_k), headers={VERSION_HEADER: student.version})

    @api.post("/generate")
    async def generate(self, request: Request, credentials: Credentials = Depends(bearer_scheme)) -> JSONResponse:
        # Causal-LM students only; generation runs per request (its own batch of prompts), in a thread.
        student = self.pick(request)
        student.service.check_credentials(credentials)
        parsed = student.service.parse_generate(await request.body())
        return JSONResponse(await asyncio.to_thread(student.service.generate, parsed),
                            headers={VERSION_HEADER: student.version})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse(self.service.health())

    @api.get("/model")
    async def model(self, credentials: Credentials = Depends(bearer_scheme)) -> JSONResponse:
        self.service.check_credentials(credentials)
        return JSONResponse(self.service.model_card())


def build_student_app(student_dir: str | Path, cfg: Optional[ServeConfig] = None,
                      api_key_sha256: Optional[str] = None) -> Application:
    """The bound application for a student directory and a ServeConfig. With ``cfg.challenger`` the
    split between the two is the deployment's ``user_config`` (``options.traffic_split``)."""
    cfg = cfg or ServeConfig()
    split = traffic_split(student_dir, cfg)
    options = deployment_options(cfg) | ({"user_config": split.to_user_config()} if split else {})
    return StudentDeployment.options(**options).bind(str(student_dir), replica_settings(cfg), api_key_sha256)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: ``serve run serve.app:build_app student_dir=RUN_DIR [max_batch_size=8 ...]``.

    Args: student_dir (or run_dir/path), optional config (experiment YAML whose serve section is the
    base) and ServeConfig fields but host/port (``challenger`` and ``challenger_fraction`` make it a
    canary). ``DISTILL_RAY_API_KEY`` is read here, in the process that builds the app, and only its
    sha256 is handed to the replicas; an app built on the cluster (a canary from ``start_serve``) gets
    that sha256 as the ``api_key_sha256`` arg instead.
    """
    args = dict(args)
    digest = args.pop(API_KEY_ARG, None) or env_api_key_digest()
    student_dir, cfg = settings_from_app_args(args)
    return build_student_app(student_dir, cfg, api_key_sha256=digest)
