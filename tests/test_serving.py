"""Serving without Ray or HTTP: request validation, the predictor (float and int8), auth, app args."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from distill_ray.config import ServeConfig
from distill_ray.models import build_model, save_model
from distill_ray.teachers.recipes import train_classifier
from distill_ray.serving import (
    API_KEY_ENV,
    InputSchema,
    RequestError,
    RequestLimits,
    StudentLoadError,
    StudentPredictor,
    StudentService,
    api_key_digest,
    format_predictions,
    parse_generate_request,
    parse_predict_request,
    resolve_student_dir,
    settings_from_app_args,
    state_dict_bytes,
)
from distill_ray.serving.schemas import generate_model, predict_model

FEATURES = InputSchema(num_classes=10, input_shape=(1, 28, 28))
LIMITS = RequestLimits(max_inputs_per_request=4, max_text_chars=20)
ZEROS = [0.0] * 784


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def expect_error(raw: bytes, status: int, *fragments: str, schema: InputSchema = FEATURES,
                 limits: RequestLimits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_predict_request(raw, schema, limits)
    assert info.value.status == status, info.value.message
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


# --- validation, one class of bad request at a time -----------------------------------------------

@pytest.mark.parametrize("raw, status, fragments", [
    (b"\xff\xfe{}", 400, ("not valid UTF-8", "UTF-8")),
    (b'{"inputs": [', 400, ("not valid JSON", "line 1")),
    (b"", 400, ("not valid JSON",)),
    (b"[" * 100_000, 400, ("nested too deeply",)),
    (b"[1, 2]", 422, ("must be a JSON object", "an array", "'inputs' (required")),
    (b"{}", 422, ("missing required field 'inputs'", "'top_k' (optional")),
    (body({"inputs": [ZEROS], "foo": 1, "bar": 2}), 422, ("unknown field(s) 'foo', 'bar'", "allowed fields: 'inputs'")),
    (body({"inputs": "abc"}), 422, ("'inputs' must be a list", "got a string", "784 numbers")),
    (body({"inputs": [[]] * 0}), 422, ("'inputs' is empty", "1 to 4")),
    (body({"inputs": ["a picture"]}), 422, ("inputs[0] is a string", "feature vectors", "784 numbers")),
    (body({"inputs": [ZEROS[:-1]]}), 422, ("inputs[0] has 783 numbers", "expected 784", "[1, 28, 28]")),
    (body({"inputs": [ZEROS, ZEROS + [0.0]]}), 422, ("inputs[1] has 785 numbers", "expected 784")),
    (body({"inputs": [[[[0.0] * 28] * 27]]}), 422, ("inputs[0][0] has length 27", "expected 28")),
    (body({"inputs": [ZEROS[:5] + ["x"] + ZEROS[6:]]}), 422, ("inputs[0][5] is a string", "expected a number")),
    (body({"inputs": [[True] + ZEROS[1:]]}), 422, ("inputs[0][0] is a boolean", "expected a number")),
    (body({"inputs": [[None] + ZEROS[1:]]}), 422, ("inputs[0][0] is a null",)),
    (b'{"inputs": [[NaN' + b", 0.0" * 783 + b"]]}", 422, ("inputs[0][0] is NaN", "only finite numbers")),
    (b'{"inputs": [[0.0, -Infinity' + b", 0.0" * 782 + b"]]}", 422, ("inputs[0][1] is -Infinity",)),
    (b'{"inputs": [[1e400' + b", 0.0" * 783 + b"]]}", 422, ("inputs[0][0] is Infinity", "float32 range")),
    (body({"inputs": [[1e39] + ZEROS[1:]]}), 422, ("float32 range",)),
    (body({"inputs": [ZEROS] * 5}), 413, ("has 5 inputs", "at most 4", "split")),
    (body({"inputs": [ZEROS], "top_k": 0}), 422, ("'top_k' must be an integer from 1 to 10", "got 0")),
    (body({"inputs": [ZEROS], "top_k": 11}), 422, ("from 1 to 10", "got 11")),
    (body({"inputs": [ZEROS], "top_k": 2.0}), 422, ("from 1 to 10", "got 2.0")),
    (body({"inputs": [ZEROS], "top_k": "3"}), 422, ("from 1 to 10", "got string")),
    (body({"inputs": [ZEROS], "top_k": True}), 422, ("from 1 to 10", "got boolean")),
])
def test_bad_requests_get_their_status_and_say_what_is_allowed(raw, status, fragments):
    expect_error(raw, status, *fragments)


def test_too_many_inputs_is_413_before_per_input_checks():
    # Cheap rejection first: five garbage inputs still get 413, not a 422 about inputs[0].
    expect_error(body({"inputs": ["x"] * 5}), 413, "at most 4")


def test_flat_and_nested_inputs_parse_to_the_same_floats():
    rng = np.random.default_rng(0)
    image = rng.random((1, 28, 28)).astype(np.float32)
    parsed = parse_predict_request(body({"inputs": [image.reshape(-1).tolist(), image.tolist()], "top_k": 3}),
                                   FEATURES, LIMITS)
    assert parsed.top_k == 3
    assert len(parsed.inputs) == 2 and parsed.inputs[0] == parsed.inputs[1]
    np.testing.assert_allclose(np.asarray(parsed.inputs[0]), image.reshape(-1), rtol=0, atol=1e-7)
    assert parse_predict_request(body({"inputs": [list(range(784))]}), FEATURES, LIMITS).inputs[0][783] == 783.0


TEXT = InputSchema(num_classes=3, input_shape=None, accepts_text=True, vocab_size=100)


@pytest.mark.parametrize("inputs, status, fragments", [
    (["x" * 21], 422, ("inputs[0] has 21 characters", "at most 20")),
    ([[1, 2, 100]], 422, ("inputs[0][2] is 100", "0..99")),
    ([[1, -1]], 422, ("inputs[0][1] is -1",)),
    ([[1, 2.5]], 422, ("inputs[0][1] is 2.5", "integers")),
    ([[]], 422, ("inputs[0] is an empty list",)),
    ([{"text": "hi"}], 422, ("inputs[0] is an object", "a string of at most 20 characters")),
])
def test_text_inputs_are_checked(inputs, status, fragments):
    expect_error(body({"inputs": inputs}), status, *fragments, schema=TEXT)


def test_text_students_take_strings_and_token_ids():
    parsed = parse_predict_request(body({"inputs": ["x" * 20, [0, 5, 99]]}), TEXT, LIMITS)
    assert parsed.inputs == ("x" * 20, [0, 5, 99])
    no_tokenizer = InputSchema(num_classes=3, input_shape=None, accepts_text=False, vocab_size=100)
    expect_error(body({"inputs": ["hello"]}), 422, "no tokenizer", "token ids", schema=no_tokenizer)



# --- the pydantic request models themselves ---------------------------------------------------------

def error_types(model, raw) -> list[tuple[str, tuple]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(raw)
    return [(e["type"], tuple(e["loc"])) for e in info.value.errors()]


def test_predict_model_forbids_extra_keys_non_finite_numbers_and_too_long_lists():
    model = predict_model(FEATURES, LIMITS)
    assert predict_model(FEATURES, LIMITS) is model  # built once per student and limits
    ok = model.model_validate_json(body({"inputs": [ZEROS], "top_k": 10}))
    assert ok.top_k == 10 and len(ok.inputs[0]) == 784
    assert error_types(model, body({"inputs": [ZEROS], "extra": 1})) == [("extra_forbidden", ("extra",))]
    assert error_types(model, b'{"inputs": [[NaN' + b", 0" * 783 + b"]]}") == [("finite_number", ("inputs", 0, "flat", 0))]
    assert error_types(model, b'{"inputs": [[0, 0, Infinity' + b", 0" * 781 + b"]]}") == \
        [("finite_number", ("inputs", 0, "flat", 2))]
    assert error_types(model, body({"inputs": [ZEROS] * 5})) == [("too_long", ("inputs",))]
    assert error_types(model, body({"inputs": [ZEROS + [0.0]]})) == [("too_long", ("inputs", 0, "flat"))]
    assert error_types(model, body({"inputs": [["1.0"] + ZEROS[1:]]})) == [("float_type", ("inputs", 0, "flat", 0))]
    assert error_types(model, body({"inputs": [ZEROS], "top_k": 11})) == [("less_than_equal", ("top_k",))]
    # The limit is the configured one: 8 inputs pass with max_inputs_per_request=8, 9 do not.
    wider = predict_model(FEATURES, RequestLimits(max_inputs_per_request=8))
    assert len(wider.model_validate_json(body({"inputs": [ZEROS] * 8})).inputs) == 8
    assert error_types(wider, body({"inputs": [ZEROS] * 9})) == [("too_long", ("inputs",))]


def test_text_and_generate_models_limit_lengths_and_forbid_extra_keys():
    text = predict_model(TEXT, LIMITS)
    assert text.model_validate_json(body({"inputs": ["x" * 20, [99]]})).inputs == ["x" * 20, [99]]
    assert error_types(text, body({"inputs": ["x" * 21]})) == [("string_too_long", ("inputs", 0, "text"))]
    assert error_types(text, body({"inputs": [[1] * 21]})) == [("too_long", ("inputs", 0, "ids"))]
    assert error_types(text, body({"inputs": [[100]]})) == [("less_than", ("inputs", 0, "ids", 0))]
    generate = generate_model(RequestLimits(max_inputs_per_request=2, max_text_chars=5))
    parsed = generate.model_validate_json(b'{"inputs": ["hello"]}')
    assert (parsed.max_new_tokens, parsed.temperature) == (32, 0.0)  # the defaults
    assert error_types(generate, b'{"inputs": ["hello!"]}') == [("string_too_long", ("inputs", 0))]
    assert error_types(generate, b'{"inputs": ["a", "b", "c"]}') == [("too_long", ("inputs",))]
    assert error_types(generate, b'{"inputs": ["a"], "temperature": Infinity}') == [("finite_number", ("temperature",))]
    assert error_types(generate, b'{"inputs": ["a"], "top_p": 0.9}') == [("extra_forbidden", ("top_p",))]


def test_413_and_field_messages_follow_the_configured_limits():
    err = expect_error(body({"inputs": [[1]] * 3}), 413, "'inputs' has 3 inputs", "at most 2", schema=TEXT,
                       limits=RequestLimits(max_inputs_per_request=2, max_text_chars=20))
    assert err.body() == {"error": err.message, "status": 413}
    err = expect_error(body({"inputs": [[1]], "top_k": 4}), 422, "'top_k' must be an integer from 1 to 3", "got 4",
                       schema=TEXT)
    with pytest.raises(RequestError, match=r"at most 1 are allowed per request") as info:
        parse_generate_request(b'{"inputs": ["a", "b"]}', RequestLimits(max_inputs_per_request=1))
    assert info.value.status == 413
    with pytest.raises(RequestError, match=r"'max_new_tokens' must be an integer in 1..256; got 2.5"):
        parse_generate_request(b'{"inputs": ["a"], "max_new_tokens": 2.5}', LIMITS)
    allowed = expect_error(b"{}", 422, schema=TEXT).message
    assert "'inputs' (required, a list of 1 to 4 inputs)" in allowed and "'top_k' (optional, an integer from 1 to 3)" in allowed


def test_a_single_feature_dimension_takes_flat_lists_only():
    tabular = InputSchema(num_classes=2, input_shape=(3,))
    assert parse_predict_request(body({"inputs": [[1, 2.5, -3]]}), tabular, LIMITS).inputs == ([1.0, 2.5, -3.0],)
    expect_error(body({"inputs": [[1, 2]]}), 422, "inputs[0] has 2 numbers", "expected 3", schema=tabular)
    expect_error(body({"inputs": [[[1, 2, 3]]]}), 422, "inputs[0][0] is an array", "expected a number", schema=tabular)
    expect_error(body({"inputs": [[1, [2], 3]]}), 422, "inputs[0][1] is an array", "expected a number", schema=tabular)

# --- the predictor --------------------------------------------------------------------------------

SPEC = {"arch": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "options": {"hidden": [32]},
        "task": "classification"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_fashion_mnist):
    """A real run directory: RUN_DIR/student with a trained MLP and its distill card."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, {"hidden": [32]})
    train_classifier(model, small_fashion_mnist.train, epochs=2, lr=3e-3)
    run = tmp_path_factory.mktemp("run")
    student = save_model(model, run / "student", SPEC)
    card = {"name": "unit", "version": "v3", "task": "classification", "dataset": "fashion_mnist",
            "teachers": ["cnn"], "metrics": {"test_accuracy": 0.8},
            "class_names": list(small_fashion_mnist.class_names)}
    (student / "distill_card.json").write_text(json.dumps(card))
    return run


