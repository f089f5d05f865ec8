"""What a request to the student may say: pydantic request models, and 4xx reasons for the rest.

``predict_model(schema, limits)`` and ``generate_model(limits)`` build the pydantic v2 models of the
``POST /predict`` and ``POST /generate`` bodies for one student and one set of limits (cached): unknown
fields are forbidden, ``inputs`` holds 1 to ``max_inputs_per_request`` items, numbers are strict
(no strings, booleans or nulls), finite (``allow_inf_nan=False``: the ``NaN`` / ``Infinity``
literals the JSON parser accepts are refused) and within float32 range, feature vectors have the
student's length or nested shape, token ids lie in the vocabulary, texts are at most
``max_text_chars`` long. The limits come from ServeConfig and the shape from the loaded student,
neither known when the routes are declared, so a replica builds its models once at start.

``parse_predict_request`` / ``parse_generate_request`` validate raw body bytes against them and turn
the first pydantic error into ``RequestError(status, message)``: 400 for bytes that are not UTF-8
JSON, 413 for too many inputs, 422 for the rest; each message says what was wrong and what is
allowed. No Ray, no HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Callable, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationError, create_model

from distill_ray.config import ServeConfig

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Larger magnitudes become inf once cast to the model's float32."""
MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 10.0
FORBID_EXTRA = ConfigDict(extra="forbid")


class RequestError(Exception):
    """A client error: ``status`` is the HTTP status (4xx), ``message`` says what is wrong and what is allowed."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits, from ServeConfig."""

    max_inputs_per_request: int = 256
    max_text_chars: int = 10_000

    @classmethod
    def from_serve_config(cls, cfg: ServeConfig) -> RequestLimits:
        return cls(max_inputs_per_request=cfg.max_inputs_per_request, max_text_chars=cfg.max_text_chars)


@dataclass(frozen=True)
class InputSchema:
    """What one input to a student is: a feature tensor of ``input_shape``, or text / token ids."""

    num_classes: int
    input_shape: tuple[int, ...] | None = None
    """Shape of one sample for feature students; None for text students."""
    accepts_text: bool = False
    """A tokenizer is saved with the student, so raw strings are accepted."""
    vocab_size: int | None = None
    """Token ids must be below this (text students)."""

    @property
    def is_text(self) -> bool:
        return self.input_shape is None

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape) if self.input_shape else 0

    def describe_input(self, limits: RequestLimits | None = None) -> str:
        if not self.is_text:
            return f"a list of {self.num_features} numbers, or nested lists of shape {list(self.input_shape)}"
        ids = "a non-empty list of integer token ids" + (f" in 0..{self.vocab_size - 1}" if self.vocab_size else "")
        if not self.accepts_text:
            return ids + " (this student has no tokenizer, so no raw text)"
        chars = f" of at most {limits.max_text_chars} characters" if limits else ""
        return f"a string{chars} or {ids}"


@dataclass(frozen=True)
class PredictRequest:
    """A validated ``POST /predict`` body. Feature inputs are flat float lists; text inputs are str or id lists."""

    inputs: tuple[Any, ...]
    top_k: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A validated ``POST /generate`` body (causal-LM students)."""

    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 32
    temperature: float = 0.0
    conversations: tuple[tuple[tuple[str, str], ...], ...] = ()
    """``messages``: each a conversation of (role, content) turns, rendered with the student's chat template."""


# --- the request models -------------------------------------------------------------------------

