"""What the two on-disk caches (``soft_targets``' soft targets, ``cache.responses``'s sequence-KD
responses) do alike with their files: publish a finished directory by rename, checksum files for the
manifest, and shorten fingerprints in messages. No Ray."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks


def publish_directory(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an old cache there: a concurrent reader sees the old
    cache, then none, then the new one, never a mix."""
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        if aside is not None and not target.exists():
            os.replace(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def abbreviated(value: Any) -> str:
    """Long fingerprints abbreviated the way people read them."""
    if isinstance(value, str):
        return value[:12] + "…" if len(value) > 16 else value
    return repr(value)
