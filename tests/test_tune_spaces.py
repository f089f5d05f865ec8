"""Search-space files and the model registry: pure, no Ray started."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_ray.config import ConfigError, config_to_dict, load_config
from distill_ray.tune.space import load_space, trial_config

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


@pytest.fixture(scope="module")
def base():
    return load_config(REPO / "jobs/configs/tiny.yaml")


def _base_for(path: Path, base):
    """The on-policy space is for language models: its base is the tiny instruction config."""
    return load_config(REPO / "jobs/configs/tiny_instruct.yaml") if path.stem == "on_policy" else base


def test_the_three_required_spaces_ship():
    assert {p.stem for p in SPACES} >= {"kd_basic", "curriculum", "blend"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_loads_and_each_bound_gives_a_valid_config(path, base):
    base = _base_for(path, base)
    space = load_space(path, base)
    assert space.params
    for key, kind, args in space.params:
        sampled = {k: a[0] for k, _, a in space.params}
        sampled[key] = args[-1]
        cfg = trial_config(config_to_dict(base), space, sampled)
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == (tuple(args[-1]) if isinstance(args[-1], list) else args[-1])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_a_typo_in_a_path_names_the_closest_valid_key(tmp_path, base):
    with pytest.raises(ConfigError) as err:
        load_space(_write(tmp_path, "params:\n  loss.temprature: {uniform: [1, 4]}\n"), base)
    assert "temprature" in str(err.value) and "loss.temperature" in str(err.value)


@pytest.mark.parametrize("text, needle", [
    ("params:\n  loss.alpha: {gaussian: [0, 1]}\n", "uniform"),
    ("params:\n  loss.alpha: {uniform: [0.9, 0.1]}\n", "low < high"),
    ("params:\n  loss.temperature: {loguniform: [0, 4]}\n", "low > 0"),
    ("params:\n  loss.kind: {choice: [forward_kl, telepathy]}\n", "telepathy"),
    ("params:\n  loss.alpha: {uniform: [0.1, 1.5]}\n", "loss.alpha"),
    ("params: {}\n", "non-empty"),
    ("parms:\n  loss.alpha: {uniform: [0.1, 0.9]}\n", "params"),
])
def test_bad_spaces_fail_before_ray_with_the_reason(tmp_path, base, text, needle):
    with pytest.raises(ConfigError) as err:
        load_space(_write(tmp_path, text), base)
    assert needle in str(err.value)


def test_fixed_overrides_apply_to_every_trial(tmp_path, base):
    space = load_space(_write(tmp_path, "fixed:\n  curriculum.scheduler: linear_ramp\n"
                                        "params:\n  loss.temperature: {uniform: [1, 4]}\n"), base)
    cfg = trial_config(config_to_dict(base), space, {"loss.temperature": 3.5})
    assert cfg.curriculum.scheduler == "linear_ramp" and cfg.loss.temperature == 3.5


