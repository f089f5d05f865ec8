"""Ray Tune sweeps over any config field, a winner exported and registered.

A search space is a YAML file naming config keys by dotted path (``loss.temperature``), so every
field is searchable without code changes. Each trial is a function trainable that runs the same
``TorchTrainer`` as ``distill-ray run`` (Train V2: Tune drives the trainer from inside the function,
metrics reach Tune through ``reports.train_to_tune``). Teachers and their soft-target cache are
prepared once, before the sweep; in cached mode trials only read the cached arrays, in online mode
they ask the teachers' services, started once for the whole sweep: no trial loads a teacher.

Population Based Training needs more than metrics: it clones a better trial's state into a weaker
one (exploit) and perturbs the clone's values (explore). A PBT trial therefore trains in segments of
``tune.pbt_interval`` epochs, each its own TorchTrainer run resumed from the previous segment's
checkpoint, and hands that checkpoint to Tune with the segment's last report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from distill_ray.config import ConfigError, ExperimentConfig, config_to_dict, dump_config
from distill_ray.console import is_verbose
from distill_ray.extras import available, install_hint
from distill_ray.evaluation.report import final_teacher_weights
from distill_ray.tune.capacity import fit_concurrency
from distill_ray.tune.reports import train_to_tune
from distill_ray.tune.release import PLACEMENT_GROUP_FILE, TRIAL_ACTOR_FILE, release_callback
from distill_ray.tune.terminal import trial_lines, tune_output
from distill_ray.tune.pbt import epochs_done, fit_population, pbt_scheduler, train_slots, checkpoint_history, \
    epoch_rows, evolved_schedule
from distill_ray.tune.space import SearchSpace, load_space, trial_config
from distill_ray.tune.summary import plot_sweep, trial_table, trials_text, write_summary
from distill_ray.tune.watchdog import PROGRESS_FILE, watched

PBT_SEARCHES = ("random", "grid")  # PBT evolves the trials it starts with; a searcher would propose new ones
SPACE_FILE = "space.yaml"
CONFIG_FILE = "config.yaml"
TRIALS_FILE = "trials.json"
TUNE_LOG = "tune.log"  # Ray Tune's own output (its status tables), unless -v
# distill_ray's modules before 0.2, when the package was flat (0.2 moved them into subpackages). A
# sweep's trials/tuner.pkl (cloudpickle) names the scheduler's explore function and the callbacks'
# helpers by these paths; four of them (data, teachers, train, tune) are packages now, without those names.
PRE_0_2_MODULES = frozenset(f"distill_ray.{name}" for name in (
    "losses", "blending", "curriculum", "schedules", "objectives", "sources", "presets", "data", "transfer", "chat",
    "teachers", "recipes", "teacher_setup", "cross_tokenizer", "token_alignment", "soft_targets", "cache_build",
    "cache_files", "response_cache", "train", "run_inputs", "stages", "streams", "validation", "generation",
    "sequence_kd", "reference", "evaluate", "scoring", "report", "ablation", "verdict", "tune", "tune_pbt",
    "tune_space", "tune_summary", "search", "serve_app", "serve_auth", "serve_launch", "serve_model",
    "serve_options", "serve_requests", "serve_service", "registry"))


# --- the trial ------------------------------------------------------------------------------------

def _trial(sampled: dict, *, base_raw: dict, space: SearchSpace, info, cache, storage: str, dirs=None,
           scope: str | None = None) -> None:
    """One Tune trial: a TorchTrainer from inside a function trainable (the Train V2 pattern). Online,
    it asks the teachers' services the sweep started (``scope``), and loads no teacher itself."""
    from distill_ray.train.inputs import online_teachers, training_inputs

    cfg = trial_config(base_raw, space, sampled)
    with online_teachers(cfg, dirs, info.task, scope=scope) as services:
        run_trial_training(cfg, training_inputs(cfg, cache, info, services=services), storage)


