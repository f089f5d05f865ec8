"""Serving a distilled student over HTTP: the model side, request validation, and a local launcher.

Layers, each usable and testable without the one above it:

- ``StudentPredictor`` loads a student (or run) directory with ``models.load_model`` (safetensors,
  no pickle), optionally quantizes its linear layers to int8, and turns a batch of inputs into class
  probabilities. No Ray, no HTTP.
- ``parse_predict_request`` turns the raw body bytes of ``POST /predict`` into validated inputs or
  raises ``RequestError(status, message)``; messages say what was wrong and what is allowed. Pure.
- ``StudentService`` is what one Serve replica does per request, minus Ray: auth, parsing, answers.
  ``serve/app.py`` wraps it in a Ray Serve deployment with a FastAPI ingress and dynamic batching.
- ``start_serve`` starts Ray Serve locally with that deployment (``distill-ray serve RUN_DIR``).

Ray is imported inside ``start_serve`` only, so importing this module stays cheap and Ray-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from distill_ray.config import ConfigError, ServeConfig
from distill_ray.models import SPEC_FILE, WEIGHTS_FILE, forward_logits, is_hf_model, load_model

API_KEY_ENV = "DISTILL_RAY_API_KEY"
"""When set, every route but /healthz needs ``Authorization: Bearer <key>``."""
CARD_FILE = "distill_card.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_MAX_LENGTH = 128
APP_NAME = "distill_student"
"""Serve application name used by ``start_serve`` and serve/config.yaml."""
REQUEST_FIELDS = ("inputs", "top_k")
ALLOWED_FIELDS_TEXT = "allowed fields: 'inputs' (required, a list), 'top_k' (optional, an integer)"
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Larger magnitudes become inf once cast to the model's float32."""


# --- errors -------------------------------------------------------------------------------------

