"""Prometheus metrics of the served student: request count, latency, errors, batch size and what it
predicts (class mix and top-1 confidence, to see drift), exported through Ray's metrics agent.

Why Ray's metrics and not a ``prometheus_client`` server of our own: every Serve replica is its own
process, and Ray's agent already gathers each process's metrics on one port per node
(``metrics_export_port``) beside Serve's own series. The names below are the contract that
dashboards, alert rules and other code build on; Ray's agent exports every application metric with
the prefix ``ray_`` (``EXPORT_PREFIX``), so Prometheus sees ``ray_distill_student_requests_total``.

Importing this module needs neither Ray nor torch: ``StudentMetrics`` imports ``ray.serve.metrics``
when a replica builds it, and the pure helpers (``top1_tallies``, ``route_of``) are tested on
their own. The ``model_version`` tag is ``canary.version_label``, the name in ``X-Model-Version``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

if TYPE_CHECKING:
    import torch

REQUESTS = "distill_student_requests_total"
"""Counter: every answered HTTP request; tags route, status (the HTTP code as a string), model_version."""
REQUEST_LATENCY_MS = "distill_student_request_latency_ms"
"""Histogram: time from the request reaching the replica's app to its answer, ms; tags route, model_version."""
ERRORS = "distill_student_errors_total"
"""Counter: every non-2xx answer (4xx validation and auth, 5xx); tags route, status, model_version."""
BATCH_SIZE = "distill_student_batch_size"
"""Histogram: inputs per ``@serve.batch`` call of /predict; tag model_version."""
PREDICTIONS = "distill_student_predictions_total"
"""Counter: inputs by top-1 predicted class (its name); tags predicted_class, model_version."""
CONFIDENCE = "distill_student_confidence"
"""Histogram: top-1 probability of each input; tag model_version."""

METRIC_NAMES = (REQUESTS, REQUEST_LATENCY_MS, ERRORS, BATCH_SIZE, PREDICTIONS, CONFIDENCE)
HISTOGRAMS = (REQUEST_LATENCY_MS, BATCH_SIZE, CONFIDENCE)

EXPORT_PREFIX = "ray_"
"""What Ray's metrics agent puts before every application metric's name in its Prometheus export."""

# Ray 2.60's agent receives each process's histogram as bucket counts and rebuilds it by recording every
# count at its bucket's midpoint (the +Inf bucket's is twice the last bound), so an exported ``_sum`` is
# exact only where each bucket holds a single value, and otherwise as good as the buckets are fine.
LATENCY_BOUNDARIES_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
# One bucket per size up to 32 (midpoint = the size), then one per power of two: the sum of batch
# sizes, and so the mean batch size, are exact up to 32 and for full batches of 64, 128, 256, 512.
BATCH_SIZE_BOUNDARIES = (*(k + 0.5 for k in range(33)), 63.5, 64.5, 127.5, 128.5, 255.5, 256.5, 511.5, 512.5)
# Top-1 probabilities lie in (0, 1]: the last bound is 1 (nothing reaches the +Inf bucket, whose midpoint
# would be 2), 0.05 wide up to 0.9 and finer above, where a confident student's mass sits, so the mean
# confidence (sum / count) is within 0.025 of the true mean below 0.9 and within 0.01 above.
CONFIDENCE_BOUNDARIES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8,
                         0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 0.995, 0.999, 1.0)

OTHER_ROUTE = "other"
"""The route tag of a request that matched no route (404): raw paths would make a series per URL sent."""


def exported_names() -> dict[str, list[str]]:
    """Each metric's name and the series names Prometheus scrapes for it (``_bucket``/``_sum``/``_count``
    for histograms), as a dashboard's PromQL must spell them."""
    names = {}
    for name in METRIC_NAMES:
        base = EXPORT_PREFIX + name
        names[name] = [f"{base}_{part}" for part in ("bucket", "sum", "count")] if name in HISTOGRAMS else [base]
    return names


