"""Population Based Training's parts around the trainable: the slots trials take turns at, the
population that fits the cluster, mutations clamped to the search space, the scheduler, and the
per-epoch rows and evolved schedule read back from a trial's checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distill_ray.config import ConfigError, ExperimentConfig
from distill_ray.tune.capacity import DATA_CPUS, free_cpus, run_cpus
from distill_ray.tune.space import RANGE_KINDS, SearchSpace, plain_value


def train_slots(count: int):
    """An actor lending ``count`` slots; a PBT trial holds one while its TorchTrainer runs.

    PBT needs its whole population alive at once (it compares and clones live trials), but Tune only
    sees a trial driver's CPUs, not its Train workers'. Drivers therefore all run, and take turns at
    the CPUs left for workers here, first come first served; between segments a trial holds none."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class TrainSlots:
        def __init__(self, count: int):
            self._free = asyncio.Semaphore(count)

        async def acquire(self) -> None:
            await self._free.acquire()

        async def release(self) -> None:
            self._free.release()

    return TrainSlots.remote(count)


def pbt_train_slots(cfg: ExperimentConfig, population: int, cluster_cpus: float) -> int:
    """TorchTrainer runs that fit beside the whole population's drivers and ``capacity.DATA_CPUS`` (at most
    tune.max_concurrent).

    Raises ConfigError, with the numbers, when not even one fits."""
    drivers = population * cfg.tune.cpus_per_trial
    per_run = run_cpus(cfg)
    fits = int((cluster_cpus - drivers - DATA_CPUS) / per_run + 1e-9)
    if fits < 1:
        raise ConfigError(f"tune.scheduler=pbt keeps all {population} trials alive at once: their drivers hold "
                          f"{drivers:g} CPUs (tune.cpus_per_trial={cfg.tune.cpus_per_trial:g} each), one "
                          f"TorchTrainer needs {per_run:g} more (train.num_workers x train.cpus_per_worker, and "
                          f"its data stage) and {DATA_CPUS:g} stays free for reading data, but the cluster has "
                          f"{cluster_cpus:g}; lower tune.num_samples, tune.cpus_per_trial or train.cpus_per_worker")
    return min(fits, cfg.tune.max_concurrent)


def fit_population(cfg: ExperimentConfig, space: SearchSpace) -> tuple[ExperimentConfig, int]:
    """PBT: every trial of the population is live at once; returns that config and the training slots
    (refused when the cluster could never hold them; as many as the CPUs free now hold, at least one)."""
    import ray

    population = cfg.tune.num_samples * space.grid_size()
    slots = pbt_train_slots(cfg, population, ray.cluster_resources().get("CPU", 0))
    try:
        slots = min(slots, pbt_train_slots(cfg, population, free_cpus()))
    except ConfigError:  # held by other work now: one at a time
        slots = 1
    print(f"tune: PBT keeps its {population} trials alive together; {slots} train at a time")
    return replace(cfg, tune=replace(cfg.tune, max_concurrent=population)), slots


def pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """What PBT may perturb: ranges as Tune distributions (explore multiplies by 0.8/1.2 or resamples),
    choices as lists (explore steps to a neighbour or resamples). Grid params stay as sampled."""
    distributions = space.to_tune()
    return {path: list(args) if kind == "choice" else distributions[path]
            for path, kind, args in space.params if kind != "grid"}


@dataclass(frozen=True)
class ClampToSpace:
    """PBT's explore step multiplies a value by 0.8 or 1.2, which can leave the space (alpha 0.9 -> 1.08,
    an invalid config); this puts it back on the nearest bound. randint values stay whole numbers."""

    bounds: tuple[tuple[str, str, float, float], ...]

    @classmethod
    def of(cls, space: SearchSpace) -> "ClampToSpace":
        return cls(tuple((path, kind, args[0], args[1]) for path, kind, args in space.params if kind in RANGE_KINDS))

    def __call__(self, config: dict) -> dict:
        for path, kind, low, high in self.bounds:
            value = min(max(plain_value(config[path]), low), high)
            config[path] = int(round(value)) if kind == "randint" else float(value)
        return config


def pbt_scheduler(cfg: ExperimentConfig, space: SearchSpace):
    from ray.tune.schedulers import PopulationBasedTraining

    t = cfg.tune
    if t.pbt_interval >= cfg.train.epochs:
        raise ConfigError(f"tune.pbt_interval={t.pbt_interval} must be below train.epochs={cfg.train.epochs}: "
                          f"PBT perturbs trials every pbt_interval epochs, never after the last one")
    mutations = pbt_mutations(space)
    if not mutations:
        raise ConfigError(f"tune.scheduler=pbt needs a param to evolve, but {t.space} has only 'grid' params; "
                          f"use uniform, loguniform, randint or choice")
    # metric and mode come from TuneConfig, as for ASHA. One Tune result per epoch: "epoch" counts
    # finished epochs, and the last epoch's result stops the trial before PBT sees it (RunConfig stop).
    # Synchronous PBT ranks the population at the same epoch: under a curriculum a score depends on how
    # much data the epoch opened, so a trial one epoch ahead would win for being ahead, not for its values.
    return PopulationBasedTraining(time_attr="epoch", perturbation_interval=t.pbt_interval,
                                   hyperparam_mutations=mutations, quantile_fraction=t.pbt_quantile,
                                   custom_explore_fn=ClampToSpace.of(space), synch=True)


def checkpoint_history(checkpoint) -> list[dict]:
    """The history a training checkpoint carries: every logged step and epoch row of its lineage."""
    from distill_ray.train.loop import HISTORY_FILE

    with checkpoint.as_directory() as ckpt_dir:
        return json.loads((Path(ckpt_dir) / HISTORY_FILE).read_text())


def epoch_rows(history: list[dict], after_epoch: int = 0) -> list[dict]:
    """Per-epoch results as the loop reports them, rebuilt from a history: the epoch's validation row
    over the last step row before it (schedule, losses, teacher weights); ``epoch`` counts finished
    epochs (1..). Only epochs after ``after_epoch``."""
    rows, last_step = [], {}
    for row in history:
        if row.get("kind") != "epoch":
            last_step = row
        elif row["epoch"] + 1 > after_epoch:
            rows.append({**last_step, **row, "epoch": row["epoch"] + 1})
    return rows


def epochs_done(checkpoint) -> int:
    rows = epoch_rows(checkpoint_history(checkpoint)) if checkpoint else []
    return rows[-1]["epoch"] if rows else 0


def evolved_schedule(history: list[dict], metric: str) -> list[dict]:
    """Temperature and alpha per epoch under which a student was trained, with the metric after each
    epoch. After an exploit the history is the donor's up to that epoch: the student's own lineage."""
    return [{"epoch": r["epoch"], "temperature": r.get("temperature"), "alpha": r.get("alpha"),
             metric: r.get(metric)} for r in epoch_rows(history)]
