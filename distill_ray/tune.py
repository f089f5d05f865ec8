"""Ray Tune sweeps over any config field, a winner exported and registered.

A search space is a YAML file naming config keys by dotted path (``loss.temperature``), so every
field is searchable without code changes. Each trial is a function trainable that runs the same
``TorchTrainer`` as ``distill-ray run`` (Train V2: Tune drives the trainer from inside the function,
metrics reach Tune through ``TuneReportCallback``). Teachers and their soft-target cache are
prepared once, before the sweep; trials only read the cached arrays, so no trial runs a teacher.

Population Based Training needs more than metrics: it clones a better trial's state into a weaker
one (exploit) and perturbs the clone's values (explore). A PBT trial therefore trains in segments of
``tune.pbt_interval`` epochs, each its own TorchTrainer run resumed from the previous segment's
checkpoint, and hands that checkpoint to Tune with the segment's last report.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from distill_ray.report import final_teacher_weights
from distill_ray.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict, \
    dump_config, set_path

SPACE_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "randint")
PBT_SEARCHES = ("random", "grid")  # PBT evolves the trials it starts with; a searcher would propose new ones
SPACE_FILE = "space.yaml"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "sweep_summary.md"
TRIALS_FILE = "trials.json"
PLACEMENT_GROUP_FILE = "placement_group_id"
TRIAL_ACTOR_FILE = "trial_actor_id"


# --- search spaces --------------------------------------------------------------------------------

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
        if kind in ("uniform", "loguniform", "randint"):
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
    values = [(k, _plain(v)) for k, v in sampled.items() if k in {p for p, _, _ in space.params}]
    return config_from_dict(apply_overrides(base_raw, [*space.fixed, *values]))


def _plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python numbers (YAML and the config validator want those)."""
    return value.item() if hasattr(value, "item") else value


# --- the trial ------------------------------------------------------------------------------------

def _trial(sampled: dict, *, base_raw: dict, space: SearchSpace, info, cache, storage: str) -> None:
    """One Tune trial: a TorchTrainer from inside a function trainable (the Train V2 pattern)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distill_ray.pipeline import training_inputs
    from distill_ray.train import run_training

    cfg = trial_config(base_raw, space, sampled)
    trial_id = tune.get_context().get_trial_id()
    pg_file = _trial_dir(storage, trial_id) / PLACEMENT_GROUP_FILE
    # The same trial id resumes the same Train run (Tuner.restore re-runs unfinished trials).
    run_training(cfg, training_inputs(cfg, cache, info), storage, f"train-{trial_id}",
                 callbacks=[TuneReportCallback()], placement_group_file=str(pg_file))


def _trial_dir(storage: str, trial_id: str) -> Path:
    """``storage/train-ID``, holding the ids ``_release_callback`` needs to free a stopped trial's workers."""
    import ray

    path = Path(storage) / f"train-{trial_id}"
    path.mkdir(parents=True, exist_ok=True)
    (path / TRIAL_ACTOR_FILE).write_text(ray.get_runtime_context().get_actor_id())
    return path


# --- Population Based Training --------------------------------------------------------------------

