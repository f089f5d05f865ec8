"""What a student was made from, as fingerprints that can be recomputed later, so a registered version
can tell when its teachers or data changed under it.

- each teacher: its directory and ``models.fingerprint`` of its weights (the sha256 the soft-target
  cache keys its targets by, so the registry and the cache agree on what "the same teacher" means);
- the data: ``sources.data_files_fingerprint`` (the data config and its files' path, size and mtime,
  computed without reading a row or starting Ray);
- the validation split's class mix (classification), what serving drift is measured against.

A run writes them as ``RUN_DIR/lineage.json`` at its end (``pipeline``); a run without one (older runs,
an imported file registry) gets what its config names: teachers with a ``path`` (a recipe teacher
without one lives in the distill-ray cache under a key of its data, found only by a run). No MLflow here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from distill_ray.config import ExperimentConfig

LINEAGE_FILE = "lineage.json"
MISSING = "missing"
"""The fingerprint of a teacher directory that is not there (or not loadable) any more."""


@dataclass(frozen=True)
class Lineage:
    teacher_paths: Mapping[str, str] = field(default_factory=dict)
    """Teacher name -> the directory its weights were read from."""
    teacher_fingerprints: Mapping[str, str] = field(default_factory=dict)
    """Teacher name -> ``models.fingerprint`` of those weights when the student was trained."""
    data_fingerprint: str = ""
    """``sources.data_files_fingerprint`` of the config's data; empty when it could not be computed."""
    val_class_counts: tuple[int, ...] = ()
    """Labeled validation rows per class (classification); empty when unknown."""
    class_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_paths": dict(self.teacher_paths), "teacher_fingerprints": dict(self.teacher_fingerprints),
                "data_fingerprint": self.data_fingerprint, "val_class_counts": list(self.val_class_counts),
                "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Lineage":
        return cls(teacher_paths=dict(d.get("teacher_paths") or {}),
                   teacher_fingerprints=dict(d.get("teacher_fingerprints") or {}),
                   data_fingerprint=str(d.get("data_fingerprint") or ""),
                   val_class_counts=tuple(int(n) for n in d.get("val_class_counts") or ()),
                   class_names=tuple(str(n) for n in d.get("class_names") or ()))

    def val_class_mix(self) -> dict[str, float]:
        """Class name -> share of the labeled validation rows ({} when unknown)."""
        total = sum(self.val_class_counts)
        if not total:
            return {}
        names = self.class_names or tuple(str(i) for i in range(len(self.val_class_counts)))
        return {names[i]: n / total for i, n in enumerate(self.val_class_counts)}


def teacher_fingerprint(path: str | Path) -> str:
    """``models.fingerprint`` of the model in ``path``; ``MISSING`` when it is gone or unreadable."""
    from distill_ray.models import fingerprint, load_model

    try:
        return fingerprint(load_model(Path(path).expanduser())[0])
    except (OSError, ValueError, RuntimeError, KeyError):
        return MISSING


def configured_teacher_paths(cfg: ExperimentConfig) -> dict[str, str]:
    """The teacher directories a config names itself (every teacher with a ``path``)."""
    from distill_ray.data.bundled import smollm2_path

    return {t.name: str(smollm2_path() if t.path == "smollm2" else Path(t.path).expanduser().resolve())
            for t in cfg.teachers if t.path}


def current_data_fingerprint(cfg: ExperimentConfig) -> str:
    from distill_ray.data.sources import data_files_fingerprint

    return data_files_fingerprint(cfg)


def run_lineage(cfg: ExperimentConfig, teacher_dirs: Mapping[str, Path], val_class_counts=(),
                class_names=()) -> Lineage:
    """A run's lineage, from the teacher directories it used (``prepare_teachers``)."""
    paths = {name: str(Path(p).resolve()) for name, p in teacher_dirs.items()}
    return Lineage(teacher_paths=paths, teacher_fingerprints={n: teacher_fingerprint(p) for n, p in paths.items()},
                   data_fingerprint=current_data_fingerprint(cfg),
                   val_class_counts=tuple(int(n) for n in val_class_counts),
                   class_names=tuple(str(n) for n in class_names))


def write_lineage(run_dir: Path, lineage: Lineage) -> Path:
    path = Path(run_dir) / LINEAGE_FILE
    path.write_text(json.dumps(lineage.to_dict(), indent=2, sort_keys=True))
    return path


def lineage_of_run(run_dir: Path | None, cfg: ExperimentConfig | None) -> Lineage:
    """``RUN_DIR/lineage.json`` when the run wrote one, else what ``cfg`` names (see the module docstring)."""
    if run_dir is not None and (Path(run_dir) / LINEAGE_FILE).is_file():
        return Lineage.from_dict(json.loads((Path(run_dir) / LINEAGE_FILE).read_text()))
    if cfg is None:
        return Lineage()
    try:
        data = current_data_fingerprint(cfg)
    except (OSError, ValueError, RuntimeError):  # the data is gone or unreadable: nothing to record
        data = ""
    paths = configured_teacher_paths(cfg)
    return Lineage(teacher_paths=paths, teacher_fingerprints={n: teacher_fingerprint(p) for n, p in paths.items()},
                   data_fingerprint=data)


def changes_since(recorded: Lineage, cfg: ExperimentConfig | None) -> list[str]:
    """What differs between ``recorded`` and now, one line each: a teacher's weights (recomputed at the
    recorded directory), and the data's fingerprint (recomputed from ``cfg``, the config the version
    was trained from). [] when nothing changed or nothing was recorded to compare."""
    from distill_ray.cache.files import abbreviated

    lines = []
    for name, path in sorted(recorded.teacher_paths.items()):
        was, now = recorded.teacher_fingerprints.get(name, ""), teacher_fingerprint(path)
        if was and now != was:
            lines.append(f"teacher {name!r} ({path}): " + ("its directory is gone or unreadable" if now == MISSING
                         else f"weights changed, fingerprint {abbreviated(was)} -> {abbreviated(now)}"))
    if recorded.data_fingerprint and cfg is not None:
        try:
            now = current_data_fingerprint(cfg)
        except (OSError, ValueError, RuntimeError) as err:
            now = f"unreadable ({err})"
        if now != recorded.data_fingerprint:
            lines.append(f"data ({cfg.data.format}: {cfg.data.path or 'preset'}): files or data config changed, "
                         f"fingerprint {recorded.data_fingerprint} -> {now}")
    return lines
