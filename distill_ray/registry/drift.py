"""Drift of a served student: the predicted-class mix it serves against its validation split's class mix.

The serving deployment counts its answers in the Prometheus counter ``distill_student_predictions_total``
(tags ``predicted_class`` and ``model_version``; Ray's metrics agent exports it with a ``ray_`` prefix,
so both names are read). The distance is the total variation distance,

    TV(p, q) = 1/2 * sum_k |p_k - q_k|,   in [0, 1],

the largest difference in probability the two mixes give any set of classes: 0.2 means some set of
classes is predicted 20 points more (or less) often than it occurs in the validation split. It needs
no smoothing for a class never predicted (PSI does) and reads as a share. A version is flagged when
TV exceeds the threshold (``registry.drift_threshold``, 0.2) once it has served enough predictions
(``registry.drift_min_predictions``, 100) for the mix to mean something. Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Mapping

PREDICTIONS_METRIC = "distill_student_predictions_total"
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Drift:
    distance: float
    """Total variation distance between the served mix and the validation mix."""
    threshold: float
    predictions: int
    """Served predictions the mix is made of."""
    min_predictions: int
    served: Mapping[str, float]
    expected: Mapping[str, float]

    @property
    def judged(self) -> bool:
        """Enough predictions were served for a verdict."""
        return self.predictions >= self.min_predictions

    @property
    def drifted(self) -> bool:
        return self.judged and self.distance > self.threshold

    def line(self) -> str:
        if not self.judged:
            return f"drift: {self.predictions} predictions served, fewer than {self.min_predictions}: no verdict"
        verdict = "DRIFT" if self.drifted else "ok"
        return (f"drift: {verdict}, total variation {self.distance:.3f} (threshold {self.threshold:g}) over "
                f"{self.predictions} predictions")


def predictions_by_class(metrics_text: str, model_versions: Iterable[str]) -> dict[str, float]:
    """Predicted class -> count, summed over every series (replica, route...) of the predictions counter
    whose ``model_version`` is one of ``model_versions``."""
    wanted = set(model_versions)
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if m is None or m["name"] not in (PREDICTIONS_METRIC, f"ray_{PREDICTIONS_METRIC}"):
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(m["labels"] or "")}
        if labels.get("model_version") not in wanted or "predicted_class" not in labels:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        counts[labels["predicted_class"]] = counts.get(labels["predicted_class"], 0.0) + value
    return counts


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """1/2 * sum over the union of classes of |p_k - q_k| (a class missing from one counts as 0 there)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def drift(served_counts: Mapping[str, float], expected_mix: Mapping[str, float], threshold: float,
          min_predictions: int) -> Drift:
    """The served counts (class name or index -> count) against the expected mix (class name -> share).
    A served class given by index (``"3"``) is read as the expected mix's 4th class name."""
    names = list(expected_mix)
    named: dict[str, float] = {}
    for cls, n in served_counts.items():
        key = names[int(cls)] if cls not in expected_mix and cls.isdigit() and int(cls) < len(names) else cls
        named[key] = named.get(key, 0.0) + n
    total = sum(named.values())
    served = {k: v / total for k, v in named.items()} if total else {}
    return Drift(distance=total_variation(served, expected_mix) if total else 0.0, threshold=threshold,
                 predictions=int(total), min_predictions=min_predictions, served=served, expected=dict(expected_mix))


def fetch_metrics(url: str, timeout_s: float = 10.0) -> str:
    """The Prometheus text at ``url`` (Ray's metrics export port, e.g. http://127.0.0.1:8080/metrics)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--metrics-url {url!r}: give an http(s) URL of a Prometheus endpoint")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, checked above)
        return response.read().decode("utf-8", errors="replace")
