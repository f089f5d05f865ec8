"""Ray Tune sweeps on a real local Ray: trials share the teachers (online) or the cache, the best trial
wins, dashboards are written, and an interrupted sweep resumes without redoing finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill_ray.config import apply_overrides, config_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]


def _overrides(root: Path, name: str, *extra: tuple[str, object]) -> list[tuple[str, object]]:
    return [("name", name), ("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
            ("teachers.0.path", str(root / "teachers/mlp_a")), ("teachers.1.path", str(root / "teachers/cnn_b")),
            ("tune.sweep_dir", str(root / "sweeps")), ("registry.tracking_uri", f"sqlite:///{root / 'runs' / 'mlflow.db'}"),
            ("train.checkpoint_every_steps", 1000), *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_prepared):
    return tiny_prepared(tmp_path_factory.mktemp("tune"))  # the session's teachers and cache, reused here


def _config(root: Path, name: str, *extra: tuple[str, object]):
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    return config_from_dict(apply_overrides(raw, _overrides(root, name, *extra)))


def _teacher_actors() -> list[dict]:
    """Teacher actors ever created in this Ray (dead ones included), from the GCS actor table."""
    from ray._private.state import actors

    return [a for a in actors().values() if "Teacher" in a["ActorClassName"]]


# Two trials run side by side (max_concurrent=2): one wave of Ray Train runs, which is what a trial
# costs here; the search, ASHA and the summary are the same code for any number.
TRIALS = 2


@pytest.fixture(scope="module")
def sweep(ray_local, root):
    """An online sweep: the teachers answer every trial's batches from services the sweep starts once."""
    import ray

    from distill_ray.pipeline import build_cache, load_data, prepare_teachers
    from distill_ray.teachers.service import NAMESPACE
    from distill_ray.tune.sweep import run_sweep

    cfg = _config(root, "sweep", ("train.mode", "online"))
    data = load_data(cfg)
    build_cache(cfg, data, prepare_teachers(cfg, data))  # what `distill-ray cache` does before a sweep
    manifest = next((root / "cache").rglob("manifest.json"))
    before = ({a["ActorID"] for a in _teacher_actors()}, manifest.stat().st_mtime_ns)
    out = run_sweep(cfg, REPO / "tune_spaces/kd_basic.yaml", samples=TRIALS, max_concurrent=2)
    started = [a for a in _teacher_actors() if a["ActorID"] not in before[0]]
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    return cfg, out, started, (manifest.stat().st_mtime_ns == before[1], named)


