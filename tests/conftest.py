"""Shared fixtures: one real local Ray for the whole session, small real data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Keep worker processes from oversubscribing the 2 cores of CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
# Ray Data's Parquet reader starts 32 FooterReader actors (new worker processes, killed afterwards)
# for every read, to fetch footers of files that here number one to a few: on 2 cores one read of the
# 1200-row tiny cache took 131 CPU-s with 32 of them and the whole suite reads Parquet hundreds of
# times (every load_data, cache build, Train run's train and val split). One actor reads the same
# footers. Set before ray.init, so the raylet hands it to every worker.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_IO_CONCURRENCY", "8")
# And the V1 Parquet reader, as distill_ray.pipeline.connect_ray picks for a local Ray: no footer
# actors at all, ~3x faster per small read (bench/parquet_read.py).
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
# And the worker pool connect_ray gives a local Ray: idle workers kept, not killed after 1 s and
# started again by the next stream or run (tests/test_engine.py: 264 s against
# 305 s; tests/test_tune_sweep.py: 210 s against 238 s).
os.environ.setdefault("RAY_num_workers_soft_limit", "16")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "30000")
# Ray Train's controller looks at its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a
# finished run is noticed up to 2 s late; the suite runs dozens of short Train runs. The controller
# reads it in its own process: set before ray.init, the raylet hands it on.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once. Logical CPUs exceed the 2 real cores on purpose: teacher
    actors take fractions, and most of the time they wait on each other.

    Its own (address="local"), never a Ray that happens to run on the machine. A test that overruns
    its time limit (pytest-timeout, pyproject.toml) ends this whole pytest process after printing
    every thread's stack: the Ray started here goes with it (its head processes share the process's
    fate), so no test is left waiting on a half-torn-down session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_fashion_mnist():
    """A small, fixed, real subset of Fashion-MNIST (skips with the reason if the data is missing)."""
    from distill_ray.data.bundled import DataUnavailable, load_fashion_mnist

    try:
        return load_fashion_mnist(max_train_samples=1200, max_eval_samples=300, split_seed=0)
    except DataUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def tiny_prepared(ray_local, tmp_path_factory):
    """The tiny config's two recipe teachers and their soft-target cache, trained and built once for
    the session. Returns ``fill(root, cache=True)``: it copies them to ``root/teachers/{mlp_a,cnn_b}``
    and ``root/cache``, where a module's tiny config (with those paths) finds them, so its own
    ``prepare_teachers`` / ``build_cache`` reuse (and verify) them instead of training again."""
    import yaml

    from distill_ray.config import apply_overrides, config_from_dict
    from distill_ray.data.bundled import DataUnavailable
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers

    root = tmp_path_factory.mktemp("tiny_prepared")
    raw = yaml.safe_load((REPO / "jobs/configs/tiny.yaml").read_text())
    cfg = config_from_dict(apply_overrides(raw, [
        ("run_dir", str(root / "runs")), ("cache.dir", str(root / "cache")),
        ("teachers.0.path", str(root / "teachers/mlp_a")), ("teachers.1.path", str(root / "teachers/cnn_b"))]))
    try:
        data = load_data(cfg)
    except DataUnavailable as err:
        pytest.skip(str(err))
    build_cache(cfg, data, prepare_teachers(cfg, data))

    def fill(dest: Path, cache: bool = True) -> Path:
        shutil.copytree(root / "teachers", dest / "teachers", dirs_exist_ok=True)
        if cache:
            shutil.copytree(root / "cache", dest / "cache", dirs_exist_ok=True)
        return dest

    return fill


SLOW_TIMEOUT_S = 900  # end-to-end tests (marked slow): one ran past the 300 s default on a shared 2-core machine


def pytest_collection_modifyitems(config, items):
    """A slow test without its own @pytest.mark.timeout gets SLOW_TIMEOUT_S instead of the 300 s default."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