def test_predictor_answers_match_a_direct_forward_pass(run_dir, small_fashion_mnist):
    predictor = StudentPredictor(run_dir)  # a run directory resolves to its student/
    assert predictor.student_dir == (run_dir / "student").resolve()
    x = small_fashion_mnist.test.inputs[:16]
    answer = predictor.predict(x.reshape(16, -1).tolist(), top_k=3)
    with torch.no_grad():
        expected = torch.softmax(predictor.model(torch.as_tensor(x)), dim=-1)
    np.testing.assert_allclose(np.asarray(answer["probabilities"]), expected.numpy(), atol=1e-6)
    ids = expected.argmax(-1).tolist()
    assert answer["prediction_ids"] == ids
    assert answer["predictions"] == [small_fashion_mnist.class_names[i] for i in ids]
    assert answer["model"] == "unit@v3"
    assert answer["card"]["quantized"] is None and answer["card"]["model"] == "unit@v3"
    assert answer["card"]["teachers"] == ["cnn"]
    assert [len(row) for row in answer["top_k"]] == [3] * 16
    assert answer["top_k"][0][0]["id"] == ids[0]
    assert answer["top_k"][0][0]["probability"] >= answer["top_k"][0][1]["probability"]


def test_int8_student_agrees_with_float_on_the_real_test_split(run_dir, small_fashion_mnist):
    float_student = StudentPredictor(run_dir / "student")
    int8_student = StudentPredictor(run_dir / "student", quantize="int8")
    x = small_fashion_mnist.test.inputs
    agreement = (float_student.probabilities(x).argmax(-1) == int8_student.probabilities(x).argmax(-1)).float().mean()
    assert len(x) == 300 and agreement.item() >= 0.98
    assert int8_student.card["quantized"] == "int8"
    # 784x32 + 32x10 weights at 1 byte instead of 4 (biases stay float): well under half the bytes.
    assert state_dict_bytes(int8_student.model) < 0.4 * state_dict_bytes(float_student.model)
    assert StudentPredictor(run_dir, quantize="none").quantized is None