class RequestError(Exception):
    """A client error: ``status`` is the HTTP status (4xx), ``message`` says what is wrong and what is allowed."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


class StudentLoadError(RuntimeError):
    """The path is not a loadable student: missing, not a student/run directory, or corrupt files."""


# --- the student directory ----------------------------------------------------------------------

def resolve_student_dir(path: str | Path) -> Path:
    """The student directory for a run directory (``RUN_DIR/student``), a registry entry
    (``registry/NAME`` -> its ``latest`` version) or a student directory itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise StudentLoadError(f"{path} does not exist; pass a run directory (holding student/) "
                               f"or a student directory (holding {SPEC_FILE})")
    if (path / SPEC_FILE).is_file():
        return path.resolve()
    if (path / "student" / SPEC_FILE).is_file():
        return (path / "student").resolve()
    if (path / "latest").is_file():  # a registry entry (registry/NAME): serve its latest version
        version = (path / "latest").read_text().strip()
        if (path / version / SPEC_FILE).is_file():
            return (path / version).resolve()
        raise StudentLoadError(f"{path}/latest points at {version!r}, which holds no {SPEC_FILE}")
    raise StudentLoadError(f"{path} is not a student directory: no {SPEC_FILE} in it or in {path / 'student'}; "
                           f"pass a run directory (holding student/), a registry entry (registry/NAME, "
                           f"serving its latest version) or a directory written by models.save_model")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StudentLoadError(f"{path}: the {what} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise StudentLoadError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_card(student_dir: Path) -> dict[str, Any]:
    """The distill card beside the student (or in its run directory); a minimal one if there is none."""
    for candidate in (student_dir / CARD_FILE, student_dir.parent / CARD_FILE):
        if candidate.is_file():
            return _read_json(candidate, "distill card")
    run_name = student_dir.parent.name if student_dir.name == "student" else student_dir.name
    return {"name": run_name, "version": "unversioned"}


def _load_student_model(student_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    spec = _read_json(student_dir / SPEC_FILE, "model spec")  # a clear error for a corrupt spec before load_model
    if spec.get("family", "torch") != "transformers" and not (student_dir / WEIGHTS_FILE).is_file():
        raise StudentLoadError(f"{student_dir}: no {WEIGHTS_FILE}; the student's weights are missing")
    try:
        return load_model(student_dir)
    except StudentLoadError:
        raise
    except Exception as err:  # safetensors, shape mismatches, bad spec keys: all mean "not loadable"
        raise StudentLoadError(f"{student_dir}: could not load the student ({type(err).__name__}: {err})") from err


def has_tokenizer(student_dir: Path) -> bool:
    return any((student_dir / name).is_file() for name in TOKENIZER_FILES)


# --- int8 quantization --------------------------------------------------------------------------

def normalize_quantize(quantize: str | None) -> str | None:
    """ServeConfig says "none"/"int8"; callers may also say None. Returns None or "int8"."""
    if quantize in (None, "", "none"):
        return None
    if quantize == "int8":
        return "int8"
    raise ValueError(f"quantize={quantize!r} is not supported; use None/'none' or 'int8'")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every nn.Linear (weights int8, activations quantized per batch).

    torch 2.13 still ships ``torch.ao.quantization.quantize_dynamic`` and its fast x86/fbgemm kernels,
    but marks it deprecated in favour of torchao's ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``.
    torchao is not a dependency here, so the torch API is used while it exists (its deprecation
    warnings are silenced: they say nothing the operator can act on); torchao is the fallback once
    torch removes it. Convolutions stay float either way.
    """
    ao_quantization = getattr(getattr(torch, "ao", None), "quantization", None)
    quantize_dynamic = getattr(ao_quantization, "quantize_dynamic", None)
    if quantize_dynamic is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r"(?s).*quantize_per_tensor.*deprecated")
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise RuntimeError("int8 quantization needs torch.ao.quantization.quantize_dynamic (gone from this torch) "
                           "or torchao (`pip install torchao`)") from None
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes held by the state dict, counting int8 packed weights at 1 byte per element."""
    def tensor_bytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    return sum(tensor_bytes(v) for v in model.state_dict().values())


# --- what an input looks like -------------------------------------------------------------------

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
            return (f"a list of {self.num_features} numbers, or nested lists of shape {list(self.input_shape)}")
        ids = "a non-empty list of integer token ids" + (f" in 0..{self.vocab_size - 1}" if self.vocab_size else "")
        if not self.accepts_text:
            return ids + " (this student has no tokenizer, so no raw text)"
        chars = f" of at most {limits.max_text_chars} characters" if limits else ""
        return f"a string{chars} or {ids}"


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits, from ServeConfig."""

    max_inputs_per_request: int = 256
    max_text_chars: int = 10_000

    @classmethod
    def from_serve_config(cls, cfg: ServeConfig) -> RequestLimits:
        return cls(max_inputs_per_request=cfg.max_inputs_per_request, max_text_chars=cfg.max_text_chars)


@dataclass(frozen=True)
class PredictRequest:
    """A validated ``POST /predict`` body. Feature inputs are flat float lists; text inputs are str or id lists."""

    inputs: tuple[Any, ...]
    top_k: int | None = None


# --- request validation (pure) ------------------------------------------------------------------

class _NonFiniteLiteral:
    """What Python's json makes of the NaN / Infinity / -Infinity literals it (unlike JSON) accepts,
    so validation can reject them with their position instead of letting NaN reach the model."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _json_type(value: Any) -> str:
    if isinstance(value, _NonFiniteLiteral):
        return value.text
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _a_json_type(value: Any) -> str:
    """'an array', 'a string', ... or just 'NaN' for the non-finite literals: for messages."""
    name = _json_type(value)
    if isinstance(value, _NonFiniteLiteral):
        return name
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _decode_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not valid UTF-8 (byte {err.start}); "
                                "send a JSON object encoded as UTF-8") from None
    try:
        return json.loads(text, parse_constant=_NonFiniteLiteral)
    except json.JSONDecodeError as err:
        raise RequestError(400, f"request body is not valid JSON ({err.msg} at line {err.lineno} column "
                                f"{err.colno}); send a JSON object like {{\"inputs\": [...]}}") from None
    except RecursionError:
        raise RequestError(400, "request body JSON is nested too deeply; send a JSON object like "
                                "{\"inputs\": [...]}") from None


def _parse_top_k(value: Any, num_classes: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= num_classes:
        shown = value if type(value) in (int, float) else _json_type(value)
        raise RequestError(422, f"'top_k' must be an integer from 1 to {num_classes}; got {shown}")
    return value


def _finite_floats(values: list, where: str) -> list[float]:
    """The numbers of one innermost list as floats, or 422 naming the first bad element."""
    out = []
    for j, v in enumerate(values):
        kind = type(v)
        if kind is not float and kind is not int:  # bool is its own type, so true/false land here
            if isinstance(v, _NonFiniteLiteral):
                raise RequestError(422, f"{where}[{j}] is {v.text}; only finite numbers are allowed")
            raise RequestError(422, f"{where}[{j}] is {_a_json_type(v)}; expected a number")
        try:
            number = float(v)
        except OverflowError:
            number = math.inf
        if not -FLOAT32_MAX <= number <= FLOAT32_MAX:
            raise RequestError(422, f"{where}[{j}] is {v if kind is float else 'a huge integer'}; only finite "
                                    f"numbers within float32 range (|x| <= {FLOAT32_MAX:.4g}) are allowed")
        out.append(number)
    return out


def _nested_floats(value: Any, shape: tuple[int, ...], where: str, schema: InputSchema, out: list[float]) -> None:
    if not isinstance(value, list):
        raise RequestError(422, f"{where} is {_a_json_type(value)}; expected a list of {shape[0]} "
                                f"(each input is {schema.describe_input()})")
    if len(value) != shape[0]:
        raise RequestError(422, f"{where} has length {len(value)}; expected {shape[0]} "
                                f"(each input is {schema.describe_input()})")
    if len(shape) == 1:
        out.extend(_finite_floats(value, where))
        return
    for i, item in enumerate(value):
        _nested_floats(item, shape[1:], f"{where}[{i}]", schema, out)


def _parse_features(value: Any, where: str, schema: InputSchema) -> list[float]:
    if not isinstance(value, list):
        raise RequestError(422, f"{where} is {_a_json_type(value)}; this student takes feature vectors: "
                                f"{schema.describe_input()}")
    if value and isinstance(value[0], list) and len(schema.input_shape) > 1:
        out: list[float] = []
        _nested_floats(value, schema.input_shape, where, schema, out)
        return out
    if len(value) != schema.num_features:
        raise RequestError(422, f"{where} has {_count(len(value), 'number')}; expected {schema.num_features} "
                                f"(a flat list of {schema.num_features} numbers, or nested lists of shape "
                                f"{list(schema.input_shape)})")
    return _finite_floats(value, where)


def _parse_text_input(value: Any, where: str, schema: InputSchema, limits: RequestLimits) -> str | list[int]:
    if isinstance(value, str):
        if not schema.accepts_text:
            raise RequestError(422, f"{where} is a string, but this student has no tokenizer; send "
                                    f"{schema.describe_input(limits)}")
        if len(value) > limits.max_text_chars:
            raise RequestError(422, f"{where} has {_count(len(value), 'character')}; at most {limits.max_text_chars} "
                                    "are allowed per text")
        return value
    if not isinstance(value, list):
        raise RequestError(422, f"{where} is {_a_json_type(value)}; expected {schema.describe_input(limits)}")
    if not value:
        raise RequestError(422, f"{where} is an empty list; expected {schema.describe_input(limits)}")
    if len(value) > limits.max_text_chars:
        raise RequestError(422, f"{where} has {_count(len(value), 'token id')}; at most {limits.max_text_chars} "
                                "are allowed")
    upper = schema.vocab_size if schema.vocab_size else math.inf
    for j, token in enumerate(value):
        if type(token) is not int or not 0 <= token < upper:
            shown = token if type(token) in (int, float) else _a_json_type(token)
            raise RequestError(422, f"{where}[{j}] is {shown}; token ids must be integers in "
                                    f"0..{upper - 1 if schema.vocab_size else 'vocab_size-1'}")
    return value


def _request_envelope(body: bytes, fields: Sequence[str], allowed: str, each: str, noun: str,
                      limits: RequestLimits) -> tuple[dict[str, Any], list]:
    """The checks every POST body shares: a JSON object with known fields and a non-empty ``inputs``
    list no longer than the limit. Returns (payload, inputs)."""
    payload = _decode_json(body)
    if not isinstance(payload, dict):
        raise RequestError(422, f"request body must be a JSON object; got {_a_json_type(payload)} ({allowed})")
    unknown = [key for key in payload if key not in fields]
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(repr(k) for k in unknown)}; {allowed}")
    if "inputs" not in payload:
        raise RequestError(422, f"missing required field 'inputs'; {allowed}")
    raw_inputs = payload["inputs"]
    if not isinstance(raw_inputs, list):
        raise RequestError(422, f"'inputs' must be a list of {each}; got {_a_json_type(raw_inputs)}")
    if not raw_inputs:
        raise RequestError(422, f"'inputs' is empty; send 1 to {limits.max_inputs_per_request} {noun}s")
    if len(raw_inputs) > limits.max_inputs_per_request:
        raise RequestError(413, f"'inputs' has {_count(len(raw_inputs), noun)}; at most "
                                f"{limits.max_inputs_per_request} are allowed per request, so split it into several")
    return payload, raw_inputs


def parse_predict_request(body: bytes, schema: InputSchema, limits: RequestLimits) -> PredictRequest:
    """Validate a raw ``POST /predict`` body. Raises ``RequestError``: 400 for bytes that are not UTF-8
    JSON, 413 for more inputs than allowed, 422 for anything else that is not a valid request."""
    payload, raw_inputs = _request_envelope(body, REQUEST_FIELDS, ALLOWED_FIELDS_TEXT,
                                            f"inputs, each {schema.describe_input(limits)}", "input", limits)
    top_k = _parse_top_k(payload.get("top_k"), schema.num_classes)
    if schema.is_text:
        inputs = tuple(_parse_text_input(x, f"inputs[{i}]", schema, limits) for i, x in enumerate(raw_inputs))
    else:
        inputs = tuple(_parse_features(x, f"inputs[{i}]", schema) for i, x in enumerate(raw_inputs))
    return PredictRequest(inputs=inputs, top_k=top_k)


GENERATE_FIELDS = ("inputs", "max_new_tokens", "temperature")
MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 10.0


@dataclass(frozen=True)
class GenerateRequest:
    """A validated ``POST /generate`` body (causal-LM students)."""

    prompts: tuple[str, ...]
    max_new_tokens: int = 32
    temperature: float = 0.0


def parse_generate_request(body: bytes, limits: RequestLimits) -> GenerateRequest:
    """Validate a raw ``POST /generate`` body: ``{"inputs": [prompt, ...], "max_new_tokens": 1..256,
    "temperature": 0..10}`` (temperature 0 is greedy). Same status codes as /predict."""
    allowed = (f"allowed fields: 'inputs' (list of prompt strings, required), 'max_new_tokens' (integer "
               f"1..{MAX_NEW_TOKENS}, default 32), 'temperature' (number 0..{MAX_TEMPERATURE:g}, 0 = greedy, default 0)")
    payload, prompts = _request_envelope(body, GENERATE_FIELDS, allowed, "prompt strings", "prompt", limits)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(422, f"inputs[{i}] must be a non-empty string; got {_a_json_type(prompt)}")
        if len(prompt) > limits.max_text_chars:
            raise RequestError(422, f"inputs[{i}] has {len(prompt)} characters; at most {limits.max_text_chars}")
    max_new = payload.get("max_new_tokens", 32)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS:
        raise RequestError(422, f"'max_new_tokens' must be an integer in 1..{MAX_NEW_TOKENS}; got {max_new!r}")
    temperature = payload.get("temperature", 0.0)
    if isinstance(temperature, (bool, _NonFiniteLiteral)) or not isinstance(temperature, (int, float)) \
            or not 0.0 <= float(temperature) <= MAX_TEMPERATURE:
        raise RequestError(422, f"'temperature' must be a number in 0..{MAX_TEMPERATURE:g} (0 = greedy); "
                                f"got {temperature!r}")
    return GenerateRequest(tuple(prompts), int(max_new), float(temperature))


def is_causal_lm(model: nn.Module) -> bool:
    return is_hf_model(model) and type(model).__name__.endswith("ForCausalLM")


class GeneratorPredictor:
    """A causal-LM student ready to generate: eval mode, no gradients, its own tokenizer."""

    def __init__(self, student_dir: Path, model: nn.Module, spec: dict[str, Any]):
        self.student_dir, self.model, self.spec = student_dir, model.eval(), spec
        if not has_tokenizer(student_dir):
            raise StudentLoadError(f"{student_dir}: a causal-LM student needs its tokenizer saved beside it")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(student_dir), local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        card = read_card(student_dir)
        self.model_id = f"{card.get('name', student_dir.name)}@{card.get('version', 'unversioned')}"
        self.card = {**card, "quantized": None, "model": self.model_id, "task": "causal_lm"}

    @torch.no_grad()
    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        batch = self.tokenizer(list(request.prompts), return_tensors="pt", padding=True, truncation=True,
                               max_length=int(getattr(self.model.config, "max_position_embeddings", 512))
                               - request.max_new_tokens)
        batch.pop("token_type_ids", None)  # BERT-style tokenizers add them; causal LMs take none
        sampling = request.temperature > 0
        out = self.model.generate(**batch, max_new_tokens=request.max_new_tokens, do_sample=sampling,
                                  temperature=request.temperature if sampling else None, top_k=None, top_p=None,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return {"generations": self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True),
                "model": self.model_id}


# --- the model side -----------------------------------------------------------------------------

def _class_names(card: Mapping[str, Any], model: nn.Module, num_classes: int) -> list[str]:
    names = card.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    labels = [str(id2label.get(i, "")) for i in range(num_classes)]
    if all(labels) and not all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        return labels
    return [str(i) for i in range(num_classes)]


class StudentPredictor:
    """A loaded student ready for inference: eval mode, no gradients, optionally int8.

    ``path`` is a student directory or a run directory holding ``student/``.
    """

    def __init__(self, path: str | Path, quantize: str | None = None,
                 loaded: tuple[nn.Module, dict[str, Any]] | None = None):
        self.student_dir = resolve_student_dir(path)
        model, self.spec = loaded or _load_student_model(self.student_dir)
        self.quantized = normalize_quantize(quantize)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = quantize_int8(model) if self.quantized == "int8" else model
        self.tokenizer = self._load_tokenizer() if has_tokenizer(self.student_dir) else None
        self.num_classes = self._num_classes()
        self.max_length = int((self.spec.get("options") or {}).get("max_length")
                              or self.spec.get("max_length") or DEFAULT_MAX_LENGTH)
        card = read_card(self.student_dir)
        # Label names saved with the student (the data's label map) win over the card's copy.
        self.class_names = _class_names({"class_names": self.spec.get("class_names")} if self.spec.get("class_names")
                                        else card, self.model, self.num_classes)
        # Tabular students: the train split's standardisation, applied to raw feature values.
        self.transform = self.spec.get("transform")
        self.model_id = f"{card.get('name', self.student_dir.name)}@{card.get('version', 'unversioned')}"
        self.card = {**card, "quantized": self.quantized, "model": self.model_id}
        self.schema = InputSchema(num_classes=self.num_classes, input_shape=self._input_shape(),
                                  accepts_text=self.tokenizer is not None, vocab_size=self._vocab_size())

    # -- what the student is

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.student_dir), local_files_only=True)

    def _num_classes(self) -> int:
        if self.spec.get("num_classes"):
            return int(self.spec["num_classes"])
        num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
        if not num_labels:
            raise StudentLoadError(f"{self.student_dir}: the spec has no num_classes and the model no num_labels")
        return int(num_labels)

    def _is_text_student(self) -> bool:
        """A tokenizer beside it, or a transformers model with a vocabulary and no image channels (a text
        student's spec may still carry an input_shape, the padded sequence length)."""
        if self.tokenizer is not None:
            return True
        config = getattr(self.model, "config", None)
        return bool(is_hf_model(self.model) and getattr(config, "vocab_size", None)
                    and not getattr(config, "num_channels", None))

    def _input_shape(self) -> tuple[int, ...] | None:
        if self._is_text_student():
            return None  # raw text (with a tokenizer) or token ids
        shape = self.spec.get("input_shape")
        if not shape:
            raise StudentLoadError(f"{self.student_dir}: the spec has no input_shape, so inputs cannot be checked")
        return tuple(int(s) for s in shape)

    def _vocab_size(self) -> int | None:
        size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        return int(size) if size else None

    # -- inference

    def _feature_tensor(self, batch_inputs: Any) -> torch.Tensor:
        x = np.asarray(batch_inputs, dtype=np.float32)
        if self.transform:
            from distill_ray.data import apply_standardise

            x = apply_standardise(x.reshape(len(x), -1), self.transform)
        return torch.as_tensor(x).reshape(len(x), *self.schema.input_shape)

    def _token_ids(self, item: str | Sequence[int]) -> list[int]:
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError("this student has no tokenizer; pass token id lists, not text")
            return self.tokenizer(item, truncation=True, max_length=self.max_length)["input_ids"]
        return [int(t) for t in item][: self.max_length]

    def _text_logits(self, batch_inputs: Sequence[str | Sequence[int]]) -> torch.Tensor:
        rows = [self._token_ids(item) for item in batch_inputs]
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None) or 0
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding, masked out
            input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        if is_hf_model(self.model):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return forward_logits(self.model, input_ids)

    @torch.no_grad()
    def probabilities(self, batch_inputs: Any) -> torch.Tensor:
        """Softmax probabilities [B, num_classes] (float32) for a batch of inputs.

        Feature students take anything numpy can stack to [B, *input_shape] or [B, prod(input_shape)];
        text students take a list of strings and/or token id lists.
        """
        if len(batch_inputs) == 0:
            return torch.empty((0, self.num_classes))
        if self.schema.is_text:
            logits = self._text_logits(batch_inputs)
        else:
            logits = forward_logits(self.model, self._feature_tensor(batch_inputs))
        return torch.softmax(logits.float(), dim=-1)

    def predict(self, batch_inputs: Any, top_k: int | None = None) -> dict[str, Any]:
        """Class predictions and probabilities for a batch, plus the card (what model answered)."""
        answer = format_predictions(self.probabilities(batch_inputs), self.class_names, self.model_id, top_k)
        answer["card"] = self.card
        return answer