Number = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""One feature value: a JSON number (ints too), finite and within float32 range."""


def _exactly(item: Any, n: int) -> Any:
    return Annotated[list[item], Field(min_length=n, max_length=n)]


def _feature_input(shape: tuple[int, ...]) -> Any:
    """A flat list of prod(shape) numbers, or (for multi-dimensional inputs) nested lists of ``shape``;
    a list whose first item is a list is read as nested."""
    flat = _exactly(Number, math.prod(shape))
    if len(shape) == 1:
        return flat
    nested: Any = Number
    for size in reversed(shape):
        nested = _exactly(nested, size)
    return Annotated[Union[Annotated[flat, Tag("flat")], Annotated[nested, Tag("nested")]],
                     Discriminator(lambda v: "nested" if isinstance(v, list) and v and isinstance(v[0], list)
                                   else "flat")]


def _text_input(schema: InputSchema, limits: RequestLimits) -> Any:
    """A string (students with a tokenizer) or a non-empty list of token ids in the vocabulary."""
    token = Annotated[int, Strict(), Field(ge=0, lt=schema.vocab_size)] if schema.vocab_size \
        else Annotated[int, Strict(), Field(ge=0)]
    ids = Annotated[list[token], Field(min_length=1, max_length=limits.max_text_chars)]
    text = Annotated[str, Strict(), Field(max_length=limits.max_text_chars)]

    def kind(value: Any) -> str | None:  # None (no tag) for anything else, and for text without a tokenizer
        if isinstance(value, str):
            return "text" if schema.accepts_text else None
        return "ids" if isinstance(value, list) else None

    return Annotated[Union[Annotated[text, Tag("text")], Annotated[ids, Tag("ids")]], Discriminator(kind)]


def _inputs_field(item: Any, limits: RequestLimits, noun: str) -> tuple[Any, Any]:
    return (Annotated[list[item], Field(min_length=1, max_length=limits.max_inputs_per_request)],
            Field(description=f"a list of 1 to {limits.max_inputs_per_request} {noun}"))


@lru_cache(maxsize=32)
def predict_model(schema: InputSchema, limits: RequestLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /predict`` body for this student and these limits."""
    item = _text_input(schema, limits) if schema.is_text else _feature_input(schema.input_shape)
    top_k = Annotated[int, Strict(), Field(ge=1, le=schema.num_classes)]
    return create_model("PredictBody", __config__=FORBID_EXTRA,
                        inputs=_inputs_field(item, limits, "inputs"),
                        top_k=(Optional[top_k], Field(None, description=f"an integer from 1 to {schema.num_classes}")))


@lru_cache(maxsize=32)
def generate_model(limits: RequestLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /generate`` body (temperature 0 is greedy)."""
    prompt = Annotated[str, Strict(), Field(min_length=1, max_length=limits.max_text_chars, pattern=r"\S")]
    turn = create_model("Turn", __config__=FORBID_EXTRA,
                        role=(Annotated[str, Strict(), Field(min_length=1, max_length=32, pattern=r"\S")], ...),
                        content=(Annotated[str, Strict(), Field(max_length=limits.max_text_chars)], ...))
    conversation = Annotated[list[turn], Field(min_length=1, max_length=64)]
    inputs, inputs_info = _inputs_field(prompt, limits, "prompt strings")
    messages, messages_info = _inputs_field(conversation, limits, "conversations (lists of {role, content} turns)")
    return create_model(
        "GenerateBody", __config__=FORBID_EXTRA,
        inputs=(Optional[inputs], Field(None, description=inputs_info.description + "; or give 'messages'")),
        messages=(Optional[messages], Field(None, description=messages_info.description
                                            + ", rendered with the student's chat template")),
        max_new_tokens=(Annotated[int, Strict(), Field(ge=1, le=MAX_NEW_TOKENS)],
                        Field(32, description=f"an integer in 1..{MAX_NEW_TOKENS}")),
        temperature=(Annotated[float, Strict(), Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)],
                     Field(0.0, description=f"a number in 0..{MAX_TEMPERATURE:g} (0 = greedy)")))


# --- parsing raw bodies ---------------------------------------------------------------------------

def _validate(body: bytes, model: type[BaseModel]) -> BaseModel:
    """``model`` from raw bytes; 400 for bytes that are not UTF-8 JSON (pydantic's parser reports bad
    UTF-8 as bad JSON, so it is decoded here first to say which)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {err.start}); "
                                "send a JSON object encoded as UTF-8") from None
    return model.model_validate_json(text)


def parse_predict_request(body: bytes, schema: InputSchema, limits: RequestLimits) -> PredictRequest:
    """Validate a raw ``POST /predict`` body. Raises ``RequestError``: 400 for bytes that are not UTF-8
    JSON, 413 for more inputs than allowed, 422 for anything else that is not a valid request."""
    model = predict_model(schema, limits)
    try:
        parsed = _validate(body, model)
    except ValidationError as err:
        raise request_error(err.errors(), model, limits, "input", f"inputs, each {schema.describe_input(limits)}",
                            lambda e: _input_error(e, schema, limits)) from None
    return PredictRequest(inputs=tuple(_flatten(x) for x in parsed.inputs) if not schema.is_text
                          else tuple(parsed.inputs), top_k=parsed.top_k)


