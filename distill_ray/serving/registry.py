"""The file-based model registry: ``registry/NAME/vN`` directories and a ``latest`` pointer file,
each replaced atomically so a reader (the Serve app) never sees a half-written version."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def register(student_dir: Path, model_root: Path) -> Path:
    """Copy a student into ``model_root/vN`` (N = last + 1) and point ``model_root/latest`` at it.

    The copy lands under a temporary name and is renamed, and ``latest`` is a small text file replaced
    atomically, so a reader (the Serve app) never sees a half-written version."""
    model_root.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name[1:]) for p in model_root.glob("v*") if p.name[1:].isdigit()]
    version = f"v{max(versions, default=0) + 1}"
    tmp = model_root / f".{version}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(student_dir, tmp)
    card_path = tmp / "distill_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card["version"] = version
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    os.replace(tmp, model_root / version)
    pointer = model_root / ".latest.tmp"
    pointer.write_text(version + "\n")
    os.replace(pointer, model_root / "latest")
    return model_root / version


def resolve_registry(model_root: str | Path, version: str = "latest") -> Path:
    """``registry/NAME`` (+ version or ``latest``) -> the version's student directory."""
    model_root = Path(model_root)
    if version == "latest":
        pointer = model_root / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"{model_root}: no 'latest' pointer; is this a registry entry?")
        version = pointer.read_text().strip()
    path = model_root / version
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such registered version")
    return path