def format_predictions(probs: torch.Tensor, class_names: Sequence[str], model_id: str,
                       top_k: int | None = None) -> dict[str, Any]:
    """The ``/predict`` answer for probabilities [B, C]: top-1 class names and ids, full
    probabilities, and with ``top_k`` the k most likely classes per input."""
    ids = probs.argmax(dim=-1).tolist()
    answer: dict[str, Any] = {"predictions": [class_names[i] for i in ids], "prediction_ids": ids,
                              "probabilities": probs.tolist(), "model": model_id}
    if top_k:
        values, indices = probs.topk(top_k, dim=-1)
        answer["top_k"] = [[{"label": class_names[j], "id": j, "probability": p}
                            for p, j in zip(vals, idx)] for vals, idx in zip(values.tolist(), indices.tolist())]
    return answer


# --- one replica's request handling, minus Ray ----------------------------------------------------

def api_key_digest(key: str) -> str:
    """sha256 of the key: replicas keep and compare only this, so the key itself never leaves the
    process that read it from the environment (it would otherwise sit in Serve's stored config)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def env_api_key_digest() -> str | None:
    """Digest of ``DISTILL_RAY_API_KEY`` in this process, or None when it is unset or empty."""
    key = os.environ.get(API_KEY_ENV, "")
    return api_key_digest(key) if key else None


class StudentService:
    """Auth, validation and answers for one replica. /healthz stays open (liveness probes carry no
    key and it reveals nothing but the model id); /predict and /model need the key when one is set."""

    def __init__(self, predictor: StudentPredictor, limits: RequestLimits, api_key_sha256: str | None = None):
        self.predictor = predictor
        self.limits = limits
        # The replica's own environment counts too (runtime_env env_vars), so auth can only be added, never lost.
        self._key_digest = api_key_sha256 or env_api_key_digest()

    @classmethod
    def load(cls, path: str | Path, cfg: ServeConfig, api_key_sha256: str | None = None) -> StudentService:
        student_dir = resolve_student_dir(path)
        model, spec = _load_student_model(student_dir)
        predictor = GeneratorPredictor(student_dir, model, spec) if is_causal_lm(model) \
            else StudentPredictor(student_dir, quantize=cfg.quantize, loaded=(model, spec))
        return cls(predictor, RequestLimits.from_serve_config(cfg), api_key_sha256)

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

    @property
    def auth_required(self) -> bool:
        return self._key_digest is not None

    def authorize(self, authorization: str | None) -> None:
        """Raise 401 unless auth is off or the header is ``Bearer <key>`` with the right key."""
        if self._key_digest is None:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(401, f"missing or malformed Authorization header; send 'Authorization: Bearer <key>' "
                                    f"with the key the server was started with ({API_KEY_ENV})")
        if not hmac.compare_digest(api_key_digest(token.strip()), self._key_digest):
            raise RequestError(401, "invalid API key in the Authorization header")

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

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.predictor.model_id}

    def model_card(self) -> dict[str, Any]:
        return self.predictor.card


# --- deployment settings ------------------------------------------------------------------------

def serve_config_from_dict(raw: Mapping[str, Any]) -> ServeConfig:
    """A validated ServeConfig from plain data (strings from `serve run k=v` are coerced)."""
    from distill_ray import config as config_module

    # config._build is the validator every config section goes through (types, choices, ranges).
    return config_module._build(ServeConfig, dict(raw), "serve")


MIN_ONGOING_REQUESTS = 64
"""Serve's default max_ongoing_requests (5) starves batching, and requests over the limit wait in the
proxy's router with backoff: with max_batch_size=1 and a limit of 8, 64 concurrent clients got 8 QPS
instead of ~125 on the bench machine. A replica here queues cheaply, so the floor is generous."""


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options for the student. ``max_ongoing_requests`` is at least twice the
    batch size so one batch can fill while the previous one runs, and never below MIN_ONGOING_REQUESTS."""
    return {"num_replicas": cfg.num_replicas,
            "max_ongoing_requests": max(2 * cfg.max_batch_size, MIN_ONGOING_REQUESTS),
            "ray_actor_options": {"num_cpus": 1}}


