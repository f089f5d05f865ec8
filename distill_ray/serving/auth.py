"""Bearer-key auth for the student's routes: FastAPI's ``HTTPBearer`` reads the header, the key is
compared by its sha256 in constant time.

The key is read from ``DISTILL_RAY_API_KEY`` in the process that builds the app; replicas get only
its sha256 (``api_key_digest``), so the key itself never sits in Serve's stored config.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from distill_ray.serving.schemas import RequestError

API_KEY_ENV = "DISTILL_RAY_API_KEY"
"""When set, every route but /healthz needs ``Authorization: Bearer <key>``."""

bearer_scheme = HTTPBearer(auto_error=False, description=f"the key in {API_KEY_ENV} when the server started")
"""The FastAPI dependency of the guarded routes: the credentials of an ``Authorization: Bearer ...``
header, or None for a missing header or another scheme (the route answers 401 itself, with the reason)."""


def api_key_digest(key: str) -> str:
    """sha256 of the key: replicas keep and compare only this, so the key itself never leaves the
    process that read it from the environment (it would otherwise sit in Serve's stored config)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def env_api_key_digest() -> str | None:
    """Digest of ``DISTILL_RAY_API_KEY`` in this process, or None when it is unset or empty."""
    key = os.environ.get(API_KEY_ENV, "")
    return api_key_digest(key) if key else None


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """What ``bearer_scheme`` makes of an ``Authorization`` header value, for callers without a request."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not (scheme and token) or scheme.lower() != "bearer":
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


class ApiKeyCheck:
    """Whether a request may pass: always when no key is configured, else only with the right bearer key."""

    def __init__(self, api_key_sha256: str | None = None):
        # The replica's own environment counts too (runtime_env env_vars), so auth can only be added, never lost.
        self.key_digest = api_key_sha256 or env_api_key_digest()

    @property
    def required(self) -> bool:
        return self.key_digest is not None

    def check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 unless auth is off or ``credentials`` carry the configured key."""
        if self.key_digest is None:
            return
        if credentials is None or not credentials.credentials.strip():
            raise RequestError(401, f"missing or malformed Authorization header; send 'Authorization: Bearer <key>' "
                                    f"with the key the server was started with ({API_KEY_ENV})")
        if not hmac.compare_digest(api_key_digest(credentials.credentials.strip()), self.key_digest):
            raise RequestError(401, "invalid API key in the Authorization header")
