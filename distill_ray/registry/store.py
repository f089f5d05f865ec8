"""Students in MLflow's Model Registry: each registered version is an MLflow run that carries how it
was made, plus a model version pointing at the run's ``student/`` artifact directory.

Why MLflow: a registry people already run (a local SQLite file needs no server; a team points
``registry.tracking_uri`` at its tracking server), aliases instead of a ``latest`` file, and ``mlflow ui``
to browse runs and versions. A version is a plain artifact directory (the student as ``models.save_model``
wrote it: safetensors + JSON), not an MLflow pyfunc flavor: the Serve app loads students with
``models.load_model`` already, a pyfunc wrapper would pickle a Python class into the registry, and
nothing here would call it.

One registration logs an MLflow run in the experiment ``distill-ray/NAME``:

- params: the flattened config (``loss.temperature``, ``teachers.0.name``...);
- metrics: the numbers of ``metrics.json`` (flattened: ``student``, ``teachers.mlp_a``...);
- artifacts: ``student/``, ``config.yaml``, ``distill_card.json``, ``lineage.json``;
- tags (on the run and the version): each teacher's fingerprint and directory, the data fingerprint,
  the source directory (``registry/lineage.py``).

Aliases: the first version of a name becomes ``champion``, later ones ``challenger``; ``promote`` moves
``champion`` on and keeps the one before as ``previous``, so ``rollback`` can move it back.

The store: ``registry.tracking_uri``, else MLFLOW_TRACKING_URI, else ``sqlite:///RUN_ROOT/mlflow.db`` with
artifacts beside it in ``RUN_ROOT/mlartifacts``. mlflow is imported only here and only when called
(its import takes seconds; extra ``registry``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from distill_ray.config import ExperimentConfig, config_to_dict, dump_config, load_config
from distill_ray.registry.lineage import LINEAGE_FILE, Lineage, lineage_of_run

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
TAG = "distill."
"""Prefix of every tag this module sets."""
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")
"""Files a downloaded version must not hold: a student is safetensors + JSON, nothing is unpickled."""
_PARAM_MAX = 6000  # MLflow's limit on a param value's length
_TAG_MAX = 7500  # and under its limit on a tag value's (8000)


class RegistryError(ValueError):
    """A registry request that cannot be met: unknown name, version or alias, nothing to promote."""


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    aliases: tuple[str, ...]
    run_id: str
    source: str
    tags: Mapping[str, str]

    @property
    def lineage(self) -> Lineage:
        return Lineage.from_dict(json.loads(self.tags.get(f"{TAG}lineage", "{}")))

    def key_metric(self) -> str:
        name, value = self.tags.get(f"{TAG}metric", ""), self.tags.get(f"{TAG}metric_value", "")
        return f"{name}={float(value):.4f}" if name and value else "-"


# --- the store --------------------------------------------------------------------------------------

def tracking_uri_for(run_root: str | Path = "runs", configured: str | None = None) -> str:
    """``configured`` (registry.tracking_uri), else MLFLOW_TRACKING_URI, else the SQLite file under the
    run root (an absolute path: a Serve replica or a job may run from another directory)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(run_root).expanduser().resolve() / DB_FILE)}"


def tracking_uri_of(cfg: ExperimentConfig) -> str:
    return tracking_uri_for(cfg.run_dir, cfg.registry.tracking_uri)


def _mlflow():
    from distill_ray.extras import require

    return require("mlflow", "the model registry")