def _pbt_trial(sampled: dict, *, base_raw: dict, space: SearchSpace, info, cache, storage: str, slots) -> None:
    """One PBT trial: segments of ``tune.pbt_interval`` epochs, each a TorchTrainer run resumed from the
    previous segment's checkpoint and ending in a Tune report that carries that checkpoint.

    Between segments PBT may pause the trial, clone a better trial's checkpoint into it and perturb
    its config. Tune then calls this function again from the top: ``sampled`` holds the perturbed
    values and ``tune.get_checkpoint()`` is the donor's state, so the donor's student continues under
    the new values (schedules still span ``train.epochs``). Every segment gets a fresh run name: a
    reused one would make Train resume that older run instead of the handed-over checkpoint."""
    from ray import tune

    from distill_ray.pipeline import training_inputs
    from distill_ray.train import run_training

    cfg = trial_config(base_raw, space, sampled)
    trial_dir = _trial_dir(storage, tune.get_context().get_trial_id())
    inputs = training_inputs(cfg, cache, info)
    checkpoint = tune.get_checkpoint()
    started_from = checkpoint.path if checkpoint else ""  # a donor's checkpoint after an exploit
    epoch = _epochs_done(checkpoint)
    while epoch < cfg.train.epochs:
        # Segment ends on multiples of the interval, so every PBT decision point has a checkpoint.
        stop = min((epoch // cfg.tune.pbt_interval + 1) * cfg.tune.pbt_interval, cfg.train.epochs)
        with _holding(slots):
            result = run_training(cfg, inputs, str(trial_dir), _next_segment(trial_dir),
                                  placement_group_file=str(trial_dir / PLACEMENT_GROUP_FILE),
                                  resume_from=checkpoint, stop_at_epoch=stop)
        checkpoint = result.checkpoint
        *earlier, last = epoch_rows(checkpoint_history(checkpoint), after_epoch=epoch)
        for row in earlier:  # one Tune result per epoch, as TuneReportCallback gives the other schedulers
            tune.report({**row, "resumed_from": started_from})
        tune.report({**last, "resumed_from": started_from, "checkpoint_path": checkpoint.path},
                    checkpoint=tune.Checkpoint.from_directory(checkpoint.path))
        epoch = stop


def _next_segment(trial_dir: Path) -> str:
    return f"segment-{len(list(trial_dir.glob('segment-*'))):03d}"


@contextmanager
def _holding(slots):
    import ray

    ray.get(slots.acquire.remote())
    try:
        yield
    finally:
        slots.release.remote()


def _train_slots(count: int):
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
    """TorchTrainer runs that fit beside the whole population's drivers (at most tune.max_concurrent).

    Raises ConfigError, with the numbers, when not even one fits."""
    drivers = population * cfg.tune.cpus_per_trial
    per_run = cfg.train.num_workers * cfg.train.cpus_per_worker
    fits = int((cluster_cpus - drivers) / per_run + 1e-9)
    if fits < 1:
        raise ConfigError(f"tune.scheduler=pbt keeps all {population} trials alive at once: their drivers hold "
                          f"{drivers:g} CPUs (tune.cpus_per_trial={cfg.tune.cpus_per_trial:g} each) and one "
                          f"TorchTrainer needs {per_run:g} more (train.num_workers x train.cpus_per_worker), "
                          f"but the cluster has {cluster_cpus:g}; lower tune.num_samples, tune.cpus_per_trial "
                          f"or train.cpus_per_worker")
    return min(fits, cfg.tune.max_concurrent)


def _fit_population(cfg: ExperimentConfig, space: SearchSpace) -> tuple[ExperimentConfig, int]:
    """PBT: every trial of the population is live at once; returns that config and the training slots."""
    import ray

    population = cfg.tune.num_samples * space.grid_size()
    slots = pbt_train_slots(cfg, population, ray.cluster_resources().get("CPU", 0))
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
            value = min(max(_plain(config[path]), low), high)
            config[path] = int(round(value)) if kind == "randint" else float(value)
        return config


def _pbt_scheduler(cfg: ExperimentConfig, space: SearchSpace):
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
    from distill_ray.train import HISTORY_FILE

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


def _epochs_done(checkpoint) -> int:
    rows = epoch_rows(checkpoint_history(checkpoint)) if checkpoint else []
    return rows[-1]["epoch"] if rows else 0


def evolved_schedule(history: list[dict], metric: str) -> list[dict]:
    """Temperature and alpha per epoch under which a student was trained, with the metric after each
    epoch. After an exploit the history is the donor's up to that epoch: the student's own lineage."""
    return [{"epoch": r["epoch"], "temperature": r.get("temperature"), "alpha": r.get("alpha"),
             metric: r.get(metric)} for r in epoch_rows(history)]


def _release_callback(storage: str):
    """A Tune callback that frees a stopped trial's Train workers.

    When ASHA stops a trial, Tune kills the trial's actor mid-``fit()``; the TorchTrainer's controller
    dies with it, but its workers' placement group outlives it (its lifetime is the driver's job),
    and Train's own cleaner needs the dashboard's state API, which a local Ray may not run. Left
    alone, the CPUs stay reserved and the next trial's workers wait forever. The group is removed
    only once the trial's actor is dead: removed earlier, a live controller would restart its
    workers in a new group."""
    import time

    from ray import tune

    class ReleaseTrainWorkers(tune.Callback):
        def __init__(self):
            self.pending: dict[str, float] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.pending[trial.trial_id] = time.monotonic()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.pending[trial.trial_id] = time.monotonic()

        def on_step_begin(self, iteration, trials, **info):
            for trial_id, since in list(self.pending.items()):
                if _actor_dead(_read(trial_id, TRIAL_ACTOR_FILE)) or time.monotonic() - since > 120:
                    _remove_group(_read(trial_id, PLACEMENT_GROUP_FILE))
                    del self.pending[trial_id]

        def on_experiment_end(self, trials, **info):
            deadline = time.monotonic() + 30
            while self.pending and time.monotonic() < deadline:
                self.on_step_begin(0, trials)
                time.sleep(0.5)

    def _read(trial_id: str, name: str) -> str | None:
        path = Path(storage) / f"train-{trial_id}" / name
        return path.read_text().strip() if path.is_file() else None

    return ReleaseTrainWorkers()


def _actor_dead(actor_id: str | None) -> bool:
    from ray._private.state import actors  # GCS table: works without the dashboard

    if actor_id is None:
        return True
    return (actors(actor_id=actor_id) or {}).get("State") in (None, "DEAD")


def _remove_group(group_id: str | None) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    if group_id is None:
        return
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)


def _scheduler(cfg: ExperimentConfig, space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "asha":
        # One Tune result per epoch; "epoch" counts finished epochs (1..epochs). max_t is one past the
        # last epoch so ASHA never kills a trial at its final report: the trial ends on its own and
        # its TorchTrainer shuts its workers down cleanly instead of leaving that to Ray's cleaner.
        return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs + 1,
                             grace_period=min(t.grace_period, cfg.train.epochs), reduction_factor=2)
    if t.scheduler == "pbt":
        return _pbt_scheduler(cfg, space)
    return FIFOScheduler()


def _search(cfg: ExperimentConfig, space: SearchSpace):
    t = cfg.tune
    if t.scheduler == "pbt" and t.search not in PBT_SEARCHES:
        raise ConfigError(f"tune.search={t.search} cannot run with tune.scheduler=pbt: PBT evolves the trials it "
                          f"starts with, a search algorithm proposes new ones (Ray refuses the pair); "
                          f"valid choices with pbt: {', '.join(PBT_SEARCHES)}")
    if t.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search=optuna needs the optuna package (pip install optuna); "
                              "valid choices without it: random, grid") from None
        if space.has_grid():
            raise ConfigError("tune.search=optuna cannot take 'grid' params; use choice instead")
        return OptunaSearch()
    if t.search == "grid" and not all(kind in ("grid", "choice") for _, kind, _ in space.params):
        raise ConfigError("tune.search=grid needs every param to be 'grid' or 'choice' (a grid has no ranges)")
    return None  # Tune's variant generator: random sampling, plus grid_search where written


