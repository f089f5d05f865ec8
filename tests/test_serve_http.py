"""The Serve deployment over real HTTP: every bad-request class, answers equal to the in-process
student, health, model card, API-key auth, batching across concurrent requests, and shutdown."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from distill_ray.config import ServeConfig
from distill_ray.models import build_model, save_model
from distill_ray.teachers.recipes import train_classifier
from distill_ray.serving import API_KEY_ENV, StudentPredictor, start_serve

pytestmark = [pytest.mark.ray]

API_KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_INPUTS = 8
ZEROS = [0.0] * 784


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, small_fashion_mnist):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, {"hidden": [32]})
    train_classifier(model, small_fashion_mnist.train, epochs=2, lr=3e-3)
    directory = save_model(model, tmp_path_factory.mktemp("run") / "student",
                           {"arch": "mlp", "input_shape": [1, 28, 28], "num_classes": 10,
                            "options": {"hidden": [32]}, "task": "classification"})
    card = {"name": "http", "version": "v1", "task": "classification", "dataset": "fashion_mnist",
            "teachers": ["cnn", "mlp"], "metrics": {"test_accuracy": 0.8},
            "class_names": list(small_fashion_mnist.class_names)}
    (directory / "distill_card.json").write_text(json.dumps(card))
    return directory


@pytest.fixture(scope="module")
def url(ray_local, student_dir):
    """Serve on 127.0.0.1:<free port> with an API key. The key is read from the environment by the
    driver (start_serve) and only its sha256 reaches the replica, so it is unset again right after."""
    from ray import serve

    os.environ[API_KEY_ENV] = API_KEY
    try:
        base = start_serve(student_dir, host="127.0.0.1", port=free_port(), blocking=False,
                           serve_config=ServeConfig(max_batch_size=8, batch_wait_timeout_s=0.005,
                                                    max_inputs_per_request=MAX_INPUTS))
    finally:
        del os.environ[API_KEY_ENV]
    yield base
    serve.shutdown()


def post(url: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/predict", content=content, timeout=30,
                      headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)})


BAD_REQUESTS = [
    ("non-UTF-8 bytes", b'{"inputs": ["\xff\xfe"]}', 400, "not valid UTF-8"),
    ("malformed JSON", b'{"inputs": [[0.0, 1.0', 400, "not valid JSON"),
    ("body not an object", b"[[0.0]]", 422, "must be a JSON object"),
    ("missing field", b'{"top_k": 1}', 422, "missing required field 'inputs'"),
    ("extra field", json.dumps({"inputs": [ZEROS], "model": "x"}).encode(), 422, "unknown field(s) 'model'"),
    ("wrong type", json.dumps({"inputs": {"a": 1}}).encode(), 422, "'inputs' must be a list"),
    ("wrong element type", json.dumps({"inputs": [["0.5"] * 784]}).encode(), 422, "inputs[0][0] is a string"),
    ("wrong feature length", json.dumps({"inputs": [ZEROS[:100]]}).encode(), 422, "expected 784"),
    ("empty list", b'{"inputs": []}', 422, "'inputs' is empty"),
    ("too many inputs", json.dumps({"inputs": [ZEROS] * (MAX_INPUTS + 1)}).encode(), 413, "at most 8"),
    ("NaN", b'{"inputs": [[NaN' + b", 0" * 783 + b"]]}", 422, "inputs[0][0] is NaN"),
    ("Infinity", b'{"inputs": [[0, Infinity' + b", 0" * 782 + b"]]}", 422, "inputs[0][1] is Infinity"),
    ("bad top_k", json.dumps({"inputs": [ZEROS], "top_k": 11}).encode(), 422, "from 1 to 10"),
    ("top_k as a string", json.dumps({"inputs": [ZEROS], "top_k": "3"}).encode(), 422, "got string"),
    ("wrong nested shape", json.dumps({"inputs": [[[[0.0] * 28] * 27]]}).encode(), 422, "inputs[0][0] has length 27"),
    ("beyond float32", json.dumps({"inputs": [[1e39] + ZEROS[1:]]}).encode(), 422, "float32 range"),
    # Too-long text does not apply: this is a feature student (text limits are covered in test_serving.py).
]


@pytest.mark.parametrize("raw, status, reason", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_reason(url, raw, status, reason):
    reply = post(url, raw)
    assert reply.status_code == status, reply.text
    assert reason in reply.json()["error"]
    assert reply.json()["status"] == status


def test_the_replica_keeps_serving_after_every_bad_request(url, small_fashion_mnist):
    for _, raw, status, _ in BAD_REQUESTS:
        assert post(url, raw).status_code == status
    x = small_fashion_mnist.test.inputs[:1]
    reply = post(url, json.dumps({"inputs": [x[0].reshape(-1).tolist()]}).encode())
    assert reply.status_code == 200 and len(reply.json()["probabilities"][0]) == 10


def test_generate_on_a_classifier_says_to_use_predict(url):
    reply = httpx.post(f"{url}/generate", content=b'{"inputs": ["hello"]}', timeout=30,
                       headers={"Content-Type": "application/json", **AUTH})
    assert reply.status_code == 422 and "/predict" in reply.json()["error"]


def test_predictions_equal_the_student_run_in_process(url, student_dir, small_fashion_mnist):
    x = small_fashion_mnist.test.inputs[:6]
    inputs = [row.reshape(-1).tolist() for row in x[:5]] + [x[5].tolist()]  # flat and nested [1, 28, 28]
    reply = post(url, json.dumps({"inputs": inputs, "top_k": 2}).encode())
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    local = StudentPredictor(student_dir).predict(x)
    np.testing.assert_allclose(np.asarray(answer["probabilities"]), np.asarray(local["probabilities"]),
                               rtol=0, atol=1e-5)
    assert answer["predictions"] == local["predictions"]
    assert answer["prediction_ids"] == local["prediction_ids"]
    assert set(answer["predictions"]) <= set(small_fashion_mnist.class_names)
    assert answer["model"] == "http@v1"
    assert [t["id"] for t in answer["top_k"][0]][0] == local["prediction_ids"][0]


def test_concurrent_requests_are_batched_without_mixing_answers(url, student_dir, small_fashion_mnist):
    x = small_fashion_mnist.test.inputs[:24]
    expected = StudentPredictor(student_dir).probabilities(x).numpy()

    def one(i: int) -> list[float]:
        reply = post(url, json.dumps({"inputs": [x[i].reshape(-1).tolist()]}).encode())
        assert reply.status_code == 200, reply.text
        return reply.json()["probabilities"][0]

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = np.asarray(list(pool.map(one, range(len(x)))))
    np.testing.assert_allclose(answers, expected, rtol=0, atol=1e-5)


def test_healthz_is_open_and_model_returns_the_card(url):
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "http@v1"}
    card = httpx.get(f"{url}/model", headers=AUTH, timeout=10).json()
    assert card["model"] == "http@v1" and card["quantized"] is None
    assert card["teachers"] == ["cnn", "mlp"] and len(card["class_names"]) == 10


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}],
                         ids=["no header", "wrong key", "no scheme", "basic scheme"])
def test_without_the_api_key_requests_get_401(url, headers):
    reply = post(url, json.dumps({"inputs": [ZEROS]}).encode(), headers=headers)
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert "Authorization" in reply.json()["error"] or "invalid API key" in reply.json()["error"]
    assert reply.json()["status"] == 401
    assert httpx.get(f"{url}/model", headers=headers, timeout=10).status_code == 401
    # /generate checks the key before anything else, so a classifier's 422 stays hidden from strangers.
    assert httpx.post(f"{url}/generate", content=b'{"inputs": ["hi"]}', headers=headers, timeout=30).status_code == 401


def test_after_shutdown_the_port_no_longer_answers(url):
    from ray import serve

    serve.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
        except httpx.TransportError:
            return
        time.sleep(0.25)
    pytest.fail(f"{url} still answers 20 s after serve.shutdown()")
