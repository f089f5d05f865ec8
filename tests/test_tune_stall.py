"""A sweep never waits forever: trials fit beside room for their data, and a trial without progress is failed.
(No Ray here; the end-to-end case is in test_tune_sweep.py.)"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from distill_ray.config import load_config
from distill_ray.tune import capacity
from distill_ray.tune.watchdog import TrialStalled, watched

REPO = Path(__file__).resolve().parents[1]


def test_a_run_that_finishes_or_fails_is_handed_back_as_it_is(tmp_path):
    assert watched(lambda: 42, 5, [tmp_path]) == 42

    def fail():
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        watched(fail, 5, [tmp_path])


def test_a_run_without_progress_is_failed_after_the_timeout_naming_the_setting(tmp_path):
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(TrialStalled, match=r"tune.stall_timeout_s=1\b"):
        watched(release.wait, 1.0, [tmp_path / "progress.json"], poll_s=0.1)
    assert 1.0 <= time.monotonic() - start < 5
    release.set()


def test_a_run_that_keeps_touching_its_progress_file_is_left_alone(tmp_path):
    progress = tmp_path / "progress.json"

    def steps():  # three seconds of work, a step logged every 0.2 s
        for step in range(15):
            progress.write_text(str(step))
            time.sleep(0.2)
        return "done"

    assert watched(steps, 1.0, [progress], poll_s=0.1) == "done"
    assert watched(lambda: "unwatched", 0, [progress]) == "unwatched"  # 0: no watchdog


def test_between_runs_in_the_callers_thread_while_the_run_goes_and_not_after(tmp_path):
    """A trial forwards its Train reports to Tune from its own thread (tune/reports.py) while the run goes on."""
    release, calls = threading.Event(), []
    caller = threading.get_ident()

    def between():
        calls.append(threading.get_ident())
        if len(calls) == 3:
            release.set()

    assert watched(lambda: release.wait(10) and "done", 0, [tmp_path], poll_s=0.05, between=between) == "done"
    assert len(calls) >= 3 and set(calls) == {caller}
    # without a watchdog (0) and without `between`, the run is called in the caller's thread
    assert watched(threading.get_ident, 0, [tmp_path]) == caller


@pytest.fixture
def tiny():
    return load_config(REPO / "jobs/configs/tiny.yaml", [("tune.max_concurrent", 8), ("tune.cpus_per_trial", 0.25)])


def test_concurrent_trials_fit_the_free_cpus_and_leave_one_for_reading_data(tiny, monkeypatch, capsys):
    # a trial: 0.25 (driver) + 1 (worker) + 0.1 (its epoch stage) = 1.35 CPUs
    monkeypatch.setattr(capacity, "free_cpus", lambda: 4.0)
    assert capacity.fit_concurrency(tiny).tune.max_concurrent == 2  # 2 x 1.35 + 1 <= 4 < 3 x 1.35 + 1
    assert "2 fit in the 4 free CPUs" in capsys.readouterr().out
    # CPUs held by other work count: 1.5 of 4 held leaves room for one trial (two deadlocked here)
    monkeypatch.setattr(capacity, "free_cpus", lambda: 2.5)
    assert capacity.fit_concurrency(tiny).tune.max_concurrent == 1
    monkeypatch.setattr(capacity, "free_cpus", lambda: 0.0)  # none free: still one (a cluster may grow)
    assert capacity.fit_concurrency(tiny).tune.max_concurrent == 1
    monkeypatch.setattr(capacity, "free_cpus", lambda: 64.0)
    few = replace(tiny, tune=replace(tiny.tune, max_concurrent=3))
    assert capacity.fit_concurrency(few).tune.max_concurrent == 3  # what was asked, when it fits
