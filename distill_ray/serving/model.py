"""The model side of serving: find and load a student, optionally int8, and answer a batch.

``StudentPredictor`` loads a student (or run, or registry entry) directory with
``models.load_model`` (safetensors, no pickle), optionally quantizes its linear layers to int8, and
turns a batch of inputs into class probabilities; ``GeneratorPredictor`` does the same for
causal-LM students and generates text. No Ray, no HTTP.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from distill_ray.data.chat import render_chat_prompt
from distill_ray.models import SPEC_FILE, WEIGHTS_FILE, forward_logits, is_hf_model, load_model
from distill_ray.serving.schemas import GenerateRequest, InputSchema

CARD_FILE = "distill_card.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_MAX_LENGTH = 128


class StudentLoadError(RuntimeError):
    """The path is not a loadable student: missing, not a student/run directory, or corrupt files."""


# --- the student directory ----------------------------------------------------------------------

def resolve_student_dir(path: str | Path) -> Path:
    """The student directory for a registered version (``models:/NAME@ALIAS`` or ``models:/NAME/N`` of
    MLflow's registry, downloaded once into the local cache), a run directory (``RUN_DIR/student``), a
    0.2 file registry entry (``registry/NAME`` -> its ``latest`` version) or a student directory itself."""
    if str(path).startswith("models:/"):
        from distill_ray.registry.store import RegistryError, resolve_model_uri

        try:
            return resolve_model_uri(str(path))
        except (RegistryError, OSError) as err:
            raise StudentLoadError(f"{path}: {err}") from None
    path = Path(path).expanduser()
    if not path.exists():
        raise StudentLoadError(f"{path} does not exist; pass a run directory (holding student/), a student "
                               f"directory (holding {SPEC_FILE}) or models:/NAME@ALIAS")
    if (path / SPEC_FILE).is_file():
        return path.resolve()
    if (path / "student" / SPEC_FILE).is_file():
        return (path / "student").resolve()
    if (path / "latest").is_file():  # a 0.2 file registry entry (registry/NAME): serve its latest version
        from distill_ray.registry.legacy import resolve_registry

        try:
            version = resolve_registry(path)
        except FileNotFoundError as err:
            raise StudentLoadError(str(err)) from None
        if (version / SPEC_FILE).is_file():
            return version.resolve()
        raise StudentLoadError(f"{path}/latest points at {version.name!r}, which holds no {SPEC_FILE}")
    raise StudentLoadError(f"{path} is not a student directory: no {SPEC_FILE} in it or in {path / 'student'}; "
                           f"pass a run directory (holding student/), a registered version (models:/NAME@champion, "
                           f"models:/NAME/3) or a directory written by models.save_model")


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


def load_student_model(student_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
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


# --- causal LMs: generation ----------------------------------------------------------------------

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
        card = read_card(student_dir)
        self.model_id = f"{card.get('name', student_dir.name)}@{card.get('version', 'unversioned')}"
        self.card = {**card, "quantized": None, "model": self.model_id, "task": "causal_lm"}

    def prompt_texts(self, request: GenerateRequest) -> list[str]:
        """What the student continues from, written as in its training: ``messages`` rendered with its
        chat template; a plain prompt as written, or, for a student trained on chat turns
        (``data.messages_field``), as one user turn rendered the same way."""
        if request.conversations:
            return [render_chat_prompt(self.tokenizer, [{"role": r, "content": c} for r, c in conversation])
                    for conversation in request.conversations]
        if self.spec.get("prompt_format") == "chat":
            return [render_chat_prompt(self.tokenizer, [{"role": "user", "content": p}]) for p in request.prompts]
        return list(request.prompts)

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        """The request's prompts answered together (``generation.batched_responses``, left-padded),
        greedy at temperature 0; each stops at the tokenizer's eos or ``max_new_tokens``."""
        from distill_ray.lm.generation import batched_responses

        # No special tokens added: training tokenized prompts without them (a WordPiece tokenizer would
        # otherwise wrap each prompt in [CLS] ... [SEP], which the student never saw before a response).
        prompts = self.tokenizer(self.prompt_texts(request), truncation=True, add_special_tokens=False,
                                 max_length=int(getattr(self.model.config, "max_position_embeddings", 512))
                                 - request.max_new_tokens)["input_ids"]
        sampling = request.temperature > 0
        # A fresh draw per request, as sampling should be, yet one torch.manual_seed still repeats it.
        seeds = torch.randint(2**62, (len(prompts),)).tolist() if sampling else None
        responses = batched_responses(self.model, prompts, request.max_new_tokens, self.tokenizer.eos_token_id,
                                      self.tokenizer.pad_token_id, temperature=request.temperature if sampling else None,
                                      seeds=seeds)
        return {"generations": self.tokenizer.batch_decode(responses, skip_special_tokens=True),
                "model": self.model_id}


# --- classifiers: class probabilities -------------------------------------------------------------

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
        model, self.spec = loaded or load_student_model(self.student_dir)
        self.quantized = normalize_quantize(quantize)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = quantize_int8(model) if self.quantized == "int8" else model
        self.tokenizer = self._load_tokenizer() if has_tokenizer(self.student_dir) else None
        self.num_classes = self._num_classes()
        self.max_length = self._max_length()
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

    def _max_length(self) -> int:
        """Tokens kept per text: the spec's ``max_length``, else the padded length the student was trained
        at (a text student's ``input_shape``), else the tokenizer's ``model_max_length`` (``save_tokenizer``
        records it), else DEFAULT_MAX_LENGTH. Longer than trained would cost time and change answers."""
        given = (self.spec.get("options") or {}).get("max_length") or self.spec.get("max_length")
        if given:
            return int(given)
        shape = self.spec.get("input_shape")
        if shape and self._is_text_student():
            return int(shape[-1])
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
        if tokenizer_max and tokenizer_max < 100_000:  # unset ones read as 1e30
            return int(tokenizer_max)
        return DEFAULT_MAX_LENGTH

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
            from distill_ray.data.rows import apply_standardise

            x = apply_standardise(x.reshape(len(x), -1), self.transform)
        return torch.as_tensor(x).reshape(len(x), *self.schema.input_shape)

    def _token_ids(self, item: str | Sequence[int]) -> list[int]:
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError("this student has no tokenizer; pass token id lists, not text")
            return self.tokenizer(item, truncation=True, max_length=self.max_length)["input_ids"]
        return [int(t) for t in item][: self.max_length]

    def _token_rows(self, batch_inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """``_token_ids`` of every input, the texts tokenized in one call (the fast tokenizer's batch path)."""
        texts = [item for item in batch_inputs if isinstance(item, str)]
        if not texts or self.tokenizer is None:
            return [self._token_ids(item) for item in batch_inputs]
        encoded = iter(self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"])
        return [next(encoded) if isinstance(item, str) else self._token_ids(item) for item in batch_inputs]

    def _text_logits(self, batch_inputs: Sequence[str | Sequence[int]]) -> torch.Tensor:
        rows = self._token_rows(batch_inputs)
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