def run_trial_training(cfg: ExperimentConfig, inputs, storage: str) -> None:
    """A trial's Train run under the watchdog (``tune/watchdog.py``: with no progress for
    ``tune.stall_timeout_s`` the trial fails), its reports reaching Tune from this thread
    (``tune/reports.py``: not Ray's ``TuneReportCallback``, which can deadlock on the last report)."""
    from ray import tune

    from distill_ray.train.loop import run_training

    trial_id = tune.get_context().get_trial_id()
    trial_dir = trial_storage_dir(storage, trial_id)
    callback, forward, close = train_to_tune()
    try:
        # The same trial id resumes the same Train run (Tuner.restore re-runs unfinished trials).
        watched(lambda: run_training(cfg, inputs, storage, f"train-{trial_id}", callbacks=[callback],
                                     placement_group_file=str(trial_dir / PLACEMENT_GROUP_FILE),
                                     progress_file=str(trial_dir / PROGRESS_FILE)),
                cfg.tune.stall_timeout_s, [trial_dir, trial_dir / PROGRESS_FILE], between=forward)
        forward()  # the reports of the run's last moments
    finally:
        close()


def trial_storage_dir(storage: str, trial_id: str) -> Path:
    """``storage/train-ID``, holding the ids ``release.release_callback`` needs to free a stopped trial's workers."""
    import ray

    path = Path(storage) / f"train-{trial_id}"
    path.mkdir(parents=True, exist_ok=True)
    (path / TRIAL_ACTOR_FILE).write_text(ray.get_runtime_context().get_actor_id())
    return path


# --- Population Based Training --------------------------------------------------------------------