def test_missing_or_corrupt_student_directories_get_clear_errors(tmp_path, run_dir):
    with pytest.raises(StudentLoadError, match="does not exist"):
        resolve_student_dir(tmp_path / "nope")
    with pytest.raises(StudentLoadError, match=r"no distill_spec\.json .*run directory"):
        StudentPredictor(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "distill_spec.json").write_text("{not json")
    with pytest.raises(StudentLoadError, match="model spec is not readable JSON"):
        StudentPredictor(broken)
    (broken / "distill_spec.json").write_text(json.dumps({**SPEC, "family": "torch"}))
    with pytest.raises(StudentLoadError, match=r"no model\.safetensors"):
        StudentPredictor(broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(StudentLoadError, match="could not load the student"):
        StudentPredictor(broken)
    (broken / "model.safetensors").write_bytes((run_dir / "student" / "model.safetensors").read_bytes())
    (broken / "distill_spec.json").write_text(json.dumps({**SPEC, "options": {"hidden": [64]}, "family": "torch"}))
    with pytest.raises(StudentLoadError, match="could not load the student"):
        StudentPredictor(broken)  # weights of another shape


def test_a_student_without_a_card_is_named_after_its_run(tmp_path, run_dir):
    student = tmp_path / "myrun" / "student"
    student.mkdir(parents=True)
    for name in ("model.safetensors", "distill_spec.json"):
        (student / name).write_bytes((run_dir / "student" / name).read_bytes())
    predictor = StudentPredictor(tmp_path / "myrun")
    assert predictor.model_id == "myrun@unversioned"
    assert predictor.class_names == [str(i) for i in range(10)]


def test_format_predictions_orders_top_k():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    answer = format_predictions(probs, ["a", "b", "c"], "m@v1", top_k=2)
    assert answer["predictions"] == ["b"] and answer["prediction_ids"] == [1]
    assert [(t["label"], t["id"]) for t in answer["top_k"][0]] == [("b", 1), ("c", 2)]
    assert math.isclose(answer["top_k"][0][1]["probability"], 0.3, rel_tol=1e-6)
    assert "top_k" not in format_predictions(probs, ["a", "b", "c"], "m@v1")


# --- the replica's service: auth, answers ----------------------------------------------------------

def test_auth_is_off_without_a_key_and_strict_with_one(run_dir, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    predictor = StudentPredictor(run_dir)
    open_service = StudentService(predictor, RequestLimits())
    open_service.authorize(None)
    assert not open_service.auth_required

    locked = StudentService(predictor, RequestLimits(), api_key_sha256=api_key_digest("s3cret"))
    locked.authorize("Bearer s3cret")
    locked.authorize("bearer  s3cret ")
    for header, fragment in ((None, "missing or malformed"), ("s3cret", "missing or malformed"),
                             ("Basic s3cret", "missing or malformed"), ("Bearer wrong", "invalid API key")):
        with pytest.raises(RequestError, match=fragment) as info:
            locked.authorize(header)
        assert info.value.status == 401

    monkeypatch.setenv(API_KEY_ENV, "from-env")  # a key in the replica's own environment also counts
    env_locked = StudentService(predictor, RequestLimits())
    env_locked.authorize("Bearer from-env")
    with pytest.raises(RequestError):
        env_locked.authorize("Bearer s3cret")


def test_service_answers_from_batched_rows(run_dir, small_fashion_mnist):
    service = StudentService(StudentPredictor(run_dir), RequestLimits())
    x = small_fashion_mnist.test.inputs[:3]
    parsed = service.parse(body({"inputs": [row.reshape(-1).tolist() for row in x]}))
    rows = [service.batch_probabilities([item])[0] for item in parsed.inputs]  # as batches of one
    answer = service.respond(rows, top_k=None)
    np.testing.assert_allclose(np.asarray(answer["probabilities"]),
                               service.predictor.probabilities(x).numpy(), atol=1e-6)
    with pytest.raises(RequestError, match="non-finite outputs"):
        service.respond([torch.tensor([math.nan] * 10)])


def test_app_args_are_coerced_and_checked(run_dir):
    student_dir, cfg = settings_from_app_args({"student_dir": str(run_dir), "max_batch_size": "8",
                                               "batch_wait_timeout_s": "0.05", "quantize": "int8"})
    assert student_dir == (run_dir / "student").resolve()
    assert (cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.quantize) == (8, 0.05, "int8")
    assert cfg.max_inputs_per_request == ServeConfig().max_inputs_per_request
    with pytest.raises(ValueError, match="unknown app argument.*host and port go in http_options"):
        settings_from_app_args({"student_dir": str(run_dir), "port": 9000})
    with pytest.raises(ValueError, match="exactly one of student_dir"):
        settings_from_app_args({"max_batch_size": 8})
    with pytest.raises(ValueError, match="max_batch_size"):
        settings_from_app_args({"student_dir": str(run_dir), "max_batch_size": 0})



# --- the FastAPI layer in process (TestClient, no Ray), and the app's entry points -------------------

def test_fastapi_handlers_answer_auth_and_validation_errors_as_json():
    """Bearer auth through FastAPI's HTTPBearer dependency and FastAPI's own RequestValidationError,
    both turned into {"error", "status"} by the handlers the deployment installs."""
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from distill_ray.serving.app import install_error_handlers
    from distill_ray.serving.auth import ApiKeyCheck, bearer_scheme

    app, check = install_error_handlers(FastAPI()), ApiKeyCheck(api_key_digest("s3cret"))

    @app.get("/guarded")
    def guarded(n: int, credentials=Depends(bearer_scheme)):
        check.check(credentials)
        return {"n": n}

    client = TestClient(app)
    for headers, reason in (({}, "missing or malformed"), ({"Authorization": "Basic s3cret"}, "missing or malformed"),
                            ({"Authorization": "s3cret"}, "missing or malformed"),
                            ({"Authorization": "Bearer wrong"}, "invalid API key")):
        reply = client.get("/guarded?n=3", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reason in reply.json()["error"] and reply.json()["status"] == 401
    assert client.get("/guarded?n=3", headers={"Authorization": "Bearer s3cret"}).json() == {"n": 3}
    reply = client.get("/guarded?n=three", headers={"Authorization": "Bearer s3cret"})
    assert reply.status_code == 422 and reply.json()["status"] == 422
    assert "query.n: Input should be a valid integer" in reply.json()["error"]


def test_the_library_never_imports_serve_app_and_serve_app_does_no_work_at_import():
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys, ray\n"
              "import distill_ray.serving, distill_ray.serving.launch, distill_ray.serving.app\n"
              "assert 'serve.app' not in sys.modules, 'the library imported serve/app.py'\n"
              "import serve.app\n"
              "assert serve.app.build_app is distill_ray.serving.app.build_app\n"
              "assert not ray.is_initialized()\n"
              "assert not any(name.startswith('transformers') for name in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_serve_config_yaml_is_a_valid_deploy_config_whose_builder_binds_the_student(run_dir, monkeypatch):
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    deploy = ServeDeploySchema.model_validate(raw)
    assert deploy.http_options.host == "127.0.0.1"
    app_cfg = deploy.applications[0]
    module_name, _, attr = app_cfg.import_path.partition(":")
    build_app = getattr(importlib.import_module(module_name), attr)
    app = build_app({**app_cfg.args, "student_dir": str(run_dir)})
    deployment = app._bound_deployment  # Ray keeps the bound deployment here; no public accessor
    assert deployment.name == "StudentDeployment" and deployment.num_replicas == 1
    assert deployment.max_ongoing_requests == 64  # max(2 * 32, MIN_ONGOING_REQUESTS)
    student_dir, serve_config, key_digest = deployment.init_args
    assert student_dir == str((run_dir / "student").resolve())
    assert (serve_config["max_batch_size"], serve_config["max_inputs_per_request"]) == (32, 256)
    assert key_digest is None  # no DISTILL_RAY_API_KEY here: auth off

# --- a text student: tokenizer saved beside it ------------------------------------------------------

@pytest.fixture(scope="module")
def text_student(tmp_path_factory):
    """A tiny random BERT classifier saved with the bundled MiniLM WordPiece tokenizer."""
    from distill_ray.data.bundled import DataUnavailable, load_tokenizer

    try:
        tokenizer = load_tokenizer("minilm")
    except DataUnavailable as err:
        pytest.skip(str(err))
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3))
    directory = save_model(model, tmp_path_factory.mktemp("text") / "student",
                           {"num_classes": 3, "task": "classification", "options": {"max_length": 16}})
    tokenizer.save_pretrained(str(directory))
    return directory, tokenizer


def test_text_student_tokenizes_pads_and_truncates(text_student):
    directory, tokenizer = text_student
    predictor = StudentPredictor(directory)
    assert predictor.schema.is_text and predictor.schema.accepts_text
    assert predictor.schema.vocab_size == tokenizer.vocab_size and predictor.max_length == 16
    ids = tokenizer("a short text")["input_ids"]
    together = predictor.probabilities(["a short text", "a much longer text that needs padding of the other", ids])
    alone = predictor.probabilities(["a short text"])
    np.testing.assert_allclose(together[0].numpy(), alone[0].numpy(), atol=1e-5)  # padding is masked out
    np.testing.assert_allclose(together[2].numpy(), alone[0].numpy(), atol=1e-5)  # ids == the same text
    long_text = " ".join(["word"] * 200)
    assert predictor._token_ids(long_text).__len__() == 16
    parsed = parse_predict_request(body({"inputs": ["hello", ids]}), predictor.schema, LIMITS)
    assert predictor.predict(list(parsed.inputs))["predictions"][0] in predictor.class_names


def test_text_student_keeps_as_many_tokens_as_it_was_trained_on(text_student, tmp_path):
    """A pipeline export records no max_length, only the padded training length (input_shape) and the
    tokenizer's model_max_length: serving cuts texts there, not at DEFAULT_MAX_LENGTH."""
    directory, tokenizer = text_student
    long_text = " ".join(["word"] * 200)
    for spec_extra, tokenizer_max, expected in (({"input_shape": [12]}, 20, 12), ({}, 20, 20), ({}, None, 128)):
        exported = tmp_path / f"student_{expected}"
        exported.mkdir()
        for name in ("config.json", "model.safetensors"):
            (exported / name).write_bytes((directory / name).read_bytes())
        spec = json.loads((directory / "distill_spec.json").read_text())
        spec["options"] = {}
        (exported / "distill_spec.json").write_text(json.dumps({**spec, **spec_extra}))
        saved = copy.deepcopy(tokenizer)
        saved.model_max_length = tokenizer_max or int(1e30)  # what an unset model_max_length reads as
        saved.save_pretrained(str(exported))
        predictor = StudentPredictor(exported)
        assert predictor.max_length == expected
        assert len(predictor._token_rows([long_text, "short"])[0]) == expected


def test_text_student_without_tokenizer_takes_token_ids_only(text_student, tmp_path):
    directory, tokenizer = text_student
    bare = tmp_path / "student"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "distill_spec.json"):
        (bare / name).write_bytes((directory / name).read_bytes())
    predictor = StudentPredictor(bare)
    assert predictor.schema.is_text and not predictor.schema.accepts_text
    ids = tokenizer("a short text")["input_ids"]
    np.testing.assert_allclose(predictor.probabilities([ids]).numpy(),
                               StudentPredictor(directory).probabilities(["a short text"]).numpy(), atol=1e-5)
    expect_error(body({"inputs": ["a short text"]}), 422, "no tokenizer", schema=predictor.schema)