def test_every_trial_finishes_and_the_best_metric_wins(sweep):
    cfg, out, _, _ = sweep
    rows = out["trials"]
    assert len(rows) == TRIALS and all(r["status"] == "done" for r in rows)
    metrics = [r["metric"] for r in rows]
    # Trials that ran the whole schedule learned; one ASHA stopped after its first (half-open
    # curriculum) epoch has had 9 steps, so it is only held above chance (10 classes).
    assert all(0.3 < r["metric"] <= 1.0 for r in rows if r["epochs"] == cfg.train.epochs), rows
    assert all(0.15 < m for m in metrics) and any(r["epochs"] == cfg.train.epochs for r in rows), rows
    assert out["best"]["metric"] == max(metrics)
    assert out["best"]["trial_id"] == rows[0]["trial_id"]
    # the table on disk says the same, best first
    on_disk = json.loads((Path(out["sweep_dir"]) / "trials.json").read_text())
    assert [r["trial_id"] for r in on_disk] == [r["trial_id"] for r in rows]
    summary = (Path(out["sweep_dir"]) / "sweep_summary.md").read_text()
    assert rows[0]["trial_id"] in summary.split("| 1 |")[1].splitlines()[0]
    assert (Path(out["sweep_dir"]) / "metric_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_searched_what_the_space_file_names(sweep):
    _, out, _, _ = sweep
    for r in out["trials"]:
        assert set(r["params"]) == {"loss.temperature", "loss.alpha", "loss.kind"}
        assert 1.0 <= r["params"]["loss.temperature"] <= 8.0 and 0.1 <= r["params"]["loss.alpha"] <= 0.9
    assert len({round(r["params"]["loss.temperature"], 6) for r in out["trials"]}) == TRIALS


def test_the_trials_shared_one_service_per_teacher_and_the_sweep_took_them_down(sweep):
    cfg, _, started, (cache_untouched, named) = sweep
    # One replica per teacher for the whole sweep (2 trials x 2 epochs), never restarted, now dead.
    assert sorted(a["Name"].split("/")[-2].rsplit("-", 1)[0] for a in started) == sorted(cfg.teacher_names())
    assert all(a["NumRestarts"] == 0 for a in started), started
    assert all(a["State"] == "DEAD" for a in started)
    assert named == []  # no orphan: the sweep's end took its services down
    assert cache_untouched  # the cache (validation targets, difficulty) was reused, not rebuilt


def test_winner_is_exported_and_registered_and_scores_what_tune_saw(sweep):
    from distill_ray.evaluation.metrics import accuracy, predict_logits
    from distill_ray.models import load_model
    from distill_ray.pipeline import load_data
    from distill_ray.registry import store

    cfg, out, _, _ = sweep
    student, _ = load_model(out["student_dir"])
    card = json.loads((Path(out["student_dir"]) / "distill_card.json").read_text())
    assert card["trial_id"] == out["best"]["trial_id"] and card["metrics"]["val_accuracy"] == out["best"]["metric"]
    val = load_data(cfg).val.to_pandas()
    val_x, val_y = np.stack(val["x"].to_numpy()), val["label"].to_numpy()
    assert accuracy(predict_logits(student, val_x), val_y) == pytest.approx(out["best"]["metric"], abs=1e-6)
    uri = store.tracking_uri_of(cfg)
    (version,) = store.versions(cfg.name, uri)  # MLflow's registry, the first version: champion
    assert out["registered"] == f"models:/{cfg.name}/1" and version.aliases == ("champion",)
    assert version.tags["distill.trial_id"] == str(out["best"]["trial_id"])
    assert set(version.lineage.teacher_fingerprints) == set(cfg.teacher_names())
    registered = store.resolve_model_uri(f"models:/{cfg.name}@champion", uri)
    assert (registered / "model.safetensors").read_bytes() == (Path(out["student_dir"]) / "model.safetensors").read_bytes()
    # every trial logged to the same tracking store, beside the registered version's run
    client = store.client_for(uri)
    trials = client.search_runs([client.get_experiment_by_name(f"distill-ray/{cfg.name}-sweep").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"].rsplit("-", 1)[-1] for r in trials) == \
        sorted(str(r["trial_id"]).rsplit("-", 1)[-1] for r in out["trials"])


def test_every_trial_wrote_tensorboard_and_wandb_offline_runs(sweep):
    _, out, _, _ = sweep
    sweep_dir = Path(out["sweep_dir"])
    for r in out["trials"]:
        events = list(Path(r["path"]).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0, r["path"]
    offline_runs = list((sweep_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == TRIALS
    assert all(list(run.glob("*.wandb")) for run in offline_runs)


def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(ray_local, root, sweep):
    """Ctrl-C a sweep after its first trial finishes, then `--resume` it."""
    from distill_ray.tune.sweep import resume_sweep

    # One-epoch trials: what is tested is which trials run again, not how long they train.
    short = ("train.epochs", 1)
    cfg = _config(root, "interrupted", short)
    sweep_dir = Path(cfg.tune.sweep_dir) / cfg.name
    address = ray_local.get_runtime_context().gcs_address
    sets = [f"--set={k}={v}" for k, v in _overrides(root, "interrupted", short)]
    # Tune writes its experiment state (where a trial shows TERMINATED) at most every 10 s by default;
    # every second here, so the Ctrl-C comes soon after the first trial ends.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill_ray", "tune", str(REPO / "jobs/configs/tiny.yaml"),
                             "--space", str(REPO / "tune_spaces/kd_basic.yaml"), "--samples", "2",
                             "--max-concurrent", "1", "--address", address, *sets],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _finished_trials(sweep_dir):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        finished = _finished_trials(sweep_dir)
        assert finished, "no trial finished within 300 s"
        # Ctrl-C: Tune saves the experiment state and stops. A user whose first Ctrl-C is slow presses
        # it again (Tune then exits at once); a driver that still hangs is killed. Either way the
        # sweep must resume from what was saved.
        for sig, wait_s in ((signal.SIGINT, 90), (signal.SIGINT, 30), (signal.SIGKILL, 30)):
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = _finished_trials(sweep_dir)
    assert len(finished) < 2
    rows_before = {d: _result_rows(d) for d in finished}

    out = resume_sweep(sweep_dir)
    assert len(out["trials"]) == 2 and all(r["metric"] is not None for r in out["trials"])
    for trial_dir, rows in rows_before.items():
        assert _result_rows(trial_dir) == rows  # finished trials were not run again
    assert out["best"]["metric"] == max(r["metric"] for r in out["trials"])


def _finished_trials(sweep_dir: Path) -> list[Path]:
    """Directories of the trials Tune's own experiment state marks TERMINATED. (result.json need not
    carry a ``done`` row: a function trainable that returns adds no result.)"""
    states = sorted((sweep_dir / "trials").glob("experiment_state-*.json"))
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (json.JSONDecodeError, KeyError, OSError):  # being rewritten right now: look again later
        return []
    finished = {json.loads(row[0])["trial_id"] for row in trial_data if json.loads(row[0]).get("status") == "TERMINATED"}
    return [d for d in (sweep_dir / "trials").glob("_trial_*")
            if any(d.name.startswith(f"_trial_{trial_id}_") for trial_id in finished)]


def _result_rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.mark.timeout(600)
def test_a_trial_without_progress_is_failed_and_the_sweep_goes_on(ray_local, root, tmp_path):
    """One trial's Train workers can never be placed (64 CPUs asked of a 4-CPU Ray: Train retries
    their start forever and the trial never reports). Without a watchdog the sweep waits for it
    forever; with tune.stall_timeout_s the trial is failed, the other trains, and the sweep finishes."""
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.cpus_per_worker: {grid: [1, 64]}\n")
    cfg = _config(root, "stalled", ("train.epochs", 1), ("tune.stall_timeout_s", 20), ("tracking.wandb", "disabled"))
    started = time.monotonic()
    out = run_sweep_within(cfg, space)
    rows = {r["params"]["train.cpus_per_worker"]: r for r in out["trials"]}
    assert rows[64]["status"] == "error" and "no training progress" in rows[64]["error"]
    assert "tune.stall_timeout_s=20" in rows[64]["error"]
    assert rows[1]["status"] == "done" and out["best"]["trial_id"] == rows[1]["trial_id"]
    assert time.monotonic() - started < 400  # the stalled trial did not hold the sweep up


def run_sweep_within(cfg, space: Path) -> dict:
    from distill_ray.tune.sweep import run_sweep

    return run_sweep(cfg, space, samples=1, max_concurrent=2)