def batch_wait_timeout_s(cfg: ServeConfig) -> float:
    """The wait for more inputs before a partial batch runs. Ray's batch queue waits it out even when
    the batch is already full at one input, so batching off (max_batch_size=1) means no wait."""
    return 0.0 if cfg.max_batch_size == 1 else cfg.batch_wait_timeout_s


APP_ARG_ALIASES = ("student_dir", "run_dir", "path")
APP_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ServeConfig) if f.name not in ("host", "port"))


def settings_from_app_args(args: Mapping[str, Any]) -> tuple[Path, ServeConfig]:
    """Student directory and ServeConfig from the args of ``serve run serve.app:build_app k=v ...`` or
    serve/config.yaml: ``student_dir`` (or run_dir/path), an optional ``config`` (an experiment YAML whose
    ``serve`` section is the base), and any ServeConfig field but host/port (those are Serve-wide
    http_options)."""
    args = dict(args)
    given = [k for k in APP_ARG_ALIASES if k in args]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of {', '.join(APP_ARG_ALIASES)} (the run or student directory); got "
                         f"{given or 'none'}")
    student_dir = resolve_student_dir(args.pop(given[0]))
    base: dict[str, Any] = {}
    if args.get("config"):
        from distill_ray.config import config_to_dict, load_config

        base = config_to_dict(load_config(args.pop("config")).serve)
    args.pop("config", None)
    unknown = [k for k in args if k not in APP_CONFIG_KEYS]
    if unknown:
        raise ValueError(f"unknown app argument(s) {', '.join(unknown)}; allowed: {', '.join(APP_ARG_ALIASES)}, "
                         f"config, {', '.join(APP_CONFIG_KEYS)} (host and port go in http_options)")
    try:
        return student_dir, serve_config_from_dict({**base, **args})
    except ConfigError as err:
        raise ValueError(str(err)) from None


