"""``registry status``: which versions of a name are stale. A version is stale when a teacher's weights
or the data changed since it was trained (its recorded fingerprints against the ones recomputed now,
``lineage.changes_since``), or when what it serves drifted from its validation split's class mix
(``drift``, with a Prometheus endpoint). By default the versions holding an alias (the ones in use) are
checked; old versions without one would be stale forever once a teacher moves on."""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from distill_ray.config import ConfigError, ExperimentConfig, config_from_dict
from distill_ray.registry.drift import Drift, drift, predictions_by_class
from distill_ray.registry.lineage import LINEAGE_FILE, Lineage
from distill_ray.registry.store import Version, run_artifact_text, versions


@dataclass(frozen=True)
class VersionStatus:
    version: Version
    changes: tuple[str, ...]
    """What changed since it was trained, one line each."""
    drift: Drift | None
    """None without metrics, or without a recorded validation class mix."""

    @property
    def stale(self) -> bool:
        return bool(self.changes) or (self.drift is not None and self.drift.drifted)

    def lines(self) -> list[str]:
        v = self.version
        head = f"{v.name} v{v.version}" + (f" ({', '.join(v.aliases)})" if v.aliases else "")
        out = [f"{head}: {'STALE' if self.stale else 'ok'}"]
        out += [f"  {c}" for c in self.changes]
        if self.drift is not None:
            out.append(f"  {self.drift.line()}")
        return out


def version_config(version: Version, tracking_uri: str | None = None) -> ExperimentConfig | None:
    """The config the version was trained from (its run's config.yaml), None when it has none."""
    text = run_artifact_text(version, "config.yaml", tracking_uri)
    if text is None:
        return None
    try:
        return config_from_dict(yaml.safe_load(text) or {})
    except ConfigError:  # written by an older release: its data cannot be recomputed here
        return None


def model_version_labels(version: Version) -> set[str]:
    """The ``model_version`` tag values serving may report for this version (the card's ``vN``)."""
    return {f"v{version.version}", str(version.version), f"{version.name}/v{version.version}"}


def version_status(version: Version, tracking_uri: str | None = None, metrics_text: str | None = None,
                   threshold: float = 0.2, min_predictions: int = 100) -> VersionStatus:
    from distill_ray.registry.lineage import changes_since

    lineage = version.lineage
    changes = tuple(changes_since(lineage, version_config(version, tracking_uri)))
    mix = lineage.val_class_mix()
    if metrics_text is not None and not mix:  # too many classes for a tag: the run's lineage.json has them
        text = run_artifact_text(version, LINEAGE_FILE, tracking_uri)
        mix = Lineage.from_dict(json.loads(text)).val_class_mix() if text else {}
    found = None
    if metrics_text is not None and mix:
        found = drift(predictions_by_class(metrics_text, model_version_labels(version)), mix, threshold, min_predictions)
    return VersionStatus(version=version, changes=changes, drift=found)


def registry_status(name: str, tracking_uri: str | None = None, metrics_text: str | None = None,
                    threshold: float = 0.2, min_predictions: int = 100, every_version: bool = False) -> list[VersionStatus]:
    """Each aliased version's status (every version's with ``every_version``), oldest first."""
    return [version_status(v, tracking_uri, metrics_text, threshold, min_predictions)
            for v in versions(name, tracking_uri) if every_version or v.aliases]


RETRAINED_FROM = "distill.retrained_from"
"""Tag of a version trained by ``jobs/retrain_stale.py``: the version number it replaces."""


def needs_retraining(name: str, tracking_uri: str | None = None, every_version: bool = False) -> list[VersionStatus]:
    """The stale versions (teachers or data changed; drift alone does not retrain, it is a person's call)
    that no fresh retrained version answers yet: a version tagged ``distill.retrained_from=N`` whose own
    lineage still matches today's teachers and data already replaces N, so a scheduled job retrains
    each change once."""
    statuses = registry_status(name, tracking_uri, every_version=every_version)
    all_versions = versions(name, tracking_uri)
    out = []
    for s in statuses:
        if not s.changes:
            continue
        answers = [v for v in all_versions if v.tags.get(RETRAINED_FROM) == str(s.version.version)]
        if any(not version_status(v, tracking_uri).changes for v in answers):
            continue
        out.append(s)
    return out


def retrain_name(cfg: ExperimentConfig, status: VersionStatus) -> str:
    """A stable run name for retraining a version (no timestamp): the config's name, the version and a
    digest of the changes, so a later change trains in a fresh run directory, never resuming this one's
    checkpoints."""
    import hashlib

    digest = hashlib.sha256("\n".join(status.changes).encode()).hexdigest()[:8]
    return f"{cfg.name}-retrain-v{status.version.version}-{digest}"
