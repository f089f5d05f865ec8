"""Config: loading, overrides with coercion, errors that name key/value/choices, YAML round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_ray import config as C
from distill_ray.config import ConfigError, apply_overrides, config_from_dict, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
SHIPPED_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))  # with the subfolders (firsttry/: the held-out check sets)

MINIMAL = {"name": "t", "teachers": [{"name": "a", "recipe": "cnn"}, {"name": "b", "recipe": "mlp"}]}


def build(*overrides):
    return config_from_dict(apply_overrides(MINIMAL, overrides))


def test_shipped_configs_exist():
    assert [p.name for p in SHIPPED_CONFIGS], "jobs/configs/ must ship at least one config"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_defaults_and_types():
    cfg = build()
    assert cfg.teacher_names() == ("a", "b")
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.curriculum.stage_temperatures == (1.0, 1.33, 1.67, 2.0)
    assert cfg.serve.host == "127.0.0.1"
    assert cfg.run_path() == Path("runs") / "t"


def test_config_is_frozen():
    cfg = build()
    with pytest.raises(Exception):
        cfg.loss.temperature = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("loss.temperature=4", lambda c: c.loss.temperature, 4.0),
        ("train.epochs=7", lambda c: c.train.epochs, 7),
        ("train.epochs=7.0", lambda c: c.train.epochs, 7),
        ("train.use_gpu=true", lambda c: c.train.use_gpu, True),
        ("train.use_gpu=no", lambda c: c.train.use_gpu, False),
        ("loss.topk=null", lambda c: c.loss.topk, None),
        ("loss.topk=20", lambda c: c.loss.topk, 20),
        ("curriculum.measurers=[teacher_ce, student_loss]", lambda c: c.curriculum.measurers,
         ("teacher_ce", "student_loss")),
        ("curriculum.measurers=teacher_ce,ensemble_entropy", lambda c: c.curriculum.measurers,
         ("teacher_ce", "ensemble_entropy")),
        ("teachers.1.num_cpus=0.25", lambda c: c.teachers[1].num_cpus, 0.25),
        ("teachers.a.replicas=2", lambda c: c.teachers[0].replicas, 2),
        ("teachers.b.options={hidden: [8]}", lambda c: c.teachers[1].options, {"hidden": [8]}),
        ("name=other", lambda c: c.name, "other"),
    ],
)
def test_overrides_are_coerced_to_the_field_type(override, getter, expected):
    value = getter(build(override))
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("loss.temprature=3", ["loss.temprature", "unknown key", "did you mean 'temperature'"]),
        ("lose.kind=js", ["lose", "did you mean 'loss'"]),
        ("loss.kind=forward_kll", ["loss.kind", "'forward_kll'", "forward_kl, reverse_kl", "did you mean 'forward_kl'"]),
        ("blend.kind=learned", ["blend.kind", "'learned'", "learned_global"]),
        ("loss.alpha=1.5", ["loss.alpha", "1.5", "<= 1"]),
        ("loss.temperature=0", ["loss.temperature", "> 0"]),
        ("train.epochs=two", ["train.epochs", "expected an integer", "'two'"]),
        ("train.use_gpu=maybe", ["train.use_gpu", "true or false"]),
        ("teachers.c.num_cpus=1", ["teachers.c", "no teacher named 'c'", "a, b"]),
        ("teachers.5.num_cpus=1", ["teachers.5", "out of range"]),
        ("loss=3", ["loss", "names a whole section"]),
        ("curriculum.num_stages=3", ["curriculum.stage_temperatures", "4 values", "num_stages is 3"]),
        ("curriculum.measurers=[entropy]", ["curriculum.measurers[0]", "'entropy'", "ensemble_entropy"]),
        ("curriculum.stage_unit=minute", ["curriculum.stage_unit", "epoch, step"]),
        ("teachers.a.source=hf_dir", ["teachers[0].path", "hf_dir"]),
        ("loss.topk=0", ["loss.topk", ">= 1"]),
        ("loss.margin_gamma=-1", ["loss.margin_gamma", "-1", ">= 0"]),
        ("loss.class_weights=balanced", ["loss.class_weights", "'balanced'", "none, inverse_frequency, effective_number"]),
        ("loss.class_temperature=0.9", ["loss.class_temperature", "0.9", ">= 1.0"]),
        ("loss.logit_adjustment=-0.5", ["loss.logit_adjustment", "-0.5", ">= 0"]),
        ("cache.topk_encoding=q4", ["cache.topk_encoding", "'q4'", "q8, plain"]),
        ("loss.mixup_alpha=0.2", ["loss.mixup_alpha", "train.mode=online"]),
        ("data.transfer_set=true", ["data.transfer_set", "'fashion_mnist'", "fortunes", "data.unlabeled_path"]),
    ],
)
def test_errors_name_the_key_the_value_and_the_choices(override, must_contain):
    with pytest.raises(ConfigError) as err:
        build(override)
    message = str(err.value)
    for part in must_contain:
        assert part in message, f"{part!r} not in {message!r}"


def test_margin_kd_parses_and_refuses_top_k_targets():
    cfg = build("loss.kind=margin_kd", "loss.margin_gamma=0.5")
    assert cfg.loss.kind == "margin_kd" and cfg.loss.margin_gamma == 0.5
    assert build("loss.kind=margin_kd").loss.margin_gamma == 1.0
    # The margin is read from the full tempered teacher: a top-k rebuild only guesses its tail.
    with pytest.raises(ConfigError, match=r"loss\.topk: .*loss\.kind='margin_kd'"):
        build("loss.kind=margin_kd", "loss.topk=5")


def test_unknown_nested_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"batchsize": 8}}))
    with pytest.raises(ConfigError, match=r"train\.batchsize: unknown key.*did you mean 'batch_size'"):
        load_config(path)


def test_duplicate_teacher_names_rejected():
    raw = {"name": "t", "teachers": [{"name": "a", "recipe": "cnn"}, {"name": "a", "recipe": "mlp"}]}
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.name: duplicate teacher name 'a'"):
        config_from_dict(raw)


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="name: is required"):
        config_from_dict({"teachers": [{"name": "a", "recipe": "cnn"}]})
    with pytest.raises(ConfigError, match="teachers: at least one teacher"):
        config_from_dict({"name": "t", "teachers": []})


def test_stage_schedule_needs_stage_values():
    with pytest.raises(ConfigError, match="alpha_schedule.*stage_alphas"):
        build("curriculum.alpha_schedule=stage")
    cfg = build("curriculum.alpha_schedule=stage", "curriculum.stage_alphas=[0.9, 0.8, 0.7, 0.6]")
    assert cfg.curriculum.stage_alphas == (0.9, 0.8, 0.7, 0.6)


def test_round_trip_with_overrides(tmp_path):
    cfg = build("loss.kind=js", "teachers.b.options={hidden: [8, 4]}", "curriculum.stage_alphas=[1, 1, 0.5, 0.5]")
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_valid_paths_cover_every_section():
    paths = C.valid_paths()
    assert "loss.temperature" in paths and "teachers.N.num_gpus" in paths and "serve.host" in paths
    assert len(paths) == len(set(paths))


def test_choice_lists_match_the_modules_that_implement_them():
    from distill_ray.kd import blending, curriculum, losses

    assert C.KD_KINDS == losses.KD_KINDS
    assert C.BLEND_KINDS == blending.BLEND_KINDS
    assert C.CONFIDENCE_KINDS == blending.CONFIDENCE_KINDS
    assert C.SCHEDULER_KINDS == curriculum.SCHEDULER_KINDS
    assert C.SCHEDULE_KINDS == curriculum.SCHEDULE_KINDS
    assert set(C.MEASURER_KINDS) == set(curriculum.MEASURERS)


def test_cli_reports_a_bad_key_in_one_line_and_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    got = subprocess.run([sys.executable, "-m", "distill_ray", "config", str(path), "--set", "loss.kindd=js"],
                         capture_output=True, text=True)
    assert got.returncode == 2
    assert got.stderr.strip().count("\n") == 0
    assert "loss.kindd" in got.stderr and "did you mean 'kind'" in got.stderr
    ok = subprocess.run([sys.executable, "-m", "distill_ray", "config", str(path), "--set", "loss.kind=js"],
                        capture_output=True, text=True, check=True)
    assert yaml.safe_load(ok.stdout)["loss"]["kind"] == "js"


def test_a_minimal_config_resolves_to_the_documented_defaults():
    """docs/defaults.md's table is what a config naming only data, teachers and a student gets: each row's
    key resolves to its documented value (and the table names the figure that chose it)."""
    import re

    table = (Path(__file__).resolve().parents[1] / "docs" / "defaults.md").read_text()
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \| (.+) \|$", table, flags=re.M)
    assert len(rows) >= 10, "docs/defaults.md lost its table"
    cfg = config_from_dict({"name": "mine", "data": {"format": "parquet", "path": "my.parquet", "label_field": "y"},
                            "teachers": [{"name": "big", "source": "recipe", "recipe": "mlp"}],
                            "student": {"arch": "mlp", "options": {"hidden": [16]}}})
    for key, documented, evidence in rows:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == yaml.safe_load(documented), f"{key}: docs say {documented}, the config gives {value!r}"
        assert evidence.strip(), f"{key}: no evidence named"
