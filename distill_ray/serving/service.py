"""What one Serve replica does per request, minus Ray and HTTP: auth, validation, answers.

``StudentService`` holds a loaded predictor (classifier or causal LM), the request limits and the
API-key check; ``distill_ray.serving.app`` puts it behind FastAPI routes and dynamic batching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from fastapi.security import HTTPAuthorizationCredentials

from distill_ray.config import ServeConfig
from distill_ray.serving.auth import ApiKeyCheck, bearer_credentials
from distill_ray.serving.model import (
    GeneratorPredictor,
    StudentPredictor,
    format_predictions,
    is_causal_lm,
    load_student_model,
    resolve_student_dir,
)
from distill_ray.serving.schemas import (
    GenerateRequest,
    PredictRequest,
    RequestError,
    RequestLimits,
    parse_generate_request,
    parse_predict_request,
)


class StudentService:
    """Auth, validation and answers for one replica. /healthz stays open (liveness probes carry no
    key and it reveals nothing but the model id); /predict, /generate and /model need the key when
    one is set."""

    def __init__(self, predictor: StudentPredictor | GeneratorPredictor, limits: RequestLimits,
                 api_key_sha256: str | None = None):
        self.predictor = predictor
        self.limits = limits
        self.api_key = ApiKeyCheck(api_key_sha256)

    @classmethod
    def load(cls, path: str | Path, cfg: ServeConfig, api_key_sha256: str | None = None) -> StudentService:
        student_dir = resolve_student_dir(path)
        model, spec = load_student_model(student_dir)
        predictor = GeneratorPredictor(student_dir, model, spec) if is_causal_lm(model) \
            else StudentPredictor(student_dir, quantize=cfg.quantize, loaded=(model, spec))
        return cls(predictor, RequestLimits.from_serve_config(cfg), api_key_sha256)

    # -- auth

    @property
    def auth_required(self) -> bool:
        return self.api_key.required

    def check_credentials(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 unless auth is off or ``credentials`` (from ``serving.auth.bearer_scheme``) hold the key."""
        self.api_key.check(credentials)

    def authorize(self, authorization: str | None) -> None:
        """The same check on a raw ``Authorization`` header value (``Bearer <key>``)."""
        self.api_key.check(bearer_credentials(authorization))

    # -- classifiers: POST /predict

    def parse(self, body: bytes) -> PredictRequest:
        if self.generates:
            raise RequestError(422, "this student is a causal LM: use POST /generate "
                                    "({\"inputs\": [prompt, ...], \"max_new_tokens\": n, \"temperature\": t})")
        return parse_predict_request(body, self.predictor.schema, self.limits)

    def batch_probabilities(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """One row of probabilities per input: what the batched call of the deployment returns."""
        return list(self.predictor.probabilities(list(inputs)))

    def respond(self, rows: Sequence[torch.Tensor], top_k: int | None = None) -> dict[str, Any]:
        probs = torch.stack(list(rows))
        bad = (~torch.isfinite(probs).all(dim=-1)).nonzero().flatten().tolist()
        if bad:  # JSON has no NaN; an input far outside the training range can overflow the logits
            raise RequestError(422, f"inputs[{bad[0]}] drives the model to non-finite outputs; send inputs "
                                    "in the range the model was trained on")
        return format_predictions(probs, self.predictor.class_names, self.predictor.model_id, top_k)

    # -- causal LMs: POST /generate

    @property
    def generates(self) -> bool:
        return isinstance(self.predictor, GeneratorPredictor)

    def parse_generate(self, body: bytes) -> GenerateRequest:
        if not self.generates:
            raise RequestError(422, "this student is a classifier: POST /generate is for causal-LM students; "
                                    "use POST /predict")
        return parse_generate_request(body, self.limits)

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        return self.predictor.generate(request)

    # -- open routes

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.predictor.model_id}

    def model_card(self) -> dict[str, Any]:
        return self.predictor.card
