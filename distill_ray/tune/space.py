"""Search spaces: a YAML file naming config keys by dotted path (``loss.temperature``) with a
distribution each, validated against the base config, and the config one trial's sampled values give."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from distill_ray.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict, \
    set_path

SPACE_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")


@dataclass(frozen=True)
class SearchSpace:
    """``params``: dotted config path -> (kind, args); ``fixed``: overrides applied to every trial."""

    params: tuple[tuple[str, str, tuple], ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def to_tune(self) -> dict[str, Any]:
        from ray import tune

        makers = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                  "randint": lambda a: tune.randint(a[0], a[1] + 1),  # inclusive upper bound, as written
                  "choice": lambda a: tune.choice(list(a)), "grid": lambda a: tune.grid_search(list(a))}
        return {path: makers[kind](args) for path, kind, args in self.params}

    def sets(self, key: str) -> bool:
        """Whether trials may run another ``key`` than the base config's (a param or a fixed override)."""
        return any(k == key for k, _, _ in self.params) or any(k == key for k, _ in self.fixed)

    def has_grid(self) -> bool:
        return any(kind == "grid" for _, kind, _ in self.params)

    def grid_size(self) -> int:
        """Trials per sample: grid params multiply (Tune runs every grid point num_samples times)."""
        return math.prod(len(args) for _, kind, args in self.params if kind == "grid")


def load_space(path: str | Path, base: ExperimentConfig) -> SearchSpace:
    """Read and check a space file against ``base``: every path must be a config key, every bound
    and choice must give a valid config. Raises ConfigError naming the key (and the closest one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{path}: a space needs a non-empty 'params:' mapping of dotted config keys")
    unknown = set(raw) - {"params", "fixed", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: description, fixed, params")
    fixed = tuple((str(k), v) for k, v in (raw.get("fixed") or {}).items())
    base_raw = config_to_dict(base)
    params = []
    for key, spec in raw["params"].items():
        where = f"{path}: params.{key}"
        try:
            set_path(copy.deepcopy(base_raw), key, None)  # the path exists (else: did you mean ...)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}{_closest_path(str(key))}") from None
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(f'{k}: [...]' for k in SPACE_KINDS)}}}, "
                              f"got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list")
        if kind in RANGE_KINDS:
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
                raise ConfigError(f"{where}: {kind} needs [low, high] numbers with low < high, got {args}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args[0]}")
        params.append((str(key), kind, tuple(args)))
    space = SearchSpace(tuple(params), fixed, str(raw.get("description", "")))
    _check_values(space, base_raw, path)
    return space


def _closest_path(key: str) -> str:
    import difflib

    from distill_ray.config import valid_paths

    match = difflib.get_close_matches(key, valid_paths(), n=1, cutoff=0.6)
    return f"; closest valid key: '{match[0]}'" if match else ""


def _check_values(space: SearchSpace, base_raw: dict, path: Path) -> None:
    """Every bound and choice, with the fixed overrides, must make a valid config (fail before Ray)."""
    for key, kind, args in space.params:
        for value in args:
            overrides = [*space.fixed, *[(k, a[0]) for k, kd, a in space.params if k != key], (key, value)]
            try:
                config_from_dict(apply_overrides(base_raw, overrides))
            except ConfigError as err:
                raise ConfigError(f"{path}: params.{key}={value!r} gives an invalid config: {err}") from None


def trial_config(base_raw: Mapping[str, Any], space: SearchSpace, sampled: Mapping[str, Any]) -> ExperimentConfig:
    values = [(k, plain_value(v)) for k, v in sampled.items() if k in {p for p, _, _ in space.params}]
    return config_from_dict(apply_overrides(base_raw, [*space.fixed, *values]))


def plain_value(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python numbers (YAML and the config validator want those)."""
    return value.item() if hasattr(value, "item") else value
