"""POST /generate for causal-LM students: request validation and generation, no Ray (the HTTP route
is a thin wrapper over the same StudentService)."""

from __future__ import annotations

import json

import pytest
import torch

from distill_ray.serving import RequestError, RequestLimits, StudentService, parse_generate_request


@pytest.fixture(scope="module")
def lm_student(tmp_path_factory):
    """A tiny Llama causal LM on MiniLM's WordPiece tokenizer, saved as a student directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_ray.data import DataUnavailable, minilm_path
    from distill_ray.models import save_model, save_tokenizer

    try:
        tokenizer_dir = minilm_path()
    except (DataUnavailable, FileNotFoundError, ImportError) as err:
        pytest.skip(f"MiniLM tokenizer unavailable: {err}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    out = tmp_path_factory.mktemp("lm") / "student"
    save_model(model, out, {"arch": "hf_config", "task": "causal_lm"})
    save_tokenizer(tokenizer_dir, out, max_length=64)
    (out / "distill_card.json").write_text(json.dumps({"name": "tiny-lm", "version": "v1"}))
    return out


def _service(path):
    from distill_ray.config import ServeConfig

    return StudentService.load(path, ServeConfig(max_inputs_per_request=4, max_text_chars=200))


def test_a_causal_lm_student_generates_and_greedy_is_deterministic(lm_student):
    service = _service(lm_student)
    assert service.generates
    request = service.parse_generate(b'{"inputs": ["the cat sat", "a dog"], "max_new_tokens": 5}')
    first, second = service.generate(request), service.generate(request)
    assert first["model"] == "tiny-lm@v1" and len(first["generations"]) == 2
    assert all(isinstance(g, str) and g.strip() for g in first["generations"])
    assert first == second  # temperature 0 is greedy
    sampled = service.generate(service.parse_generate(b'{"inputs": ["the cat sat"], "temperature": 1.5}'))
    assert len(sampled["generations"]) == 1


def test_predict_on_a_causal_lm_points_to_generate(lm_student):
    with pytest.raises(RequestError) as err:
        _service(lm_student).parse(b'{"inputs": ["hello"]}')
    assert err.value.status == 422 and "/generate" in str(err.value)


@pytest.mark.parametrize("body, status, needle", [
    (b"\xff\xfe", 400, "UTF-8"),
    (b"{not json", 400, "JSON"),
    (b'{"prompt": "x"}', 422, "unknown field"),
    (b'{"inputs": "x"}', 422, "list of prompt strings"),
    (b'{"inputs": []}', 422, "empty"),
    (b'{"inputs": ["a", "b", "c", "d", "e"]}', 413, "at most 4"),
    (b'{"inputs": [3]}', 422, "non-empty string"),
    (b'{"inputs": ["' + b"x" * 201 + b'"]}', 422, "at most 200"),
    (b'{"inputs": ["x"], "max_new_tokens": 0}', 422, "max_new_tokens"),
    (b'{"inputs": ["x"], "max_new_tokens": 1000}', 422, "max_new_tokens"),
    (b'{"inputs": ["x"], "temperature": -1}', 422, "temperature"),
    (b'{"inputs": ["x"], "temperature": NaN}', 422, "temperature"),
])
def test_bad_generate_requests_get_the_reason(body, status, needle):
    with pytest.raises(RequestError) as err:
        parse_generate_request(body, RequestLimits(max_inputs_per_request=4, max_text_chars=200))
    assert err.value.status == status and needle in str(err.value)
