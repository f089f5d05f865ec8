"""The file registry of 0.2 (``registry/NAME/vN`` directories and a ``latest`` pointer file), read
only: its entries still serve when given as paths, and ``import_file_registry`` moves their versions
into MLflow's registry in order (``distill-ray registry import registry/NAME``). Nothing writes one any more."""

from __future__ import annotations

import json
from pathlib import Path

from distill_ray.config import ConfigError, config_from_dict


def file_versions(model_root: str | Path) -> list[Path]:
    """``model_root``'s version directories, oldest first (v2 before v10)."""
    root = Path(model_root)
    found = [p for p in root.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[1:]))


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


def import_file_registry(model_root: str | Path, name: str | None = None, tracking_uri: str | None = None) -> list[int]:
    """Register every ``vN`` of a file registry entry, oldest first, as versions of ``name`` (default: the
    entry's directory name); the one ``latest`` pointed at becomes ``champion`` (``challenger`` when the
    name already has a champion in MLflow), the others get no alias. Returns the new version numbers.
    A version whose card holds its config (sweep winners) records that config's lineage."""
    from distill_ray.registry.store import CHALLENGER, CHAMPION, client_for, register, tracking_uri_for, versions

    model_root = Path(model_root).expanduser().resolve()
    found = file_versions(model_root)
    if not found:
        raise FileNotFoundError(f"{model_root}: no vN version directories; pass a file registry entry (registry/NAME)")
    latest = resolve_registry(model_root).name if (model_root / "latest").is_file() else found[-1].name
    name = name or model_root.name
    uri = tracking_uri or tracking_uri_for()
    try:
        had_champion = any(CHAMPION in v.aliases for v in versions(name, uri))
    except ValueError:  # no such registered model yet
        had_champion = False
    numbers, latest_number = [], None
    for vdir in found:
        card = json.loads((vdir / "distill_card.json").read_text()) if (vdir / "distill_card.json").is_file() else {}
        try:
            cfg = config_from_dict(card["config"]) if isinstance(card.get("config"), dict) else None
        except ConfigError:  # a config of an older release: the student is imported without it
            cfg = None
        number = register(vdir, name, run_dir=None, cfg=cfg, tracking_uri=uri, alias=None,
                          extra_tags={"distill.imported_from": str(vdir)})
        numbers.append(number)
        if vdir.name == latest:
            latest_number = number
    if latest_number is not None:
        client_for(uri).set_registered_model_alias(name, CHALLENGER if had_champion else CHAMPION, str(latest_number))
    return numbers