def _callbacks(cfg: ExperimentConfig, sweep_dir: Path) -> list:
    callbacks = [_release_callback(str(sweep_dir / "train"))]
    mode = cfg.tracking.wandb
    if mode != "disabled":
        from ray.air.integrations.wandb import WandbLoggerCallback

        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"  # no key, no network: never block on a login prompt
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        callbacks.append(WandbLoggerCallback(project=cfg.tracking.project, mode=mode,
                                             dir=str(sweep_dir), excludes=["checkpoint_path", "resumed_from"]))
    return callbacks


def _fit_concurrency(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cap concurrent trials at what the cluster's CPUs can hold at once.

    A trial's driver holds ``cpus_per_trial``; its TorchTrainer asks for its workers separately. More
    trials than fit would start drivers whose workers wait for CPUs until Train's start-up timeout."""
    import ray

    need = cfg.tune.cpus_per_trial + cfg.train.num_workers * cfg.train.cpus_per_worker
    fits = max(1, int(ray.cluster_resources().get("CPU", 0) // need))
    if cfg.tune.max_concurrent > fits:
        print(f"tune: {cfg.tune.max_concurrent} concurrent trials asked, {fits} fit in this cluster's CPUs "
              f"({need:g} CPUs per trial); running {fits} at a time")
        cfg = replace(cfg, tune=replace(cfg.tune, max_concurrent=fits))
    return cfg


def _tune_env() -> None:
    # Trials report val_accuracy only per epoch; checkpoint-step reports lack it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


def sweep_path(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.tune.sweep_dir).expanduser() / cfg.name).resolve()


def run_sweep(cfg: ExperimentConfig, space_path: str | Path, samples: int | None = None,
              max_concurrent: int | None = None) -> dict:
    """Teachers + cache once -> Tune trials -> trial table, summary, plot -> winner exported and registered."""
    t = replace(cfg.tune, num_samples=samples or cfg.tune.num_samples,
                max_concurrent=max_concurrent or cfg.tune.max_concurrent, space=str(space_path))
    cfg = replace(cfg, tune=t)
    if cfg.train.mode != "cached":
        raise ConfigError("tune needs train.mode=cached: trials share the soft-target cache and never run teachers")
    space = load_space(space_path, cfg)
    _search(cfg, space)  # a bad search/scheduler combination fails here, before any work
    _scheduler(cfg, space)
    sweep_dir = sweep_path(cfg)
    if (sweep_dir / "trials").exists():
        raise ConfigError(f"{sweep_dir} already holds a sweep; finish it with `distill-ray tune --resume {sweep_dir}`"
                          f" or pick another name with --set name=...")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(space_path, sweep_dir / SPACE_FILE)
    (sweep_dir / CONFIG_FILE).write_text(dump_config(cfg))
    return _execute(cfg, space, sweep_dir, restore=False)


def resume_sweep(sweep_dir: str | Path) -> dict:
    """Finish an interrupted sweep (Tuner.restore): finished trials are kept, unfinished ones run."""
    from distill_ray.config import load_config

    sweep_dir = Path(sweep_dir).resolve()
    if not (sweep_dir / CONFIG_FILE).is_file() or not (sweep_dir / "trials").is_dir():
        raise ConfigError(f"{sweep_dir}: not a sweep directory (needs {CONFIG_FILE} and trials/)")
    cfg = load_config(sweep_dir / CONFIG_FILE)
    return _execute(cfg, load_space(sweep_dir / SPACE_FILE, cfg), sweep_dir, restore=True)


def _execute(cfg: ExperimentConfig, space: SearchSpace, sweep_dir: Path, restore: bool) -> dict:
    from ray import tune

    from distill_ray.pipeline import build_cache, load_data, prepare_teachers

    _tune_env()
    if cfg.train.mode != "cached":
        raise ValueError(f"train.mode={cfg.train.mode}: a sweep computes the soft targets once and every trial "
                         "reads them from the cache; use train.mode=cached")
    pbt = cfg.tune.scheduler == "pbt"
    if pbt:
        cfg, slots = _fit_population(cfg, space)
        trial_fn, extra = _pbt_trial, {"slots": _train_slots(slots)}
    else:
        cfg = _fit_concurrency(cfg)
        trial_fn, extra = _trial, {}
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    cache = build_cache(cfg, data, dirs)  # built or verified once, before any trial
    info = data.info

    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base_raw=config_to_dict(cfg), space=space, info=info, cache=cache,
                             storage=str(sweep_dir / "train"), **extra),
        {"cpu": cfg.tune.cpus_per_trial})
    if restore:
        tuner = tune.Tuner.restore(str(sweep_dir / "trials"), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space.to_tune(),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent, search_alg=_search(cfg, space),
                                        scheduler=_scheduler(cfg, space),
                                        # PBT pauses every trial at every perturbation: reuse its process
                                        reuse_actors=pbt),
            run_config=tune.RunConfig(name="trials", storage_path=str(sweep_dir), callbacks=_callbacks(cfg, sweep_dir),
                                      # PBT: the last epoch ends the trial before PBT could clone into it
                                      stop={"epoch": cfg.train.epochs} if pbt else None),
        )
    grid = tuner.fit()
    return finish_sweep(cfg, space, grid, sweep_dir, info, cache)