def parse_generate_request(body: bytes, limits: RequestLimits) -> GenerateRequest:
    """Validate a raw ``POST /generate`` body: ``{"inputs": [prompt, ...], "max_new_tokens": 1..256,
    "temperature": 0..10}`` (temperature 0 is greedy). Same status codes as /predict."""
    model = generate_model(limits)
    try:
        parsed = _validate(body, model)
    except ValidationError as err:
        raise request_error(err.errors(), model, limits, "prompt", "prompt strings",
                            lambda e: _prompt_error(e, limits)) from None
    if (parsed.inputs is None) == (parsed.messages is None):
        raise RequestError(422, "give exactly one of 'inputs' (prompt strings, used as written) or 'messages' "
                                "(conversations of {role, content} turns, rendered with the student's chat "
                                f"template); {allowed_fields(model)}")
    conversations = tuple(tuple((t.role, t.content) for t in c) for c in parsed.messages or ())
    return GenerateRequest(tuple(parsed.inputs or ()), parsed.max_new_tokens, parsed.temperature, conversations)


def _flatten(value: Any) -> list[float]:
    return [x for item in value for x in _flatten(item)] if isinstance(value, list) else [value]


# --- pydantic errors -> what was wrong and what is allowed ----------------------------------------

def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _a_json_type(value: Any) -> str:
    """'an array', 'a string', ... for messages."""
    name = _json_type(value)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _shown(value: Any) -> str:
    """A scalar as the client wrote it (NaN and Infinity by their JSON literals), else its JSON type."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if type(value) in (int, float):
        return str(value)
    return _json_type(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _where(loc: tuple) -> str:
    """('inputs', 0, 'nested', 5) -> 'inputs[0][5]': union tags are left out."""
    return str(loc[0]) + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))


def allowed_fields(model: type[BaseModel]) -> str:
    """'allowed fields: 'inputs' (required, ...), 'top_k' (optional, ...)', from the model's fields."""
    parts = []
    for name, field in model.model_fields.items():
        default = "" if field.is_required() or field.default is None else f", default {field.default:g}"
        parts.append(f"'{name}' ({'required' if field.is_required() else 'optional'}, {field.description}{default})")
    return "allowed fields: " + ", ".join(parts)


def _rank(error: dict) -> int:
    """Body-level problems first (the cheapest to state), then 'inputs' itself (413 before anything
    per input), then the rest in the order pydantic found them."""
    order = {"json_invalid": 0, "model_type": 1, "extra_forbidden": 2, "missing": 3}
    if error["type"] in order:
        return order[error["type"]]
    return 4 if tuple(error["loc"]) == ("inputs",) else 5


