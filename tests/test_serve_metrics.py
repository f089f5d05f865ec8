"""The student's Prometheus metrics: the pure pieces (class tallies, version tag, route tag, the ASGI
middleware behind FastAPI's error handlers), the dashboard and alert rules against the names the code
defines, and one real deployment whose scrape from Ray's metrics agent holds the counts it was sent."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from distill_ray.serving import metrics as student_metrics
from distill_ray.serving.metrics import (
    BATCH_SIZE,
    BATCH_SIZE_BOUNDARIES,
    CONFIDENCE,
    CONFIDENCE_BOUNDARIES,
    ERRORS,
    EXPORT_PREFIX,
    METRIC_NAMES,
    OTHER_ROUTE,
    PREDICTIONS,
    REQUEST_LATENCY_MS,
    REQUESTS,
    RequestMetricsMiddleware,
    StudentMetrics,
    exported_names,
    route_of,
    top1_tallies,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "owl"]


# -- pure pieces

def test_top1_tallies_count_inputs_by_class_name_and_keep_each_top1_probability():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.05, 0.05, 0.9], [0.2, 0.5, 0.3]])
    by_class, confidences = top1_tallies(probs, CLASSES)
    assert by_class == {"cat": 1, "owl": 2, "dog": 1}
    assert confidences == pytest.approx([0.7, 0.6, 0.9, 0.5])
    # the rows of a batch (what the batched call returns) give the same
    assert top1_tallies(list(probs), CLASSES) == (by_class, confidences)


def test_top1_tallies_leave_out_non_finite_rows_and_unpredicted_classes():
    probs = torch.tensor([[0.8, 0.1, 0.1], [float("nan")] * 3, [0.3, 0.6, 0.1]])
    by_class, confidences = top1_tallies(probs, CLASSES)
    assert by_class == {"cat": 1, "dog": 1}  # no "owl": 0 series
    assert confidences == pytest.approx([0.8, 0.6])


def test_model_version_is_the_card_version_else_the_model_id():
    from distill_ray.serving.canary import version_label as model_version_of  # the tag the replica uses

    assert model_version_of({"name": "q", "version": "v3"}, "q@v3") == "v3"
    assert model_version_of({"name": "q", "version": 4}, "q@4") == "4"
    assert model_version_of({"name": "q"}, "q@unversioned") == "q@unversioned"
    assert model_version_of({"name": "q", "version": "unversioned"}, "q@unversioned") == "q@unversioned"


def test_exported_names_carry_rays_prefix_and_the_histogram_series():
    names = exported_names()
    assert set(names) == set(METRIC_NAMES)
    assert names[REQUESTS] == ["ray_distill_student_requests_total"]
    assert names[CONFIDENCE] == ["ray_distill_student_confidence_bucket", "ray_distill_student_confidence_sum",
                                 "ray_distill_student_confidence_count"]


class FakeRecorder:
    def __init__(self):
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value=1.0, tags=None):
        self.calls.append((value, dict(tags)))

    observe = inc


class FakeRecorders:
    def __init__(self):
        for name in ("requests", "latency", "errors", "batch_size", "predictions", "confidence"):
            setattr(self, name, FakeRecorder())


@pytest.fixture
def fake_recorders(monkeypatch):
    recorders = FakeRecorders()
    monkeypatch.setattr(student_metrics, "_process_recorders", lambda: recorders)
    return recorders


def test_student_metrics_count_every_answer_and_every_non_2xx_as_an_error(fake_recorders):
    metrics = StudentMetrics("v2")
    for route, status in [("/predict", 200), ("/predict", 200), ("/predict", 422), ("/model", 401),
                          ("/predict", 500)]:
        metrics.record_request(route, status, 0.004)
    assert [tags["status"] for _, tags in fake_recorders.requests.calls] == ["200", "200", "422", "401", "500"]
    assert [(tags["route"], tags["status"]) for _, tags in fake_recorders.errors.calls] == [
        ("/predict", "422"), ("/model", "401"), ("/predict", "500")]
    assert {tags["model_version"] for _, tags in fake_recorders.requests.calls} == {"v2"}
    assert fake_recorders.latency.calls[0] == (pytest.approx(4.0), {"route": "/predict", "model_version": "v2"})


def test_student_metrics_record_a_batch_once_and_its_predictions_per_class(fake_recorders):
    metrics = StudentMetrics("v2")
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    metrics.record_batch(3)
    metrics.record_predictions(probs, CLASSES)
    assert fake_recorders.batch_size.calls == [(3, {"model_version": "v2"})]
    assert sorted(fake_recorders.predictions.calls, key=lambda c: c[1]["predicted_class"]) == [
        (2, {"predicted_class": "cat", "model_version": "v2"}), (1, {"predicted_class": "owl", "model_version": "v2"})]
    assert [v for v, _ in fake_recorders.confidence.calls] == pytest.approx([0.7, 0.6, 0.8])


def test_the_middleware_sees_the_final_status_of_handled_errors_and_unmatched_paths(fake_recorders):
    """Behind an exception handler, as serving.app's are: a RequestError's 4xx, a route's 200, an
    unknown path's 404 (route tag "other") and an escaping exception's 500 are each recorded once, for
    the version the answer names in X-Model-Version (None when no student answered). (serving.app itself imports Ray Serve; the deployment's own answers are scraped below.)"""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from distill_ray.serving.schemas import RequestError

    async def on_request_error(request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    metrics = StudentMetrics("v9")
    api = FastAPI()
    api.add_exception_handler(RequestError, on_request_error)
    asked_for: list = []
    api.add_middleware(RequestMetricsMiddleware, metrics_of=lambda version: asked_for.append(version) or metrics)

    @api.post("/predict/{kind}")
    async def predict(kind: str):
        if kind == "bad":
            raise RequestError(422, "bad input")
        if kind == "boom":
            raise RuntimeError("boom")
        return JSONResponse({"ok": True}, headers={"X-Model-Version": "v9"})

    client = TestClient(api, raise_server_exceptions=False)
    assert client.post("/predict/good").status_code == 200
    assert client.post("/predict/bad").status_code == 422
    assert client.post("/predict/boom").status_code == 500
    assert client.get("/nowhere").status_code == 404
    assert [(t["route"], t["status"]) for _, t in fake_recorders.requests.calls] == [
        ("/predict/{kind}", "200"), ("/predict/{kind}", "422"), ("/predict/{kind}", "500"), (OTHER_ROUTE, "404")]
    assert len(fake_recorders.errors.calls) == 3
    assert len(fake_recorders.latency.calls) == 4
    assert asked_for == ["v9", None, None, None]


def test_route_of_reads_the_matched_route_template():
    class Route:
        path = "/predict"

    assert route_of({"route": Route()}) == "/predict"
    assert route_of({}) == OTHER_ROUTE


def test_the_metrics_port_is_a_serve_key_and_a_flag_but_not_an_app_arg(monkeypatch, tmp_path, capsys):
    """``distill-ray serve --metrics-port`` reaches start_serve's ServeConfig (checked like the key);
    ``serve run`` refuses it as an app arg: the port belongs to the Ray it joins."""
    from distill_ray import cli
    from distill_ray.config import ServeConfig
    from distill_ray.serving import launch
    from distill_ray.serving.options import settings_from_app_args

    assert ServeConfig().metrics_port == 8081
    started = []
    monkeypatch.setattr(launch, "start_serve", lambda path, **kw: started.append(kw["serve_config"]))
    assert cli.main(["serve", str(tmp_path), "--metrics-port", "9464", "--quantize", "int8"]) == 0
    assert (started[0].metrics_port, started[0].quantize) == (9464, "int8")
    assert cli.main(["serve", str(tmp_path), "--metrics-port", "70000"]) == 2
    assert "serve.metrics_port: 70000 is out of range" in capsys.readouterr().err
    (tmp_path / "distill_spec.json").write_text("{}")  # a student directory, as far as the args check looks
    with pytest.raises(ValueError, match="unknown app argument.*metrics_port.*ray start --metrics-export-port"):
        settings_from_app_args({"student_dir": str(tmp_path), "metrics_port": 9464})


def test_a_taken_port_is_seen_as_rays_metrics_agent_would_bind_it():
    """start_serve names a taken metrics port when Ray fails to start (Ray 2.60 names none)."""
    from distill_ray.serving.launch import port_in_use

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # one interface: binding all of them conflicts too
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)


# -- the dashboard and the alert rules cannot drift from the code

PANEL_TITLES = {"Latency p50 / p95 / p99 (ms)", "QPS", "Error rate", "Batch size", "Predicted class mix",
                "Mean confidence"}
SERIES = {series for names in exported_names().values() for series in names}
# Grafana's interval variables stand where PromQL wants a duration; Prometheus never sees them.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, read from its syntax tree (promql-parser, a dev
    dependency): parsing fails on anything Prometheus would refuse."""
    import promql_parser

    names: set[str] = set()

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(GRAFANA_DURATIONS.sub("5m", expr)), visit)
    return names


def dashboard() -> dict:
    return json.loads((REPO / "serve/grafana.json").read_text())


def test_the_dashboard_is_an_importable_grafana_dashboard_with_the_panels_named():
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["title"] and board["uid"]
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    titles = [p["title"] for p in board["panels"]]
    assert set(titles) == PANEL_TITLES and len(titles) == len(PANEL_TITLES)
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        for target in panel["targets"]:
            assert "model_version" in target["expr"], (panel["title"], target["expr"])
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)


def test_every_dashboard_expr_uses_series_the_code_exports():
    board = dashboard()
    used = set()
    for panel in board["panels"]:
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert names <= SERIES, f"{panel['title']}: {sorted(names - SERIES)} are not exported by serving/metrics.py"
            used |= names
    for variable in board["templating"]["list"]:  # Grafana's label_values(metric, label), not PromQL
        metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"]).groups()
        assert metric in SERIES and label == variable["name"], variable["query"]
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in board["panels"]}
    assert "histogram_quantile(0.99" in by_title["Latency p50 / p95 / p99 (ms)"]
    assert EXPORT_PREFIX + REQUEST_LATENCY_MS + "_bucket" in by_title["Latency p50 / p95 / p99 (ms)"]
    assert EXPORT_PREFIX + ERRORS in by_title["Error rate"]
    assert EXPORT_PREFIX + BATCH_SIZE + "_sum" in by_title["Batch size"]
    assert EXPORT_PREFIX + PREDICTIONS in by_title["Predicted class mix"]
    assert {EXPORT_PREFIX + CONFIDENCE + "_sum", EXPORT_PREFIX + CONFIDENCE + "_count"} <= promql_metric_names(
        by_title["Mean confidence"])


def test_the_alert_rules_cover_error_rate_and_confidence_drop_with_exported_series():
    rules = yaml.safe_load((REPO / "serve/prometheus_rules.yml").read_text())
    alerts = {r["alert"]: r for group in rules["groups"] for r in group["rules"]}
    assert {"DistillStudentHighErrorRate", "DistillStudentConfidenceDrop"} <= set(alerts)
    for name, rule in alerts.items():
        names = promql_metric_names(rule["expr"])
        assert names and names <= SERIES, (name, sorted(names - SERIES))
        assert rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"], name
        assert "model_version" in rule["expr"], name
    assert EXPORT_PREFIX + ERRORS in alerts["DistillStudentHighErrorRate"]["expr"]
    assert EXPORT_PREFIX + CONFIDENCE + "_sum" in alerts["DistillStudentConfidenceDrop"]["expr"]


# -- one real deployment, scraped

API_KEY = "metrics-key-51c2"
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
VERSION = "metrics-test-v7"  # unique in the session: other serve tests' replicas record under their own
GOOD = 40
BAD = [(b'{"inputs": [[0.0, 1.0', AUTH, 400), (b'{"inputs": []}', AUTH, 422), (b'{"top_k": 1}', AUTH, 422),
       (b'{"inputs": [[0.0]]}', {"Content-Type": "application/json"}, 401),
       (b'{"inputs": [[0.0]]}', {"Authorization": "Bearer wrong", "Content-Type": "application/json"}, 401)]
SCRAPE_DEADLINE_S = 60  # Ray's workers report every metrics_report_interval_ms (10 s by default) to the agent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from distill_ray.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, {"hidden": [16]})
    directory = save_model(model, tmp_path_factory.mktemp("metrics_run") / "student",
                           {"arch": "mlp", "input_shape": [1, 28, 28], "num_classes": 10,
                            "options": {"hidden": [16]}, "task": "classification"})
    card = {"name": "metrics", "version": VERSION, "task": "classification",
            "class_names": [f"class_{i}" for i in range(10)]}
    (directory / "distill_card.json").write_text(json.dumps(card))
    return directory


@pytest.fixture(scope="module")
def served(ray_local, student_dir):
    from ray import serve

    from distill_ray.config import ServeConfig
    from distill_ray.serving import API_KEY_ENV, start_serve

    os.environ[API_KEY_ENV] = API_KEY
    try:
        url = start_serve(student_dir, host="127.0.0.1", port=free_port(), blocking=False,
                          serve_config=ServeConfig(max_batch_size=8, batch_wait_timeout_s=0.02))
    finally:
        del os.environ[API_KEY_ENV]
    yield url
    serve.shutdown()


def totals(text: str, version: str) -> dict[tuple[str, tuple], float]:
    """Sample values summed over replicas, keyed by (sample name, its labels but Ray's per-process ones),
    for the series of one model_version."""
    from prometheus_client.parser import text_string_to_metric_families

    kept = {"route", "status", "predicted_class", "le"}
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_version") != version:
                continue
            key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k in kept)))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def as_exported(value: float, boundaries: tuple[float, ...]) -> float:
    """What Ray 2.60's agent records for ``value``: its bucket's midpoint (the first bucket's lower bound is
    0, the +Inf bucket's midpoint twice the last bound), as OpenTelemetryMetricRecorder computes them."""
    lower = 0.0
    for bound in boundaries:
        if value <= bound:
            return (lower + bound) / 2
        lower = bound
    return 2 * boundaries[-1]


def test_batch_sizes_and_confidences_survive_rays_midpoint_rebuild():
    assert [as_exported(k, BATCH_SIZE_BOUNDARIES) for k in range(1, 33)] == list(range(1, 33))
    assert [as_exported(k, BATCH_SIZE_BOUNDARIES) for k in (64, 128, 256, 512)] == [64, 128, 256, 512]
    assert as_exported(1.0, CONFIDENCE_BOUNDARIES) < 1.0  # nothing lands in the +Inf bucket (midpoint 2)
    grid = [i / 1000 for i in range(1, 1001)]
    assert max(abs(as_exported(c, CONFIDENCE_BOUNDARIES) - c) for c in grid) <= 0.025 + 1e-9
    assert max(abs(as_exported(c, CONFIDENCE_BOUNDARIES) - c) for c in grid if c > 0.9) <= 0.01 + 1e-9


def summed(found: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (sample, lbls), v in found.items() if sample == name and want <= set(lbls))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_prometheus_scrape_finds_the_requests_it_was_sent(ray_local, served, student_dir):
    from distill_ray.serving import StudentPredictor
    from distill_ray.serving.launch import metrics_url

    inputs = torch.rand(GOOD, 784, generator=torch.Generator().manual_seed(1))

    def good(i: int) -> int:
        body = json.dumps({"inputs": [inputs[i].tolist()]}).encode()
        return httpx.post(f"{served}/predict", content=body, headers=AUTH, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:  # concurrent, so batches hold more than one input
        assert list(pool.map(good, range(GOOD))) == [200] * GOOD
    for body, headers, status in BAD:
        assert httpx.post(f"{served}/predict", content=body, headers=headers, timeout=30).status_code == status
    assert httpx.get(f"{served}/no-such-route", timeout=30).status_code == 404

    local = StudentPredictor(student_dir).probabilities(inputs.numpy())
    classes, confidences = top1_tallies(local, [f"class_{i}" for i in range(10)])
    sent = GOOD + len(BAD)
    requests, errors = EXPORT_PREFIX + REQUESTS, EXPORT_PREFIX + ERRORS
    latency, batch = EXPORT_PREFIX + REQUEST_LATENCY_MS, EXPORT_PREFIX + BATCH_SIZE
    predictions, confidence = EXPORT_PREFIX + PREDICTIONS, EXPORT_PREFIX + CONFIDENCE
    statuses = {"200": GOOD, "400": 1, "422": 2, "401": 2}

    def expected_and_found(found: dict) -> dict[str, tuple]:
        """What the scrape must hold, as {what: (found, expected)}."""
        return {
            "requests by status": ({s: summed(found, requests, route="/predict", status=s) for s in statuses},
                                   statuses),
            "404 on an unknown path": (summed(found, requests, route=OTHER_ROUTE, status="404"), 1),
            "errors by status": ({s: summed(found, errors, route="/predict", status=s) for s in statuses},
                                 {**statuses, "200": 0}),
            "404 as an error": (summed(found, errors, route=OTHER_ROUTE, status="404"), 1),
            "latency count": (summed(found, latency + "_count", route="/predict"), sent),
            "latency +Inf bucket": (summed(found, latency + "_bucket", route="/predict", le="+Inf"), sent),
            "batch sizes sum": (summed(found, batch + "_sum"), GOOD),
            "predictions": (summed(found, predictions), GOOD),
            "predicted classes": ({c: summed(found, predictions, predicted_class=c) for c in classes}, classes),
            "confidence count": (summed(found, confidence + "_count"), GOOD),
            "confidence +Inf bucket": (summed(found, confidence + "_bucket", le="+Inf"), GOOD),
        }

    url = metrics_url()
    assert url, "Ray reports no metrics export port for this node"
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:  # the agent's numbers lag the replica's by up to one report interval
        found = totals(urllib.request.urlopen(url, timeout=10).read().decode(), VERSION)
        missing = {what: got_want for what, got_want in expected_and_found(found).items() if got_want[0] != got_want[1]}
        if not missing:
            break
        assert time.monotonic() < deadline, f"after {SCRAPE_DEADLINE_S} s the scrape holds (found, expected): {missing}"
        time.sleep(1.0)

    assert summed(found, latency + "_sum", route="/predict") > 0
    assert 0 < summed(found, batch + "_count") <= GOOD
    # Ray's agent rebuilds a histogram from bucket counts at bucket midpoints (serving/metrics.py): the
    # exported sum is the midpoints', which the fine buckets keep within 0.025 per input of the truth.
    exported = summed(found, confidence + "_sum")
    assert exported == pytest.approx(sum(as_exported(c, CONFIDENCE_BOUNDARIES) for c in confidences), abs=1e-6)
    assert exported == pytest.approx(sum(confidences), abs=0.025 * GOOD)