# --- results --------------------------------------------------------------------------------------

def trial_table(cfg: ExperimentConfig, space: SearchSpace, grid) -> list[dict]:
    """One row per trial: id, sampled values, last reported metric, epochs done, status; best first."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        rows.append({"trial_id": metrics.get("trial_id") or Path(result.path).name,
                     "params": {k: _plain(config.get(k)) for k, _, _ in space.params},
                     "metric": metrics.get(cfg.tune.metric), "epochs": metrics.get("epoch"),
                     "checkpoint_path": metrics.get("checkpoint_path"),
                     "status": "error" if result.error else "done", "path": result.path})
    sign = -1 if cfg.tune.mode == "max" else 1
    scored = [r for r in rows if isinstance(r["metric"], (int, float)) and not math.isnan(r["metric"])]
    scored.sort(key=lambda r: sign * r["metric"])
    return scored + [r for r in rows if r not in scored]


def finish_sweep(cfg: ExperimentConfig, space: SearchSpace, grid, sweep_dir: Path, info, cache) -> dict:
    rows = trial_table(cfg, space, grid)
    (sweep_dir / TRIALS_FILE).write_text(json.dumps(rows, indent=2, default=str))
    best = next((r for r in rows if r["metric"] is not None and r["checkpoint_path"]), None)
    if best is None:
        raise RuntimeError(f"no trial reported {cfg.tune.metric!r} with a checkpoint; see {sweep_dir / 'trials'}")
    student_dir = export_best(cfg, space, best, sweep_dir, info, cache)
    version_dir = register(student_dir, Path(cfg.tune.registry_dir).expanduser() / cfg.name)
    plot_path = plot_sweep(rows, space, cfg.tune.metric, sweep_dir / "metric_vs_params.png")
    schedule = None
    if cfg.tune.scheduler == "pbt":  # what PBT found is a schedule: the winner's values epoch by epoch
        from ray.train import Checkpoint

        schedule = evolved_schedule(checkpoint_history(Checkpoint(best["checkpoint_path"])), cfg.tune.metric)
    write_summary(cfg, space, rows, sweep_dir, plot_path, version_dir, schedule)
    return {"best": best, "trials": rows, "student_dir": str(student_dir), "registered": str(version_dir),
            "sweep_dir": str(sweep_dir), "schedule": schedule}


def export_best(cfg: ExperimentConfig, space: SearchSpace, best: dict, sweep_dir: Path, info, cache) -> Path:
    from ray.train import Checkpoint

    from distill_ray.pipeline import training_inputs
    from distill_ray.models import save_tokenizer
    from distill_ray.train import export_student, load_trained_student

    trial_cfg = trial_config(config_to_dict(cfg), space, best["params"])
    inputs = training_inputs(trial_cfg, cache, info)
    student, history, _ = load_trained_student(trial_cfg, inputs, Checkpoint(best["checkpoint_path"]))
    weights = final_teacher_weights(history)
    card = {"name": cfg.name, "task": cfg.data.task, "dataset": cfg.data.format, "teachers": list(cfg.teacher_names()),
            "teacher_weights": weights, "metrics": {cfg.tune.metric: best["metric"]}, "trial_id": best["trial_id"],
            "params": best["params"], "config": config_to_dict(trial_cfg), "class_names": list(info.class_names),
            "source": "tune"}
    out = sweep_dir / "best" / "student"
    if out.exists():
        shutil.rmtree(out)
    export_student(trial_cfg, inputs, student, out, card, info.to_dict())
    if info.tokenizer:  # a text student serves raw text: its tokenizer goes with it
        save_tokenizer(info.tokenizer, out, max_length=info.input_shape[-1])
    (sweep_dir / "best" / "config.yaml").write_text(dump_config(trial_cfg))
    return out


def register(student_dir: Path, model_root: Path) -> Path:
    """Copy a student into ``model_root/vN`` (N = last + 1) and point ``model_root/latest`` at it.

    The copy lands under a temporary name and is renamed, and ``latest`` is a small text file replaced
    atomically, so a reader (the Serve app) never sees a half-written version."""
    model_root.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name[1:]) for p in model_root.glob("v*") if p.name[1:].isdigit()]
    version = f"v{max(versions, default=0) + 1}"
    tmp = model_root / f".{version}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(student_dir, tmp)
    card_path = tmp / "distill_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card["version"] = version
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    os.replace(tmp, model_root / version)
    pointer = model_root / ".latest.tmp"
    pointer.write_text(version + "\n")
    os.replace(pointer, model_root / "latest")
    return model_root / version


def resolve_registry(model_root: str | Path, version: str = "latest") -> Path:
    """``registry/NAME`` (+ version or ``latest``) -> the version's student directory."""
    model_root = Path(model_root)
    if version == "latest":
        pointer = model_root / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"{model_root}: no 'latest' pointer; is this a registry entry?")
        version = pointer.read_text().strip()
    path = model_root / version
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such registered version")
    return path


