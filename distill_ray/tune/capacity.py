"""How many trials a sweep runs at once: what fits in the CPUs free when it starts, with room left for
the Ray Data tasks that feed every trial's Train workers.

A trial's driver holds ``tune.cpus_per_trial`` and its TorchTrainer's workers hold
``train.num_workers x train.cpus_per_worker`` for the whole run (plus a tenth of a CPU per worker for
a streamed epoch's stage actor, ``train/stages.py``). The rows reach the workers through Ray Data
read and map tasks, each asking one CPU (Ray's default) and only for as long as it runs. When the
drivers and workers of the trials running at once hold every free CPU, no such task can ever start:
every worker waits for its rows, no trial reports, and Tune waits for the trials forever (the sweep
hung so, twice, on a 4-CPU local Ray). ``DATA_CPUS`` stay free for those tasks.
"""

from __future__ import annotations

from dataclasses import replace

from distill_ray.config import ExperimentConfig

DATA_CPUS = 1.0  # one Ray Data task at a time, shared by the trials' streams
STAGE_CPUS = 0.1  # per Train worker: a streamed epoch's EpochStage actor (train/stages.py rank_stream)


def run_cpus(cfg: ExperimentConfig) -> float:
    """CPUs one TorchTrainer run holds while it trains: its workers and their epoch-stage actors."""
    return cfg.train.num_workers * (cfg.train.cpus_per_worker + STAGE_CPUS)


def free_cpus() -> float:
    """CPUs nobody holds right now (a local Ray may hold some for other work than this sweep)."""
    import ray

    return ray.available_resources().get("CPU", 0.0)


def fit_concurrency(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cap ``tune.max_concurrent`` at the trials whose drivers and runs fit in the free CPUs beside
    ``DATA_CPUS``; at least one (a cluster that adds nodes gives it room; if none comes, the trial's
    watchdog fails it after ``tune.stall_timeout_s``, see ``tune/watchdog.py``)."""
    need = cfg.tune.cpus_per_trial + run_cpus(cfg)
    free = free_cpus()
    fits = max(1, int((free - DATA_CPUS) / need + 1e-9))
    if cfg.tune.max_concurrent > fits:
        print(f"tune: {cfg.tune.max_concurrent} concurrent trials asked, {fits} fit in the {free:g} free CPUs "
              f"({need:g} CPUs per trial, {DATA_CPUS:g} kept for reading data); running {fits} at a time")
        cfg = replace(cfg, tune=replace(cfg.tune, max_concurrent=fits))
    return cfg