# --- launching ----------------------------------------------------------------------------------

def _import_serve_app():
    """The ``serve.app`` module (the deployment). serve/ sits beside distill_ray/ in the repository and
    is not packaged, so when it is not importable from sys.path the repository root is added."""
    try:
        return importlib.import_module("serve.app")
    except ModuleNotFoundError as err:
        repo_root = Path(__file__).resolve().parents[1]
        if err.name not in ("serve", "serve.app") or not (repo_root / "serve" / "app.py").is_file():
            raise
        sys.path.insert(0, str(repo_root))
        return importlib.import_module("serve.app")


def url_for(host: str, port: int) -> str:
    """The URL a client on this machine uses: wildcard binds are reached over loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def wait_until_healthy(url: str, timeout_s: float = 30.0, headers: Mapping[str, str] | None = None) -> dict:
    """Poll ``GET url/healthz`` until it answers 200; raise with the last problem after ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/healthz", headers=dict(headers or {}), timeout=2.0)
            if reply.status_code == 200:
                return reply.json()
            problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}: {err}"
        time.sleep(0.25)
    raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s ({problem}). If Serve was "
                       "already running on this Ray cluster with other HTTP options, they were kept: run "
                       "`serve shutdown` (or serve.shutdown()) first, or use that host/port")


