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

    from distill_ray.data.bundled import DataUnavailable, minilm_path
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


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} | {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def chat_students(lm_student, tmp_path_factory):
    """The same tiny LM with a chat template in its tokenizer, exported twice: as a student trained on
    plain prompt/response pairs and as one trained on chat turns (the spec's ``prompt_format``)."""
    import shutil

    from transformers import AutoTokenizer

    out = {}
    for prompt_format in ("plain", "chat"):
        d = tmp_path_factory.mktemp(f"chat-{prompt_format}") / "student"
        shutil.copytree(lm_student, d)
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(d))
        spec = json.loads((d / "distill_spec.json").read_text())
        (d / "distill_spec.json").write_text(json.dumps({**spec, "prompt_format": prompt_format}))
        out[prompt_format] = d
    return out


def _generations(service, body: dict) -> list[str]:
    return service.generate(service.parse_generate(json.dumps({"max_new_tokens": 6, **body}).encode()))["generations"]


def test_messages_are_rendered_with_the_students_chat_template(chat_students):
    from distill_ray.data.chat import render_chat_prompt

    service = _service(chat_students["plain"])
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    rendered = "<system> be brief | <user> the cat sat | <assistant> "
    assert render_chat_prompt(service.predictor.tokenizer, turns) == rendered
    assert service.predictor.prompt_texts(service.parse_generate(json.dumps({"messages": [turns]}).encode())) == [rendered]
    # What the student continues from is the rendered text: the same tokens as sending it written out.
    assert _generations(service, {"messages": [turns]}) == _generations(service, {"inputs": [rendered]})
    assert _generations(service, {"messages": [turns]}) != _generations(service, {"inputs": ["the cat sat"]})


def test_a_plain_prompt_to_a_chat_trained_student_becomes_one_user_turn(chat_students):
    chat, plain = _service(chat_students["chat"]), _service(chat_students["plain"])
    request = chat.parse_generate(b'{"inputs": ["the cat sat"]}')
    assert chat.predictor.prompt_texts(request) == ["<user> the cat sat | <assistant> "]
    assert plain.predictor.prompt_texts(request) == ["the cat sat"]  # a plain-trained student: as written
    assert _generations(chat, {"inputs": ["the cat sat"]}) == \
        _generations(plain, {"messages": [[{"role": "user", "content": "the cat sat"}]]})


def test_prompts_are_tokenized_as_in_training_without_special_tokens(lm_student):
    """Training tokenizes prompt and response with add_special_tokens=False; a WordPiece tokenizer would
    otherwise put [CLS] before the prompt and [SEP] between it and the response."""
    service = _service(lm_student)
    tok, model = service.predictor.tokenizer, service.predictor.model
    ids = tok("the cat sat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tok.cls_token_id not in ids[0].tolist() and tok.sep_token_id not in ids[0].tolist()
    from distill_ray.lm.generation import batched_responses

    expected = batched_responses(model, [ids[0].tolist()], 6, tok.eos_token_id, tok.pad_token_id)[0]
    assert _generations(service, {"inputs": ["the cat sat"]}) == [tok.decode(expected, skip_special_tokens=True)]
    with_special = batched_responses(model, [tok("the cat sat")["input_ids"]], 6, tok.eos_token_id, tok.pad_token_id)[0]
    assert with_special != expected  # the check can tell the two apart


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
    # messages: conversations instead of prompt strings
    (b'{"max_new_tokens": 3}', 422, "exactly one of 'inputs'"),
    (b'{"inputs": ["x"], "messages": [[{"role": "user", "content": "x"}]]}', 422, "exactly one of 'inputs'"),
    (b'{"messages": [[{"role": "user"}]]}', 422, "messages[0][0].content"),
    (b'{"messages": [[{"role": "user", "content": "x", "name": "y"}]]}', 422, "messages[0][0].name"),
    (b'{"messages": [[]]}', 422, "messages[0]"),
    (b'{"messages": "hi"}', 422, "list of conversations"),
    (b'{"messages": [[{"role": "u", "content": "x"}], [{"role": "u", "content": "x"}], [{"role": "u", "content": "x"}],'
     b' [{"role": "u", "content": "x"}], [{"role": "u", "content": "x"}]]}', 413, "at most 4"),
])
def test_bad_generate_requests_get_the_reason(body, status, needle):
    with pytest.raises(RequestError) as err:
        parse_generate_request(body, RequestLimits(max_inputs_per_request=4, max_text_chars=200))
    assert err.value.status == status and needle in str(err.value)
