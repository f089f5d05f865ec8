"""Which Ray a command joins: the one it is told (--address, RAY_ADDRESS), else a new local one of its own,
never one that merely happens to run on the machine. ray.init is recorded, not called."""

from __future__ import annotations

import pytest
import ray

from distill_ray import pipeline


@pytest.fixture
def inits(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_no_address_starts_a_local_ray_of_its_own(inits):
    pipeline.connect_ray(None)
    assert len(inits) == 1 and inits[0]["address"] == "local"
    assert inits[0]["num_cpus"] >= 4 and inits[0]["include_dashboard"] is False


def test_ray_address_and_address_auto_join_the_cluster_named(inits, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    pipeline.connect_ray(None)
    assert inits[-1]["address"] == "10.0.0.5:6379" and "num_cpus" not in inits[-1]
    monkeypatch.delenv("RAY_ADDRESS")
    pipeline.connect_ray("auto")  # the Ray running on this machine, as `ray start` leaves it
    assert inits[-1]["address"] == "auto" and "num_cpus" not in inits[-1]
    pipeline.connect_ray("local")
    assert inits[-1]["address"] == "local"


def test_the_cli_passes_address_through(monkeypatch):
    from distill_ray.cli import build_parser

    args = build_parser().parse_args(["run", "jobs/configs/tiny.yaml"])
    assert args.address is None  # connect_ray then starts a local Ray
    assert build_parser().parse_args(["tune", "--address", "auto"]).address == "auto"


def test_a_local_ray_that_does_not_start_in_time_says_why_in_one_line(monkeypatch):
    """Ray's own message ("The current node timed out during startup ...") names no cause or remedy."""
    def slow_start(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_start)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RuntimeError, match=r"did not start within Ray's 30 s \(load average [\d.]+ on \d+ cores\)") as err:
        pipeline.connect_ray(None)
    assert "--address" in str(err.value) and "\n" not in str(err.value)

    def other_failure(**kwargs):
        raise ValueError("some other start-up failure")

    monkeypatch.setattr(ray, "init", other_failure)
    with pytest.raises(ValueError, match="some other start-up failure"):  # anything else as Ray raised it
        pipeline.connect_ray(None)