def start_serve(path: str | Path, host: str | None = None, port: int | None = None,
                serve_config: ServeConfig | None = None, blocking: bool = True) -> str:
    """Serve a student (run directory or student directory) over HTTP with Ray Serve; return its URL.

    Connects to the running Ray if this process already initialised it, otherwise ``ray.init()``
    (which joins a local ``ray start`` cluster when there is one). ``host``/``port`` default to
    ``serve_config``'s (127.0.0.1:8000); the rest of ``serve_config`` (replicas, batching, limits,
    quantize) configures the deployment. With ``DISTILL_RAY_API_KEY`` set in this process, /predict
    and /model need ``Authorization: Bearer <key>``. ``blocking=True`` waits until Ctrl-C, then
    deletes the application (and shuts Ray down if this call started it).
    """
    cfg = serve_config or ServeConfig()
    cfg = dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port)
    student_dir = resolve_student_dir(path)  # fail before starting anything

    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(log_to_driver=blocking)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = _import_serve_app().build_student_app(student_dir, cfg, api_key_sha256=env_api_key_digest())
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = url_for(cfg.host, cfg.port)
    health = wait_until_healthy(url)
    auth = f" (auth: Bearer key from {API_KEY_ENV})" if env_api_key_digest() else ""
    print(f"Serving {health.get('model')} at {url}{auth}: POST {url}/predict, GET {url}/healthz, GET {url}/model",
          flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("Stopping the student deployment", flush=True)
        finally:
            serve.delete(APP_NAME)
            if started_ray:
                ray.shutdown()
    return url