def _pbt_trial(sampled: dict, *, base_raw: dict, space: SearchSpace, info, cache, storage: str, slots, dirs=None,
               scope: str | None = None) -> None:
    """One PBT trial: segments of ``tune.pbt_interval`` epochs, each a TorchTrainer run resumed from the
    previous segment's checkpoint and ending in a Tune report that carries that checkpoint.

    Between segments PBT may pause the trial, clone a better trial's checkpoint into it and perturb
    its config. Tune then calls this function again from the top: ``sampled`` holds the perturbed
    values and ``tune.get_checkpoint()`` is the donor's state, so the donor's student continues under
    the new values (schedules still span ``train.epochs``). Every segment gets a fresh run name: a
    reused one would make Train resume that older run instead of the handed-over checkpoint."""
    from ray import tune

    from distill_ray.train.inputs import online_teachers, training_inputs
    from distill_ray.train.loop import run_training

    cfg = trial_config(base_raw, space, sampled)
    trial_dir = trial_storage_dir(storage, tune.get_context().get_trial_id())
    with online_teachers(cfg, dirs, info.task, scope=scope) as services:
        inputs = training_inputs(cfg, cache, info, services=services)
        checkpoint = tune.get_checkpoint()
        started_from = checkpoint.path if checkpoint else ""  # a donor's checkpoint after an exploit
        epoch = epochs_done(checkpoint)
        while epoch < cfg.train.epochs:
            # Segment ends on multiples of the interval, so every PBT decision point has a checkpoint.
            stop = min((epoch // cfg.tune.pbt_interval + 1) * cfg.tune.pbt_interval, cfg.train.epochs)
            segment = _next_segment(trial_dir)
            with _holding(slots):  # the watchdog counts from here: waiting for a slot is no stall
                result = watched(lambda: run_training(cfg, inputs, str(trial_dir), segment,
                                                      placement_group_file=str(trial_dir / PLACEMENT_GROUP_FILE),
                                                      progress_file=str(trial_dir / PROGRESS_FILE),
                                                      resume_from=checkpoint, stop_at_epoch=stop),
                                 cfg.tune.stall_timeout_s, [trial_dir, trial_dir / segment, trial_dir / PROGRESS_FILE])
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


def trial_scheduler(cfg: ExperimentConfig, space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "asha":
        # One Tune result per epoch; "epoch" counts finished epochs (1..epochs). max_t is one past the
        # last epoch so ASHA never kills a trial at its final report: the trial ends on its own and
        # its TorchTrainer shuts its workers down cleanly instead of leaving that to Ray's cleaner.
        return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs + 1,
                             grace_period=min(t.grace_period, cfg.train.epochs), reduction_factor=2)
    if t.scheduler == "pbt":
        return pbt_scheduler(cfg, space)
    return FIFOScheduler()


def search_algorithm(cfg: ExperimentConfig, space: SearchSpace):
    t = cfg.tune
    if t.scheduler == "pbt" and t.search not in PBT_SEARCHES:
        raise ConfigError(f"tune.search={t.search} cannot run with tune.scheduler=pbt: PBT evolves the trials it "
                          f"starts with, a search algorithm proposes new ones (Ray refuses the pair); "
                          f"valid choices with pbt: {', '.join(PBT_SEARCHES)}")
    if t.search == "optuna":
        if not available("optuna"):
            raise ConfigError("tune.search=optuna needs the optuna package (pip install optuna); "
                              "valid choices without it: random, grid")
        if space.has_grid():
            raise ConfigError("tune.search=optuna cannot take 'grid' params; use choice instead")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    if t.search == "grid" and not all(kind in ("grid", "choice") for _, kind, _ in space.params):
        raise ConfigError("tune.search=grid needs every param to be 'grid' or 'choice' (a grid has no ranges)")
    return None  # Tune's variant generator: random sampling, plus grid_search where written


def check_tracking(cfg: ExperimentConfig) -> None:
    """W&B logging (on by default, offline) needs the wandb extra: say so before teachers and cache."""
    if cfg.tracking.wandb != "disabled" and not available("wandb"):
        raise ConfigError(f"tracking.wandb={cfg.tracking.wandb} logs the sweep to W&B and needs the wandb package: "
                          f"{install_hint('wandb')}, or set tracking.wandb=disabled")


def tune_callbacks(cfg: ExperimentConfig, sweep_dir: Path, space: SearchSpace | None = None) -> list:
    callbacks = [release_callback(str(sweep_dir / "train"))]
    if space is not None:
        callbacks.append(trial_lines(cfg, space))
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


def set_tune_env() -> None:
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
    space = load_space(space_path, cfg)
    search_algorithm(cfg, space)  # a bad search/scheduler combination fails here, before any work
    trial_scheduler(cfg, space)
    check_tracking(cfg)
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
    check_tracking(cfg)
    check_resumable(sweep_dir)
    return _execute(cfg, load_space(sweep_dir / SPACE_FILE, cfg), sweep_dir, restore=True)


def check_resumable(sweep_dir: Path) -> None:
    """Read the sweep's saved Tuner state as ``Tuner.restore`` will, before teachers and cache: a sweep
    saved before 0.2 names modules that moved, and is refused with what to do instead."""
    import ray.cloudpickle as pickle

    state = sweep_dir / "trials" / "tuner.pkl"
    if not state.is_file():
        return  # Tuner.restore says what is missing
    try:
        pickle.loads(state.read_bytes())
    except (ImportError, AttributeError) as err:
        _raise_if_pre_0_2(err, sweep_dir)
        raise


def _raise_if_pre_0_2(err: BaseException, sweep_dir: Path) -> None:
    """ConfigError if ``err`` (or what caused it) is unpickling a name from a pre-0.2 module path."""
    seen, chain = err, set()
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        module = None
        if isinstance(seen, ModuleNotFoundError):
            module = seen.name
        elif isinstance(seen, AttributeError):  # "Can't get attribute 'x' on <module 'distill_ray.tune' from ...>"
            found = re.search(r"on <module '([\w.]+)'", str(seen))
            module = found.group(1) if found else None
        if module in PRE_0_2_MODULES:
            raise ConfigError(f"{sweep_dir}: this sweep was saved by distill-ray before 0.2 (flat modules: its "
                              f"state names {module}, and 0.2 moved the modules into subpackages); it cannot "
                              f"resume: start it again, `distill-ray tune {sweep_dir / CONFIG_FILE} --space "
                              f"{sweep_dir / SPACE_FILE} --set name=NEW_NAME`") from err
        seen = seen.__cause__ or seen.__context__


def _execute(cfg: ExperimentConfig, space: SearchSpace, sweep_dir: Path, restore: bool) -> dict:
    from distill_ray.lm.cut import student_from_teacher
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers, val_class_counts
    from distill_ray.registry.lineage import run_lineage, write_lineage
    from distill_ray.train.inputs import online_teachers

    set_tune_env()
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    cfg, _ = student_from_teacher(cfg, dirs, sweep_dir / "student_init")  # every trial starts from one cut
    lineage = run_lineage(cfg, dirs, class_names=data.info.class_names)  # the winner's, registered with it
    # Online or on-policy: each teacher's service starts once for the sweep, every trial asks it (under the sweep's
    # scope), and it stops when the sweep ends. Started before the trials are sized, so the CPUs its
    # replicas hold are not counted as free for trials.
    scope = f"sweep-{uuid.uuid4().hex[:12]}"
    with online_teachers(cfg, dirs, data.info.task, scope=scope,
                         on_policy=space.sets("loss.on_policy.lmbda")) as services:
        # Built or verified once, before any trial, with every measure the trials' schedulers may read.
        cache = build_cache(cfg, data, dirs, any_scheduler=space.sets("curriculum.scheduler"),
                            services=services or None)
        write_lineage(sweep_dir, replace(lineage, val_class_counts=tuple(val_class_counts(cache, data.info))))
        return _fit_trials(cfg, space, sweep_dir, restore, data.info, cache,
                           {"dirs": dirs, "scope": scope} if services else {})


def _fit_trials(cfg: ExperimentConfig, space: SearchSpace, sweep_dir: Path, restore: bool, info, cache,
                online: dict) -> dict:
    from ray import tune

    pbt = cfg.tune.scheduler == "pbt"
    if pbt:
        cfg, slots = fit_population(cfg, space)
        trial_fn, extra = _pbt_trial, {"slots": train_slots(slots)}
    else:
        cfg = fit_concurrency(cfg)
        trial_fn, extra = _trial, {}
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base_raw=config_to_dict(cfg), space=space, info=info, cache=cache,
                             storage=str(sweep_dir / "train"), **extra, **online),
        {"cpu": cfg.tune.cpus_per_trial})
    if restore:
        try:
            tuner = tune.Tuner.restore(str(sweep_dir / "trials"), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        except (ImportError, AttributeError) as err:
            _raise_if_pre_0_2(err, sweep_dir)
            raise
    else:
        tuner = tune.Tuner(
            trainable, param_space=space.to_tune(),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent, search_alg=search_algorithm(cfg, space),
                                        scheduler=trial_scheduler(cfg, space),
                                        # PBT pauses every trial at every perturbation: reuse its process
                                        reuse_actors=pbt),
            run_config=tune.RunConfig(name="trials", storage_path=str(sweep_dir),
                                      callbacks=tune_callbacks(cfg, sweep_dir, space),
                                      # the status table as trials progress (to TUNE_LOG); per-trial boxes with -v
                                      verbose=2 if is_verbose() else 1,
                                      # PBT: the last epoch ends the trial before PBT could clone into it
                                      stop={"epoch": cfg.train.epochs} if pbt else None),
        )
    if not is_verbose():
        print(f"tune: Ray Tune's status tables: {sweep_dir / TUNE_LOG}", flush=True)
    with tune_output(sweep_dir / TUNE_LOG):
        grid = tuner.fit()
    return finish_sweep(cfg, space, grid, sweep_dir, info, cache)