def test_a_tabular_student_standardises_raw_features_and_answers_with_its_label_names(tmp_path):
    """The student's spec carries the train split's standardisation and the data's label names (as
    distill-ray run exports them): Serve applies the one to raw requests and answers with the other."""
    from distill_ray.data.rows import apply_standardise

    torch.manual_seed(0)
    model = build_model("mlp", (3,), 2, {"hidden": [8]})
    transform = {"mean": [10.0, -5.0, 100.0], "std": [2.0, 0.5, 30.0]}
    spec = {"arch": "mlp", "input_shape": [3], "num_classes": 2, "options": {"hidden": [8]},
            "task": "classification", "class_names": ["no", "yes"], "transform": transform,
            "feature_fields": ["age", "dose", "weight"]}
    student = save_model(model, tmp_path / "student", spec)
    (student / "distill_card.json").write_text(json.dumps({"name": "tab", "class_names": ["0", "1"]}))
    raw = np.array([[12.0, -4.0, 160.0], [8.0, -5.5, 40.0]], dtype=np.float32)
    answer = StudentPredictor(student).predict(raw.tolist())
    with torch.no_grad():
        expected = torch.softmax(model(torch.as_tensor(apply_standardise(raw, transform))), -1)
        unscaled = torch.softmax(model(torch.as_tensor(raw)), -1)
    np.testing.assert_allclose(np.asarray(answer["probabilities"]), expected.numpy(), atol=1e-6)
    assert not np.allclose(expected.numpy(), unscaled.numpy(), atol=1e-3)  # the transform matters here
    assert answer["predictions"] == [["no", "yes"][i] for i in expected.argmax(-1).tolist()]
