"""Build, save, load and fingerprint teachers and students. No Ray here.

Two families:
- transformers models (built from a config, or loaded from a local directory) are saved with
  ``save_pretrained`` (config.json + model.safetensors) and load with ``from_pretrained``;
- small torch architectures from ``ARCHS`` (for non-text data) are saved as ``model.safetensors``
  plus ``distill_spec.json`` naming the architecture and its options, and load with ``load_model``.
Either way nothing is unpickled: weights are safetensors, specs are JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

SPEC_FILE = "distill_spec.json"
WEIGHTS_FILE = "model.safetensors"


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU]* -> Linear. ``features`` is the last hidden layer (for hint losses)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """[Conv3x3 -> BN -> ReLU -> MaxPool]* -> Linear -> ReLU -> Linear, for [B, C, H, W] images."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN}


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


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int,
                options: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh model. ``transformer_encoder`` is a transformers ViT built from a config (image inputs)."""
    options = dict(options or {})
    options.pop("epochs", None)  # recipe settings ride along in the same mapping
    options.pop("lr", None)
    if arch == "transformer_encoder":
        from transformers import ViTForImageClassification

        return ViTForImageClassification(_vit_config(tuple(input_shape), num_classes, options))
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join([*ARCHS, 'transformer_encoder'])}")
    for key in ("hidden", "channels"):
        if key in options and isinstance(options[key], list):
            options[key] = tuple(options[key])
    try:
        return ARCHS[arch](tuple(input_shape), num_classes, **options)
    except TypeError as err:
        raise ValueError(f"bad options for architecture {arch!r}: {err}") from None


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def forward_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits for a batch whatever the family: transformers models return an output object."""
    if is_hf_model(model):
        return model(pixel_values=inputs).logits if inputs.dim() == 4 else model(input_ids=inputs).logits
    return model(inputs)


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


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model directory written by ``save_model`` (safetensors only, no pickle) and its spec."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{directory} is not a distill-ray model directory (no {SPEC_FILE})")
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
