"""Ray Serve deployment of a distilled student: ``POST /predict``, ``GET /healthz``, ``GET /model``.

Thin on purpose: auth, validation, inference and answer formatting live in ``distill_ray.serving``
(``StudentService``); this module adds HTTP (a FastAPI ingress), Ray Serve, and dynamic batching.

Run it with ``distill-ray serve RUN_DIR`` (``distill_ray.serving.start_serve``),
``serve run serve.app:build_app student_dir=RUN_DIR`` or ``serve run serve/config.yaml``
from the repository root. See serve/README.md.
"""

# No `from __future__ import annotations`: FastAPI resolves string annotations through a route's
# globals, which by-value pickling trims to the names its code uses, so `request: Request` must be a real class.
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

import ray.cloudpickle
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from distill_ray import serving
from distill_ray.config import ServeConfig

# Replicas get this module's classes by value, so they need not import `serve.app` (serve/ is not an
# installed package: a replica's sys.path need not hold the repository root).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

api = FastAPI(title="distill-ray student", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(err: serving.RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@serve.deployment(name="StudentDeployment")
@serve.ingress(api)
class StudentDeployment:
    """One replica: a loaded student behind FastAPI routes; single inputs are batched across requests."""

    def __init__(self, student_dir: str, serve_config: dict[str, Any] | None = None,
                 api_key_sha256: str | None = None):
        cfg = serving.serve_config_from_dict(serve_config or {})
        self.service = serving.StudentService.load(student_dir, cfg, api_key_sha256)
        # @serve.batch takes its limits at decoration time; the configured ones are set per replica here.
        self.batched_probabilities.set_max_batch_size(cfg.max_batch_size)
        self.batched_probabilities.set_batch_wait_timeout_s(serving.batch_wait_timeout_s(cfg))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def batched_probabilities(self, inputs: list[Any]) -> list[Any]:
        # In a thread so the event loop keeps accepting (and queueing) requests while torch runs.
        return await asyncio.to_thread(self.service.batch_probabilities, inputs)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        # The raw body, not a pydantic model: validation decides every 4xx and its message.
        try:
            self.service.authorize(request.headers.get("authorization"))
            parsed = self.service.parse(await request.body())
            rows = await asyncio.gather(*(self.batched_probabilities(x) for x in parsed.inputs))
            return JSONResponse(self.service.respond(rows, parsed.top_k))
        except serving.RequestError as err:
            return error_response(err)

    @api.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        # Causal-LM students only; generation runs per request (its own batch of prompts), in a thread.
        try:
            self.service.authorize(request.headers.get("authorization"))
            parsed = self.service.parse_generate(await request.body())
            return JSONResponse(await asyncio.to_thread(self.service.generate, parsed))
        except serving.RequestError as err:
            return error_response(err)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse(self.service.health())

    @api.get("/model")
    async def model(self, request: Request) -> JSONResponse:
        try:
            self.service.authorize(request.headers.get("authorization"))
        except serving.RequestError as err:
            return error_response(err)
        return JSONResponse(self.service.model_card())


def build_student_app(student_dir: str | Path, cfg: ServeConfig | None = None,
                      api_key_sha256: str | None = None) -> Application:
    """The bound application for a student directory and a ServeConfig."""
    cfg = cfg or ServeConfig()
    return StudentDeployment.options(**serving.deployment_options(cfg)).bind(
        str(student_dir), dataclasses.asdict(cfg), api_key_sha256)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: ``serve run serve.app:build_app student_dir=RUN_DIR [max_batch_size=8 ...]``.

    Args: student_dir (or run_dir/path), optional config (experiment YAML whose serve section is the
    base) and ServeConfig fields but host/port. ``DISTILL_RAY_API_KEY`` is read here, in the process
    that builds the app, and only its sha256 is handed to the replicas.
    """
    student_dir, cfg = serving.settings_from_app_args(args)
    return build_student_app(student_dir, cfg, api_key_sha256=serving.env_api_key_digest())