# --- results --------------------------------------------------------------------------------------

def finish_sweep(cfg: ExperimentConfig, space: SearchSpace, grid, sweep_dir: Path, info, cache) -> dict:
    rows = trial_table(cfg, space, grid)
    (sweep_dir / TRIALS_FILE).write_text(json.dumps(rows, indent=2, default=str))
    print(f"\n{trials_text(cfg, space, rows)}", flush=True)
    try:  # Tune's own pick (last reported metric per trial), then its row of the table
        winner = grid.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="last").path
    except RuntimeError:  # no trial reported the metric
        winner = None
    best = next((r for r in rows if r["path"] == winner and r["checkpoint_path"]), None)
    if best is None:
        raise RuntimeError(f"no trial reported {cfg.tune.metric!r} with a checkpoint; see {sweep_dir / 'trials'}")
    student_dir = export_best(cfg, space, best, sweep_dir, info, cache)
    registered = register_sweep(cfg, space, rows, best, sweep_dir, student_dir)
    plot_path = plot_sweep(rows, space, cfg.tune.metric, sweep_dir / "metric_vs_params.png")
    schedule = None
    if cfg.tune.scheduler == "pbt":  # what PBT found is a schedule: the winner's values epoch by epoch
        from ray.train import Checkpoint

        schedule = evolved_schedule(checkpoint_history(Checkpoint(best["checkpoint_path"])), cfg.tune.metric)
    write_summary(cfg, space, rows, sweep_dir, plot_path, registered, schedule)
    return {"best": best, "trials": rows, "student_dir": str(student_dir), "registered": registered,
            "sweep_dir": str(sweep_dir), "schedule": schedule}