def plot_sweep(rows: list[dict], space: SearchSpace, metric: str, path: Path) -> Path | None:
    """Metric against temperature and alpha (when searched; else the first two numeric params)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k, kind, _ in space.params if kind in ("uniform", "loguniform", "randint")
               or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in _args(space, k))]
    preferred = [k for k in ("loss.temperature", "loss.alpha") if k in numeric]
    keys = (preferred + [k for k in numeric if k not in preferred])[:2]
    done = [r for r in rows if r["metric"] is not None]
    if not keys or not done:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r["params"][key] for r in done]
        ax.scatter(xs, [r["metric"] for r in done], c=[r["epochs"] or 0 for r in done], cmap="viridis")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if dict((k, kind) for k, kind, _ in space.params)[key] == "loguniform":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial (colour: epochs run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _args(space: SearchSpace, key: str) -> tuple:
    return next(a for k, _, a in space.params if k == key)


def write_summary(cfg: ExperimentConfig, space: SearchSpace, rows: list[dict], sweep_dir: Path,
                  plot_path: Path | None, version_dir: Path, schedule: list[dict] | None = None) -> Path:
    """``sweep_summary.md``: the trial table, best first; for PBT also the winner's evolved schedule."""
    import ray

    keys = [k for k, _, _ in space.params]
    lines = [f"# Sweep `{cfg.name}`", "",
             f"Space `{cfg.tune.space}` ({space.description.strip() or 'no description'}); "
             f"{len(rows)} trials, search {cfg.tune.search}, scheduler {cfg.tune.scheduler}, "
             f"metric `{cfg.tune.metric}` ({cfg.tune.mode}, last reported epoch).", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.system()}, Ray {ray.__version__}.", "",
             "| rank | trial | " + " | ".join(keys) + f" | {cfg.tune.metric} | epochs | status |",
             "|---" * (len(keys) + 5) + "|"]
    for i, r in enumerate(rows, 1):
        values = " | ".join(_fmt(r["params"][k]) for k in keys)
        lines.append(f"| {i} | {r['trial_id']} | {values} | {_fmt(r['metric'])} | {r['epochs']} | {r['status']} |")
    lines += ["", f"Winner: trial `{rows[0]['trial_id']}`, exported to `best/student/` and registered as "
                  f"`{version_dir}`.", ""]
    if schedule:
        lines += _schedule_lines(schedule, cfg.tune.metric)
    if plot_path:
        lines.append(f"![metric against searched values]({plot_path.name})")
    path = sweep_dir / SUMMARY_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _schedule_lines(schedule: list[dict], metric: str) -> list[str]:
    lines = ["## The winner's evolved schedule (PBT)", "",
             "Values in the table above are each trial's last ones. The winning student was trained under "
             "these, epoch by epoch; epochs before an exploit were trained by the trial it cloned.", "",
             f"| epoch | temperature | alpha | {metric} |", "|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {_fmt(r['temperature'])} | {_fmt(r['alpha'])} | {_fmt(r[metric])} |"
              for r in schedule]
    return lines + [""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