def route_of(scope: Mapping[str, Any]) -> str:
    """The route tag of an answered ASGI request: the path template of the route it matched (Starlette
    sets ``scope["route"]`` when it routes), ``OTHER_ROUTE`` when none matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or OTHER_ROUTE


def top1_tallies(probs: torch.Tensor | Sequence[torch.Tensor],
                 class_names: Sequence[str]) -> tuple[dict[str, int], list[float]]:
    """Inputs per top-1 class name and each input's top-1 probability, for a batch of probabilities
    (a ``[batch, classes]`` tensor or its rows). Rows with a non-finite top-1 are left out: the
    request that holds them is answered 422, and NaN would poison the confidence sum."""
    import torch

    if not isinstance(probs, torch.Tensor):
        probs = torch.stack(list(probs))
    confidence, predicted = probs.max(dim=-1)
    finite = torch.isfinite(confidence)
    if not bool(finite.all()):
        confidence, predicted = confidence[finite], predicted[finite]
    counts = torch.bincount(predicted, minlength=len(class_names)).tolist()
    by_class = {class_names[i]: n for i, n in enumerate(counts) if n}
    return by_class, confidence.tolist()


class _Recorders:
    """The six Ray metrics of one process. Ray keeps one instrument per name per process, so every
    ``StudentMetrics`` in a replica (one per model version) shares these and tags its own version."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(REQUESTS, "HTTP requests answered by the student deployment.",
                                tag_keys=("route", "status", "model_version"))
        self.latency = Histogram(REQUEST_LATENCY_MS, "Request latency in the replica, ms.",
                                 boundaries=list(LATENCY_BOUNDARIES_MS), tag_keys=("route", "model_version"))
        self.errors = Counter(ERRORS, "Non-2xx answers of the student deployment.",
                              tag_keys=("route", "status", "model_version"))
        self.batch_size = Histogram(BATCH_SIZE, "Inputs per batched forward pass.",
                                    boundaries=list(BATCH_SIZE_BOUNDARIES), tag_keys=("model_version",))
        self.predictions = Counter(PREDICTIONS, "Inputs by top-1 predicted class.",
                                   tag_keys=("predicted_class", "model_version"))
        self.confidence = Histogram(CONFIDENCE, "Top-1 probability per input.",
                                    boundaries=list(CONFIDENCE_BOUNDARIES), tag_keys=("model_version",))


_recorders: Optional[_Recorders] = None


def _process_recorders() -> _Recorders:
    global _recorders
    if _recorders is None:
        _recorders = _Recorders()
    return _recorders


class StudentMetrics:
    """Records one model version's requests, batches and predictions. Build it in the replica (Ray
    metrics are recorded by the process that owns them), e.g. ``StudentMetrics("v3")``.

    Tag dicts are built once per (route, status) and reused, so a request costs a dict lookup and
    the Ray calls; predictions are recorded once per batch, one counter call per predicted class."""

    def __init__(self, model_version: str):
        self.model_version = model_version
        self._recorders = _process_recorders()
        self._version_tags = {"model_version": model_version}
        self._request_tags: dict[tuple[str, int], tuple[dict[str, str], dict[str, str]]] = {}
        self._class_tags: dict[str, dict[str, str]] = {}

    def record_request(self, route: str, status: int, latency_s: float) -> None:
        """One answered request: counted by route and status (and as an error unless 2xx), timed."""
        tags = self._request_tags.get((route, status))
        if tags is None:
            tags = self._request_tags[(route, status)] = (
                {"route": route, "status": str(status), "model_version": self.model_version},
                {"route": route, "model_version": self.model_version})
        status_tags, route_tags = tags
        recorders = self._recorders
        recorders.requests.inc(1, status_tags)
        recorders.latency.observe(latency_s * 1000.0, route_tags)
        if not 200 <= status < 300:
            recorders.errors.inc(1, status_tags)

    def record_batch(self, size: int) -> None:
        """One batched forward pass of ``size`` inputs."""
        self._recorders.batch_size.observe(size, self._version_tags)

    def record_predictions(self, probs: torch.Tensor | Sequence[torch.Tensor], class_names: Sequence[str]) -> None:
        """A batch's predicted-class mix and top-1 confidences (see ``top1_tallies``)."""
        by_class, confidences = top1_tallies(probs, class_names)
        recorders = self._recorders
        for name, count in by_class.items():
            tags = self._class_tags.get(name)
            if tags is None:
                tags = self._class_tags[name] = {"predicted_class": name, "model_version": self.model_version}
            recorders.predictions.inc(count, tags)
        for confidence in confidences:
            recorders.confidence.observe(confidence, self._version_tags)


VERSION_HEADER_BYTES = b"x-model-version"
"""The answer header naming the student that answered (``canary.VERSION_HEADER``, as ASGI sends it)."""


class _StatusOf:
    """Passes an ASGI app's messages on and keeps the status of its answer (500 until one starts:
    an exception that escapes the app becomes Starlette's 500) and the version that answered (None
    when no student did: a 401, a parse error before the pick, /healthz)."""

    __slots__ = ("send", "status", "version")

    def __init__(self, send: Callable):
        self.send = send
        self.status = 500
        self.version: Optional[str] = None

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                if name == VERSION_HEADER_BYTES:
                    self.version = value.decode("latin-1")
        await self.send(message)


class RequestMetricsMiddleware:
    """ASGI middleware that times every HTTP request and records its route and final status, after
    the app's exception handlers have turned errors into answers (``api.add_middleware`` puts it
    outside them). ``metrics_of(version)`` gives the replica's ``StudentMetrics`` for the version that
    answered (its ``X-Model-Version``; None: the champion's), or None to record nothing.
    Plain ASGI rather than ``BaseHTTPMiddleware``: no extra task and stream per request."""

    def __init__(self, app: Callable, metrics_of: Callable[[Optional[str]], Optional[StudentMetrics]]):
        self.app = app
        self.metrics_of = metrics_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer = _StatusOf(send)
        try:
            await self.app(scope, receive, answer)
        finally:
            metrics = self.metrics_of(answer.version)
            if metrics is not None:
                metrics.record_request(route_of(scope), answer.status, time.perf_counter() - started)