def client_for(tracking_uri: str):
    mlflow = _mlflow()
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(client, tracking_uri: str, experiment: str) -> str:
    """The experiment's id, created on first use; with a SQLite store its artifacts go to
    ``mlartifacts/`` beside the database (MLflow's default would be ./mlruns of whatever directory
    the process runs in)."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).as_uri()
    return client.create_experiment(experiment, artifact_location=location)


# --- registering ------------------------------------------------------------------------------------

def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as one level of dotted keys (``teachers.0.name``)."""
    if isinstance(data, Mapping):
        items = data.items()
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in data):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of ``metrics.json`` flattened (booleans and strings left out)."""
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run_dir_of(student_dir: Path) -> Path | None:
    """The run directory around a student (``RUN_DIR/student``), when there is one."""
    parent = student_dir.parent
    return parent if student_dir.name == "student" and (parent / "config.yaml").is_file() else None


def _key_metric(card: Mapping[str, Any]) -> tuple[str, float] | None:
    for name, value in (card.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, float(value)
    return None


def _version_tags(lineage: Lineage, card: Mapping[str, Any], source: str) -> dict[str, str]:
    text = json.dumps(lineage.to_dict(), sort_keys=True)
    if len(text) > _TAG_MAX:  # many classes: the class mix stays in the run's lineage.json only
        text = json.dumps(replace(lineage, val_class_counts=(), class_names=()).to_dict(), sort_keys=True)
    tags = {f"{TAG}lineage": text, f"{TAG}source": source,
            f"{TAG}data_fingerprint": lineage.data_fingerprint or "unknown"}
    for name, fp in lineage.teacher_fingerprints.items():
        tags[f"{TAG}teacher.{name}.fingerprint"] = fp
        tags[f"{TAG}teacher.{name}.path"] = lineage.teacher_paths.get(name, "")
    metric = _key_metric(card)
    if metric:
        tags[f"{TAG}metric"], tags[f"{TAG}metric_value"] = metric[0], repr(metric[1])
    return tags


def register(student_dir: str | Path, name: str, run_dir: str | Path | None = None,
             cfg: ExperimentConfig | None = None, tracking_uri: str | None = None, alias: str | None = "auto",
             extra_tags: Mapping[str, str] | None = None, lineage: Lineage | None = None) -> int:
    """Log ``student_dir`` with how it was made as an MLflow run and register it as a new version of
    ``name``; returns the version number.

    ``run_dir``: the run that made it (default: the student's parent when that holds config.yaml);
    its config.yaml, metrics.json, distill_card.json and lineage.json are recorded. ``cfg``: the config,
    when there is no run directory (a sweep's winner). ``lineage``: recorded by the caller (a sweep),
    else the run's lineage.json or what the config names. ``alias``: ``auto`` = champion for a name's first
    version, challenger after; or an alias to set; or None for none."""
    from distill_ray.models import SPEC_FILE

    student_dir = Path(student_dir).expanduser().resolve()
    if not (student_dir / SPEC_FILE).is_file():
        raise RegistryError(f"{student_dir}: not a student directory (no {SPEC_FILE}); pass RUN_DIR/student")
    run_dir = Path(run_dir).expanduser().resolve() if run_dir else _run_dir_of(student_dir)
    if cfg is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml")
    tracking_uri = tracking_uri or (tracking_uri_of(cfg) if cfg is not None else tracking_uri_for())
    card = _read_json(student_dir / "distill_card.json") or _read_json(run_dir / "distill_card.json" if run_dir else None)
    metrics = _read_json(run_dir / "metrics.json" if run_dir else None)
    lineage = lineage if lineage is not None else lineage_of_run(run_dir, cfg)
    tags = {**_version_tags(lineage, card, str(run_dir or student_dir)), **(extra_tags or {})}

    client = client_for(tracking_uri)
    run = client.create_run(experiment_id(client, tracking_uri, f"distill-ray/{name}"),
                            run_name=f"{name}-{run_dir.name if run_dir else student_dir.name}", tags=tags)
    run_id = run.info.run_id
    try:
        _log_run(client, run_id, cfg, metrics, card, lineage, student_dir)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    if not client.search_registered_models(filter_string=f"name = '{_quoted(name)}'"):
        client.create_registered_model(name, description=f"distill-ray students of {name}")
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/student", run_id=run_id, tags=tags)
    number = int(version.version)
    if alias == "auto":
        alias = CHALLENGER if CHAMPION in _aliases(client, name) else CHAMPION
    if alias:
        client.set_registered_model_alias(name, alias, str(number))
    return number


def _log_run(client, run_id: str, cfg: ExperimentConfig | None, metrics: Mapping[str, Any],
             card: Mapping[str, Any], lineage: Lineage, student_dir: Path) -> None:
    from mlflow.entities import Metric, Param

    params = [Param(k, str(v)[:_PARAM_MAX]) for k, v in sorted(flatten(config_to_dict(cfg)).items())] if cfg else []
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])
    values = [Metric(k, v, 0, 0) for k, v in sorted(numeric_metrics(metrics or card.get("metrics") or {}).items())]
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i:i + 1000])
    client.log_artifacts(run_id, str(student_dir), "student")
    with tempfile.TemporaryDirectory() as tmp:
        files = {"distill_card.json": json.dumps(card, indent=2, sort_keys=True),
                 LINEAGE_FILE: json.dumps(lineage.to_dict(), indent=2, sort_keys=True)}
        if cfg is not None:
            files["config.yaml"] = dump_config(cfg)
        for filename, text in files.items():
            (Path(tmp) / filename).write_text(text)
            client.log_artifact(run_id, str(Path(tmp) / filename))


def _read_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")


# --- reading, aliases ------------------------------------------------------------------------------

def _aliases(client, name: str) -> dict[str, int]:
    """Alias -> version number of a registered model; RegistryError when there is no such name."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model {name!r} in this tracking store; "
                            f"`distill-ray registry list` names none until a version is registered") from None
    return {alias: int(v) for alias, v in (model.aliases or {}).items()}


def versions(name: str, tracking_uri: str | None = None) -> list[Version]:
    """Every version of ``name``, oldest first, with its aliases and tags."""
    client = client_for(tracking_uri or tracking_uri_for())
    aliases = _aliases(client, name)
    by_version: dict[int, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    found = client.search_model_versions(filter_string=f"name = '{_quoted(name)}'")
    return sorted((Version(name=name, version=int(v.version), aliases=tuple(sorted(by_version.get(int(v.version), []))),
                           run_id=v.run_id, source=v.source, tags=dict(v.tags or {})) for v in found),
                  key=lambda v: v.version)


def get_version(name: str, ref: str | int, tracking_uri: str | None = None) -> Version:
    """Version ``ref`` (a number, or an alias) of ``name``."""
    all_versions = versions(name, tracking_uri)
    if str(ref).isdigit():
        match = [v for v in all_versions if v.version == int(ref)]
    else:
        match = [v for v in all_versions if str(ref) in v.aliases]
    if not match:
        known = ", ".join(f"{v.version}" + (f" ({', '.join(v.aliases)})" if v.aliases else "") for v in all_versions)
        raise RegistryError(f"{name}: no version {ref!r}; versions: {known or 'none'}")
    return match[0]


def promote(name: str, version: int | None = None, tracking_uri: str | None = None) -> tuple[int | None, int]:
    """Make ``version`` (default: the ``challenger``) the ``champion``; the champion before it becomes
    ``previous`` (for ``rollback``). Returns (old champion or None, new champion)."""
    client = client_for(tracking_uri or tracking_uri_for())
    aliases = _aliases(client, name)
    if version is None:
        if CHALLENGER not in aliases:
            raise RegistryError(f"{name}: no challenger to promote; give a version (distill-ray registry promote {name} N)")
        version = aliases[CHALLENGER]
    get_version(name, version, tracking_uri)  # an unknown version fails here, naming the ones there are
    old = aliases.get(CHAMPION)
    if old == version:
        raise RegistryError(f"{name}: version {version} is already the champion")
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(old))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if aliases.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return old, version


def rollback(name: str, tracking_uri: str | None = None) -> tuple[int, int]:
    """Swap ``champion`` and ``previous``: the champion before the last promotion serves again (and a
    second rollback undoes the first). Returns (old champion, new champion)."""
    client = client_for(tracking_uri or tracking_uri_for())
    aliases = _aliases(client, name)
    if PREVIOUS not in aliases:
        raise RegistryError(f"{name}: no previous champion to roll back to (nothing was promoted yet)")
    old, new = aliases[CHAMPION], aliases[PREVIOUS]
    client.set_registered_model_alias(name, CHAMPION, str(new))
    client.set_registered_model_alias(name, PREVIOUS, str(old))
    return old, new


def run_artifact_text(version: Version, path: str, tracking_uri: str | None = None) -> str | None:
    """The text of one artifact of the version's run (``config.yaml``, ``lineage.json``), None if absent."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=path, dst_path=tmp,
                                                        tracking_uri=tracking_uri or tracking_uri_for())
        except (MlflowException, OSError):
            return None
        return Path(local).read_text()


# --- models:/ URIs ---------------------------------------------------------------------------------

def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS); ``models:/NAME/3`` -> (NAME, "3")."""
    rest = uri[len("models:/"):] if uri.startswith("models:/") else ""
    if "@" in rest:
        name, ref = rest.rsplit("@", 1)
    elif "/" in rest:
        name, ref = rest.rsplit("/", 1)
        if not ref.isdigit():
            ref = ""
    else:
        name, ref = rest, ""
    if not name or not ref:
        raise RegistryError(f"{uri!r}: give models:/NAME@ALIAS (e.g. models:/quickstart@champion) or "
                            f"models:/NAME/VERSION (e.g. models:/quickstart/3)")
    return name, ref


def local_copy_dir(tracking_uri: str, name: str, version: int) -> Path:
    """Where a version's student is kept on this machine: one directory per store, name and version
    (a version's files never change, so a replica restart finds it there and downloads nothing)."""
    from distill_ray.data.bundled import cache_root

    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return cache_root() / "registry" / store / name / f"v{version}"


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> Path:
    """The local student directory of ``models:/NAME@ALIAS`` or ``models:/NAME/N``: the alias is looked
    up in the store each time (it moves), the files are downloaded once per version. A version holding
    a pickle-format file is refused (students are safetensors + JSON)."""
    from distill_ray.models import SPEC_FILE

    tracking_uri = tracking_uri or tracking_uri_for()
    name, ref = parse_model_uri(uri)
    version = get_version(name, ref, tracking_uri)
    out = local_copy_dir(tracking_uri, name, version.version)
    if (out / SPEC_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version.version}-", dir=out.parent))
    try:
        local = Path(_mlflow().artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp),
                                                            tracking_uri=tracking_uri))
        unsafe = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if unsafe:
            raise RegistryError(f"{uri} (version {version.version}) holds pickle-format files {unsafe}: refused; "
                                f"a student is safetensors + JSON")
        if not (local / SPEC_FILE).is_file():
            raise RegistryError(f"{uri} (version {version.version}): its artifacts hold no {SPEC_FILE}")
        card_path = local / "distill_card.json"
        card = _read_json(card_path)
        card.update(version=f"v{version.version}", registered_model=name)  # what Serve reports as the version
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        os.replace(local, out)  # whole or not at all: a concurrent replica sees no half-downloaded version
    except OSError:
        if not (out / SPEC_FILE).is_file():  # another process may have won the race; theirs is as good
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
