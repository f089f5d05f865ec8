"""The MLflow model registry of students, on a SQLite store in a temp dir (no Ray): versions get
champion then challenger, promote / rollback move the aliases, each version carries its lineage
(config, metrics, teacher and data fingerprints), ``models:/`` URIs resolve to a loadable student kept
locally, a 0.2 file registry imports in order, ``registry status`` flags a version once a teacher's
weights change (and not before) with the CLI's exit codes, and served-class drift is measured on
hand-made Prometheus text."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlflow")

from distill_ray.cli import STALE_EXIT, main  # noqa: E402
from distill_ray.config import ConfigError, config_from_dict, dump_config  # noqa: E402
from distill_ray.models import build_model, fingerprint, load_model, save_model  # noqa: E402
from distill_ray.registry import drift, store  # noqa: E402
from distill_ray.registry.lineage import run_lineage, write_lineage  # noqa: E402
from distill_ray.registry.legacy import import_file_registry  # noqa: E402
from distill_ray.registry.status import needs_retraining, registry_status, retrain_name, version_config  # noqa: E402
from distill_ray.serving.model import StudentLoadError, resolve_student_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = {"arch": "mlp", "input_shape": [4], "num_classes": 2, "options": {"hidden": [8]}, "task": "classification"}


def _mlp(seed: int):
    torch.manual_seed(seed)
    return build_model("mlp", (4,), 2, {"hidden": [8]})


def _config(root: Path, name: str = "reg"):
    return config_from_dict({
        "name": name, "run_dir": str(root / "runs"),
        "data": {"format": "csv", "path": str(root / "data.csv"), "label_field": "label"},
        "teachers": [{"name": "t", "source": "torch_checkpoint", "path": str(root / "teacher")}],
        "student": {"arch": "mlp", "options": {"hidden": [8]}},
        "loss": {"temperature": 3.0}})


def _run(root: Path, cfg, seed: int, accuracy: float, lineage: bool = True) -> Path:
    """A run directory as ``distill-ray run`` leaves it: config, metrics, card, lineage, student/."""
    run = cfg.run_path() / f"seed{seed}"
    save_model(_mlp(seed), run / "student", SPEC)
    card = {"name": cfg.name, "task": "classification", "teachers": ["t"], "metrics": {"test_accuracy": accuracy},
            "version": "v1", "class_names": ["a", "b"]}
    for path in (run / "distill_card.json", run / "student" / "distill_card.json"):
        path.write_text(json.dumps(card))
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "metrics.json").write_text(json.dumps({"student": accuracy, "teachers": {"t": 0.9}, "metric": "accuracy"}))
    if lineage:
        write_lineage(run, run_lineage(cfg, {"t": Path(cfg.teachers[0].path)}, [30, 10], ["a", "b"]))
    return run


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty SQLite store, its tables created once (MLflow's migrations take seconds) and copied per test."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    store.client_for(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def world(tmp_path, monkeypatch, empty_store):
    """A teacher, a CSV, a config, and an empty SQLite store; the local model copies under tmp_path."""
    monkeypatch.setenv("DISTILL_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "runs").mkdir()
    shutil.copy(empty_store, tmp_path / "runs" / "mlflow.db")
    save_model(_mlp(100), tmp_path / "teacher", SPEC)
    (tmp_path / "data.csv").write_text("f1,f2,f3,f4,label\n" + "".join(f"{i},1,2,3,{i % 2}\n" for i in range(40)))
    cfg = _config(tmp_path)
    return tmp_path, cfg, f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"


def test_the_default_store_is_sqlite_under_the_run_root_unless_told(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.tracking_uri_for(tmp_path / "runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert store.tracking_uri_for(tmp_path / "runs") == "http://tracking:5000"
    assert store.tracking_uri_for(tmp_path / "runs", "sqlite:///x.db") == "sqlite:///x.db"  # the config's wins


def test_two_versions_get_champion_then_challenger_and_carry_their_lineage(world):
    root, cfg, uri = world
    first = store.register(_run(root, cfg, 1, 0.81) / "student", "m", tracking_uri=uri)
    second = store.register(_run(root, cfg, 2, 0.84) / "student", "m", tracking_uri=uri)
    assert (first, second) == (1, 2)
    v1, v2 = store.versions("m", uri)
    assert (v1.aliases, v2.aliases) == (("champion",), ("challenger",))
    teacher_print = fingerprint(load_model(root / "teacher")[0])  # the cache's own fingerprint of the teacher
    assert v2.tags["distill.teacher.t.fingerprint"] == teacher_print
    assert v2.tags["distill.teacher.t.path"] == str((root / "teacher").resolve())
    assert v2.lineage.data_fingerprint == v2.tags["distill.data_fingerprint"] and len(v2.lineage.data_fingerprint) == 16
    assert v2.lineage.val_class_mix() == {"a": 0.75, "b": 0.25}
    assert v2.key_metric() == "test_accuracy=0.8400"
    run = store.client_for(uri).get_run(v2.run_id)
    assert run.data.params["loss.temperature"] == "3.0" and run.data.params["teachers.0.name"] == "t"
    assert run.data.metrics["student"] == pytest.approx(0.84) and run.data.metrics["teachers.t"] == pytest.approx(0.9)
    assert version_config(v2, uri) == cfg  # the config that made it, read back from its run
    assert json.loads(store.run_artifact_text(v2, "distill_card.json", uri))["metrics"]["test_accuracy"] == 0.84


def test_promote_and_rollback_move_the_aliases(world):
    root, cfg, uri = world
    for seed in (1, 2, 3):
        store.register(_run(root, cfg, seed, 0.8) / "student", "m", tracking_uri=uri)

    def aliases():
        return {v.version: v.aliases for v in store.versions("m", uri)}

    assert aliases() == {1: ("champion",), 2: (), 3: ("challenger",)}  # the newest is the challenger
    assert store.promote("m", tracking_uri=uri) == (1, 3)
    assert aliases() == {1: ("previous",), 2: (), 3: ("champion",)}
    assert store.rollback("m", uri) == (3, 1)
    assert aliases() == {1: ("champion",), 2: (), 3: ("previous",)}
    assert store.rollback("m", uri) == (1, 3)  # a second rollback undoes the first
    assert store.promote("m", 2, uri) == (3, 2)
    assert aliases() == {1: (), 2: ("champion",), 3: ("previous",)}
    with pytest.raises(store.RegistryError, match="no challenger"):
        store.promote("m", tracking_uri=uri)
    with pytest.raises(store.RegistryError, match="already the champion"):
        store.promote("m", 2, uri)
    with pytest.raises(store.RegistryError, match=r"no version 7.*versions: 1, 2 \(champion\), 3 \(previous\)"):
        store.promote("m", 7, uri)
    with pytest.raises(store.RegistryError, match="no registered model 'nope'"):
        store.versions("nope", uri)


def test_a_models_uri_resolves_to_a_loadable_student_kept_locally(world, monkeypatch):
    import mlflow

    root, cfg, uri = world
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = _run(root, cfg, 1, 0.8)
    store.register(run / "student", "m", tracking_uri=uri)
    store.register(_run(root, cfg, 2, 0.8) / "student", "m", tracking_uri=uri)
    champion = resolve_student_dir("models:/m@champion")
    assert champion == store.local_copy_dir(uri, "m", 1)
    assert (champion / "model.safetensors").read_bytes() == (run / "student" / "model.safetensors").read_bytes()
    model, spec = load_model(champion)
    assert fingerprint(model) == fingerprint(load_model(run / "student")[0]) and spec["num_classes"] == 2
    assert json.loads((champion / "distill_card.json").read_text())["version"] == "v1"  # Serve's model_version
    assert resolve_student_dir("models:/m/2") == store.local_copy_dir(uri, "m", 2)

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert resolve_student_dir("models:/m@champion") == champion  # a restart finds its copy
    store.promote("m", tracking_uri=uri)
    assert resolve_student_dir("models:/m@champion") == store.local_copy_dir(uri, "m", 2)  # the alias moved
    for bad, why in (("models:/m@nobody", "no version 'nobody'"), ("models:/m/9", "no version '9'"),
                     ("models:/m", "give models:/NAME@ALIAS"), ("models:/nope@champion", "no registered model")):
        with pytest.raises(StudentLoadError, match=why):
            resolve_student_dir(bad)


def test_a_version_holding_a_pickle_is_refused(world, monkeypatch):
    root, cfg, uri = world
    run = _run(root, cfg, 1, 0.8)
    (run / "student" / "extra.pt").write_bytes(b"\x80\x02.")
    store.register(run / "student", "m", tracking_uri=uri)
    with pytest.raises(store.RegistryError, match=r"pickle-format files \['extra.pt'\]"):
        store.resolve_model_uri("models:/m@champion", uri)
    assert not store.local_copy_dir(uri, "m", 1).exists()


def test_a_file_registry_still_serves_and_imports_in_order_with_latest_as_champion(world):
    root, cfg, uri = world
    entry = root / "registry" / "old"
    for n in (1, 2, 10):  # v10 after v2: versions are ordered by number, not by name
        save_model(_mlp(n), entry / f"v{n}", SPEC)
        (entry / f"v{n}" / "distill_card.json").write_text(json.dumps({"name": "old", "version": f"v{n}"}))
    (entry / "latest").write_text("v10\n")
    assert resolve_student_dir(entry) == (entry / "v10").resolve()  # a path keeps working
    assert import_file_registry(entry, tracking_uri=uri) == [1, 2, 3]
    versions = store.versions("old", uri)
    assert [v.tags["distill.imported_from"] for v in versions] == [str(entry / f"v{n}") for n in (1, 2, 10)]
    assert [v.aliases for v in versions] == [(), (), ("champion",)]
    served = store.resolve_model_uri("models:/old@champion", uri)
    assert (served / "model.safetensors").read_bytes() == (entry / "v10" / "model.safetensors").read_bytes()


def test_status_flags_a_version_once_its_teacher_changed_and_the_cli_exits_on_it(world, capsys):
    root, cfg, uri = world
    store.register(_run(root, cfg, 1, 0.8) / "student", "m", tracking_uri=uri)
    cli = ["registry", "--tracking-uri", uri, "status", "m"]
    assert [s.stale for s in registry_status("m", uri)] == [False]
    assert main(cli) == 0 and "m v1 (champion): ok" in capsys.readouterr().out
    assert needs_retraining("m", uri) == []

    save_model(_mlp(101), root / "teacher", SPEC)  # the teacher is retrained: new weights, same directory
    (status,) = registry_status("m", uri)
    assert status.stale and len(status.changes) == 1
    assert status.changes[0].startswith(f"teacher 't' ({(root / 'teacher').resolve()}): weights changed")
    assert main(cli) == STALE_EXIT == 1
    out = capsys.readouterr().out
    assert "m v1 (champion): STALE" in out and "weights changed" in out
    assert [s.version.version for s in needs_retraining("m", uri)] == [1]
    assert retrain_name(cfg, status).startswith("reg-retrain-v1-")

    # The scheduled job names what it would retrain, from the config the version was trained from.
    done = subprocess.run([sys.executable, str(REPO / "jobs/retrain_stale.py"), "m", "--tracking-uri", uri, "--dry-run"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "DISTILL_RAY_CACHE": str(root / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "m v1 is stale:" in done.stdout and f"-> retraining as {cfg.run_path().parent / retrain_name(cfg, status)}" in done.stdout

    # A retrained version (with today's teacher) answers it: the next scheduled job leaves v1 be.
    run = _run(root, cfg, 2, 0.85)
    store.register(run / "student", "m", tracking_uri=uri, alias="challenger",
                   extra_tags={"distill.retrained_from": "1"})
    assert needs_retraining("m", uri) == []


def test_status_flags_changed_data_files(world):
    root, cfg, uri = world
    store.register(_run(root, cfg, 1, 0.8) / "student", "m", tracking_uri=uri)
    with open(root / "data.csv", "a") as f:
        f.write("99,1,2,3,1\n")
    (status,) = registry_status("m", uri)
    assert status.stale and status.changes[0].startswith("data (csv: ") and "files or data config changed" in status.changes[0]


def test_the_registry_cli_lists_promotes_and_fails_clearly(world, capsys):
    root, cfg, uri = world
    base = ["registry", "--tracking-uri", uri]
    assert main([*base, "register", str(_run(root, cfg, 1, 0.81)), "--name", "m"]) == 0
    assert "as models:/m/1 (champion)" in capsys.readouterr().out
    assert main([*base, "register", str(_run(root, cfg, 2, 0.83)), "--name", "m"]) == 0
    capsys.readouterr()
    assert main([*base, "list", "m"]) == 0
    lines = capsys.readouterr().out.splitlines()
    teacher = fingerprint(load_model(root / "teacher")[0])[:12]
    assert lines[0].split() == ["version", "aliases", "metric", "teachers", "data"]
    assert lines[1].split()[:4] == ["1", "champion", "test_accuracy=0.8100", f"t={teacher}"]
    assert lines[2].split()[:3] == ["2", "challenger", "test_accuracy=0.8300"]
    assert main([*base, "promote", "m"]) == 0 and "champion is version 2 (was 1" in capsys.readouterr().out
    assert main([*base, "rollback", "m"]) == 0 and "champion is version 1 again" in capsys.readouterr().out
    assert main([*base, "promote", "nope"]) == 2
    assert "no registered model 'nope'" in capsys.readouterr().err


def test_a_config_naming_the_old_registry_dir_is_told_what_replaced_it():
    with pytest.raises(ConfigError, match=r"tune\.registry_dir: removed in 0\.3\.0.*registry\.tracking_uri.*registry import"):
        config_from_dict({"name": "x", "teachers": [{"name": "t", "recipe": "mlp"}], "tune": {"registry_dir": "r"}})
    with pytest.raises(ConfigError, match=r"registry\.drift_threshold"):
        config_from_dict({"name": "x", "teachers": [{"name": "t", "recipe": "mlp"}], "registry": {"drift_threshold": 2}})


# --- drift ------------------------------------------------------------------------------------------

PROMETHEUS = """\
# HELP ray_distill_student_predictions_total Predictions served, by predicted class.
# TYPE ray_distill_student_predictions_total counter
ray_distill_student_predictions_total{model_version="v1",predicted_class="a",replica="r1"} 60.0
ray_distill_student_predictions_total{model_version="v1",predicted_class="a",replica="r2"} 20.0
ray_distill_student_predictions_total{model_version="v1",predicted_class="b",replica="r1"} 120.0
ray_distill_student_predictions_total{model_version="v2",predicted_class="a",replica="r1"} 999.0
distill_student_predictions_total{model_version="v3",predicted_class="0"} 70
distill_student_predictions_total{model_version="v3",predicted_class="1"} 30
ray_serve_num_router_requests_total{deployment="student"} 200.0
"""


def test_served_predictions_are_summed_per_class_for_one_version_with_or_without_the_ray_prefix():
    assert drift.predictions_by_class(PROMETHEUS, {"v1", "1"}) == {"a": 80.0, "b": 120.0}
    assert drift.predictions_by_class(PROMETHEUS, {"v3"}) == {"0": 70.0, "1": 30.0}
    assert drift.predictions_by_class(PROMETHEUS, {"v9"}) == {}


def test_total_variation_drift_against_the_validation_mix():
    expected = {"a": 0.75, "b": 0.25}
    v1 = drift.drift(drift.predictions_by_class(PROMETHEUS, {"v1"}), expected, threshold=0.2, min_predictions=100)
    # served a 0.4 / b 0.6: TV = (|0.4 - 0.75| + |0.6 - 0.25|) / 2 = 0.35 > 0.2
    assert v1.distance == pytest.approx(0.35) and v1.predictions == 200 and v1.drifted
    v3 = drift.drift(drift.predictions_by_class(PROMETHEUS, {"v3"}), expected, threshold=0.2, min_predictions=100)
    # class indices read as the mix's names: a 0.7 / b 0.3, TV 0.05
    assert v3.served == {"a": 0.7, "b": 0.3} and v3.distance == pytest.approx(0.05) and not v3.drifted
    few = drift.drift({"a": 1.0, "b": 9.0}, expected, threshold=0.2, min_predictions=100)
    assert not few.judged and not few.drifted and "fewer than 100" in few.line()
    assert drift.total_variation({"a": 1.0}, {"b": 1.0}) == 1.0 and drift.total_variation(expected, expected) == 0.0


def test_status_reads_drift_from_the_metrics_of_the_served_version(world, monkeypatch):
    root, cfg, uri = world
    store.register(_run(root, cfg, 1, 0.8) / "student", "m", tracking_uri=uri)
    (status,) = registry_status("m", uri, metrics_text=PROMETHEUS, threshold=0.2, min_predictions=100)
    assert status.changes == () and status.drift.distance == pytest.approx(0.35) and status.stale
    (calm,) = registry_status("m", uri, metrics_text=PROMETHEUS, threshold=0.5, min_predictions=100)
    assert not calm.stale and "drift: ok, total variation 0.350" in "\n".join(calm.lines())
    monkeypatch.setattr(drift, "fetch_metrics", lambda url, timeout_s=10.0: PROMETHEUS)
    assert main(["registry", "--tracking-uri", uri, "status", "m", "--metrics-url", "http://x/metrics"]) == STALE_EXIT
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


def test_the_cli_and_the_run_import_no_mlflow():
    """mlflow's import takes seconds: only the registry's own paths pay it."""
    code = ("import sys\nfrom distill_ray.cli import build_parser\nbuild_parser()\n"
            "import distill_ray.pipeline, distill_ray.tune.sweep, distill_ray.serving, distill_ray.registry.status\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')[:3])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_a_class_mix_too_long_for_a_tag_is_read_from_the_runs_lineage(world):
    root, cfg, uri = world
    run = _run(root, cfg, 1, 0.8, lineage=False)
    names = [f"class_{i:04d}" for i in range(1000)]
    write_lineage(run, run_lineage(cfg, {"t": Path(cfg.teachers[0].path)}, [1] * 1000, names))
    store.register(run / "student", "m", tracking_uri=uri)
    (version,) = store.versions("m", uri)
    assert len(version.tags["distill.lineage"]) < 8000 and version.lineage.val_class_counts == ()
    served = "".join(f'distill_student_predictions_total{{model_version="v1",predicted_class="{n}"}} 1\n'
                     for n in names[:500])  # half the classes, each once
    (status,) = registry_status("m", uri, metrics_text=served, threshold=0.2, min_predictions=100)
    assert status.drift.distance == pytest.approx(0.5) and status.stale