def register_sweep(cfg: ExperimentConfig, space: SearchSpace, rows: list[dict], best: dict, sweep_dir: Path,
                   student_dir: Path) -> str:
    """Log every trial (its sampled values and last metric) as a run of the experiment ``distill-ray/NAME-sweep``
    in the registry's tracking store, from the driver after the sweep (one run per trial: no MLflow in
    the trials, nothing to set up on workers), then register the winner as a version of NAME with its
    trial's config and the sweep's lineage. Returns ``models:/NAME/N``."""
    from distill_ray.registry.lineage import LINEAGE_FILE, Lineage
    from distill_ray.registry.store import client_for, experiment_id, register, tracking_uri_of

    uri = tracking_uri_of(cfg)
    client = client_for(uri)
    experiment = experiment_id(client, uri, f"distill-ray/{cfg.name}-sweep")
    for r in rows:
        run = client.create_run(experiment, run_name=f"{sweep_dir.name}-{r['trial_id']}",
                                tags={"distill.sweep_dir": str(sweep_dir), "distill.status": r["status"]})
        for key, value in r["params"].items():
            client.log_param(run.info.run_id, key, str(value))
        if isinstance(r["metric"], (int, float)):
            client.log_metric(run.info.run_id, cfg.tune.metric, float(r["metric"]))
        client.set_terminated(run.info.run_id, status="FINISHED" if r["status"] == "done" else "FAILED")
    trial_cfg = trial_config(config_to_dict(cfg), space, best["params"])
    lineage_path = sweep_dir / LINEAGE_FILE
    lineage = Lineage.from_dict(json.loads(lineage_path.read_text())) if lineage_path.is_file() else None
    version = register(student_dir, cfg.name, run_dir=None, cfg=trial_cfg, tracking_uri=uri, lineage=lineage,
                       extra_tags={"distill.sweep_dir": str(sweep_dir), "distill.trial_id": str(best["trial_id"])})
    return f"models:/{cfg.name}/{version}"


def export_best(cfg: ExperimentConfig, space: SearchSpace, best: dict, sweep_dir: Path, info, cache) -> Path:
    from ray.train import Checkpoint

    from distill_ray.pipeline import training_inputs
    from distill_ray.models import save_tokenizer
    from distill_ray.train.loop import export_student, load_trained_student

    trial_cfg = trial_config(config_to_dict(cfg), space, best["params"])
    inputs = training_inputs(trial_cfg, cache, info, use_teachers=False)  # its shapes; no teacher is asked
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