def request_error(errors: list[dict], model: type[BaseModel], limits: RequestLimits, noun: str, each: str,
                  item_error: Callable[[dict], RequestError | None]) -> RequestError:
    """The ``RequestError`` for pydantic's ``errors`` on ``model``. ``noun`` names one input ("input",
    "prompt"), ``each`` says what the items of ``inputs`` are, ``item_error(error)`` words the errors
    inside one input (it knows what an input of this student is)."""
    errors = sorted(errors, key=_rank)
    first, kind, loc = errors[0], errors[0]["type"], tuple(errors[0]["loc"])
    allowed = allowed_fields(model)
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        if "recursion limit" in detail:
            return RequestError(400, "request body JSON is nested too deeply; send a JSON object like "
                                     "{\"inputs\": [...]}")
        return RequestError(400, f"request body is not valid JSON ({detail}); send a JSON object like "
                                 "{\"inputs\": [...]}")
    if kind == "model_type":
        return RequestError(422, f"request body must be a JSON object; got {_a_json_type(first['input'])} ({allowed})")
    if kind == "extra_forbidden" and len(loc) == 1:
        unknown = ", ".join(repr(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1)
        return RequestError(422, f"unknown field(s) {unknown}; {allowed}")
    if kind == "missing" and len(loc) == 1:
        return RequestError(422, f"missing required field '{loc[0]}'; {allowed}")
    if loc == ("inputs",):
        return _inputs_list_error(first, limits, noun, each)
    if loc == ("messages",):
        return _inputs_list_error(first, limits, "conversation", "conversations (lists of {role, content} turns)",
                                  field="messages")
    if loc[0] == "messages":  # inside one conversation: where, and what a turn is
        return RequestError(422, f"{_where(loc)}{'.' + str(loc[-1]) if isinstance(loc[-1], str) else ''}: "
                                 f"{first['msg']}; a conversation is a list of 1 to 64 turns "
                                 "{\"role\": non-empty string, \"content\": string}")
    if len(loc) == 1:  # a scalar field: say what it must be, from its description
        return RequestError(422, f"'{loc[0]}' must be {model.model_fields[loc[0]].description}; "
                                 f"got {_shown(first['input'])}")
    return item_error(first) or RequestError(422, f"{_where(loc)}: {first['msg']}")


def _inputs_list_error(error: dict, limits: RequestLimits, noun: str, each: str, field: str = "inputs") -> RequestError:
    most = limits.max_inputs_per_request
    if error["type"] == "too_long":
        return RequestError(413, f"'{field}' has {_count(len(error['input']), noun)}; at most {most} are allowed "
                                 "per request, so split it into several")
    if error["type"] == "too_short":
        return RequestError(422, f"'{field}' is empty; send 1 to {most} {noun}s")
    return RequestError(422, f"'{field}' must be a list of {each}; got {_a_json_type(error['input'])}")


def _number_error(error: dict, where: str) -> RequestError | None:
    value = error["input"]
    if error["type"] in ("finite_number", "less_than_equal", "greater_than_equal"):
        shown = "a huge integer" if type(value) is int else _shown(value)
        return RequestError(422, f"{where} is {shown}; only finite numbers within float32 range "
                                 f"(|x| <= {FLOAT32_MAX:.4g}) are allowed")
    if error["type"] == "float_type":
        return RequestError(422, f"{where} is {_a_json_type(value)}; expected a number")
    return None


def _input_error(error: dict, schema: InputSchema, limits: RequestLimits) -> RequestError | None:
    """One input of /predict: a feature vector (flat or nested) or a text / token id list."""
    loc, kind, value = tuple(error["loc"]), error["type"], error["input"]
    where, depth = _where(loc), len([p for p in loc if isinstance(p, int)]) - 1  # list levels inside the input
    each = schema.describe_input(limits)
    if schema.is_text:
        if kind == "union_tag_not_found" and isinstance(value, str):
            return RequestError(422, f"{where} is a string, but this student has no tokenizer; send {each}")
        if kind == "union_tag_not_found" or (kind == "list_type" and depth == 0):
            return RequestError(422, f"{where} is {_a_json_type(value)}; expected {each}")
        if kind == "string_too_long":
            return RequestError(422, f"{where} has {_count(len(value), 'character')}; at most "
                                     f"{limits.max_text_chars} are allowed per text")
        if kind == "too_short":
            return RequestError(422, f"{where} is an empty list; expected {each}")
        if kind == "too_long":
            return RequestError(422, f"{where} has {_count(len(value), 'token id')}; at most "
                                     f"{limits.max_text_chars} are allowed")
        upper = schema.vocab_size - 1 if schema.vocab_size else "vocab_size-1"
        shown = value if type(value) in (int, float) else _a_json_type(value)
        return RequestError(422, f"{where} is {shown}; token ids must be integers in 0..{upper}")
    if "nested" not in loc:  # a flat list of numbers
        if kind == "list_type" and depth == 0:
            return RequestError(422, f"{where} is {_a_json_type(value)}; this student takes feature vectors: {each}")
        if kind in ("too_short", "too_long") and depth == 0:
            return RequestError(422, f"{where} has {_count(len(value), 'number')}; expected {schema.num_features} "
                                     f"(a flat list of {schema.num_features} numbers, or nested lists of shape "
                                     f"{list(schema.input_shape)})")
        return _number_error(error, where)
    if depth == len(schema.input_shape):  # a number inside nested lists
        return _number_error(error, where)
    expected = schema.input_shape[depth]
    if kind == "list_type":
        return RequestError(422, f"{where} is {_a_json_type(value)}; expected a list of {expected} "
                                 f"(each input is {schema.describe_input()})")
    if kind in ("too_short", "too_long"):
        return RequestError(422, f"{where} has length {len(value)}; expected {expected} "
                                 f"(each input is {schema.describe_input()})")
    return None


def _prompt_error(error: dict, limits: RequestLimits) -> RequestError | None:
    """One prompt of /generate: a non-empty string of at most ``max_text_chars`` characters."""
    where, value = _where(tuple(error["loc"])), error["input"]
    if error["type"] == "string_too_long":
        return RequestError(422, f"{where} has {_count(len(value), 'character')}; at most {limits.max_text_chars}")
    return RequestError(422, f"{where} must be a non-empty string; got "
                             f"{'a blank string' if isinstance(value, str) else _a_json_type(value)}")


def validation_error_body(errors: list[dict]) -> RequestError:
    """A generic 422 for pydantic errors met outside the request models (FastAPI's own parameter
    validation): every error's place, what was wrong and what pydantic allows."""
    reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return RequestError(422, f"invalid request: {reasons}{more}")
