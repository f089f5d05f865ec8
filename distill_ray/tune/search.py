"""The search built into a run: ``distill-ray run CONFIG --search N``.

Before the student and its baseline train, a small Ray Tune search (ASHA on the validation split,
the cached soft targets) tries N settings of what decides whether distillation pays on data nobody
tuned for: ``loss.temperature``, ``loss.alpha`` and the transfer set (``data.transfer``'s kind and
``data.transfer_size``). The config's own settings are always the first trial, so the search can only
move off them for a better validation score. The run then trains with the winner, exactly as
``distill-ray run`` would with those values set, and prints what it picked and why.

The transfer set is searched on one cache per kind, built once with the largest size: a trial of a
smaller size keeps the first copies of every row (``transfer.first_copies``), so sizes cost no
extra teacher pass. That needs every unlabeled train row to be a transfer row; data with unlabeled
rows of its own keeps its configured transfer set and the search moves temperature and alpha only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

from distill_ray.config import ExperimentConfig, config_to_dict
from distill_ray.data.transfer import KINDS_FOR

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ALPHAS = (0.3, 0.5, 0.7, 0.9)
TRANSFER_SIZES = (2, 4, 8)
MAX_TRANSFER_ROWS = 400_000  # sizes whose transfer set would pass this are left out of the search
SEARCH_DIR = "search"


def _transfer_kinds(data_kind: str) -> tuple[str, ...]:
    """Kinds that make different rows for this data (augment is noise for tables: tried once)."""
    kinds = KINDS_FOR.get(data_kind, ())
    return tuple(k for k in kinds if not (data_kind == "tabular" and k == "augment"))


def search_space(cfg: ExperimentConfig, info) -> tuple[dict[str, tuple], dict[str, Any]]:
    """The choices per searched key, and the config's own values (the first trial). The transfer set is
    one key, ``transfer``: "none" or "KIND xSIZE" (a size without a kind would repeat "none")."""
    own = {"loss.temperature": cfg.loss.temperature, "loss.alpha": cfg.loss.alpha}
    choices: dict[str, tuple] = {"loss.temperature": TEMPERATURES, "loss.alpha": ALPHAS}
    own_unlabeled = info.counts["train"] - info.transfer_rows - info.labeled["train"]
    kinds = _transfer_kinds(info.kind) if info.task == "classification" and own_unlabeled == 0 else ()
    source_rows = info.counts["train"] - info.transfer_rows
    sizes = tuple(s for s in TRANSFER_SIZES if s * source_rows <= MAX_TRANSFER_ROWS) or (min(TRANSFER_SIZES),)
    if kinds:
        choices["transfer"] = ("none", *(f"{k} x{s}" for k in kinds for s in sizes))
        own["transfer"] = "none" if info.transfer == "none" else f"{info.transfer} x{cfg.data.transfer_size}"
    return choices, own


def config_values(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as config keys (``transfer`` -> data.transfer, data.transfer_size)."""
    values = {k: plain_value(v) for k, v in params.items() if k != "transfer"}
    if "transfer" in params:
        kind, _, size = str(params["transfer"]).partition(" x")
        values["data.transfer"] = kind
        if size:
            values["data.transfer_size"] = int(size)
    return values


def with_values(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    from distill_ray.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(config_to_dict(cfg), list(values.items())))


def _trial(sampled: dict, *, base_raw: dict, caches: dict, storage: str) -> None:
    """One Tune trial: the Train run of ``distill-ray run`` on the cache of its transfer kind."""
    from distill_ray.config import apply_overrides, config_from_dict
    from distill_ray.data.transfer import first_copies
    from distill_ray.train.inputs import training_inputs
    from distill_ray.tune.sweep import run_trial_training

    cfg = config_from_dict(apply_overrides(base_raw, list(config_values(sampled).items())))
    kind = cfg.data.transfer if cfg.data.transfer in caches else next(iter(caches))
    cache, info, built = caches[kind]
    copies = 0 if cfg.data.transfer == "none" else cfg.data.transfer_size
    stage = (first_copies, {"copies": copies}) if built else None
    inputs = training_inputs(cfg, cache, info, stage=stage)
    if built:  # the rows this trial trains on: every source row and `copies` transfer copies of each
        source = info.counts["train"] - info.transfer_rows
        inputs = dataclasses.replace(inputs, train_rows=source * (1 + copies))
    run_trial_training(cfg, inputs, storage)


def run_search(cfg: ExperimentConfig, samples: int) -> tuple[ExperimentConfig, dict]:
    """Search, then return the config to train the final student with and what the search found."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from distill_ray.cache.build import build_cache
    from distill_ray.data.sources import load_source
    from distill_ray.lm.cut import student_from_teacher
    from distill_ray.teachers.setup import prepare_teachers
    from distill_ray.tune.capacity import fit_concurrency
    from distill_ray.tune.sweep import tune_callbacks, set_tune_env

    if cfg.train.mode != "cached":
        raise ValueError("--search reads the cached soft targets in every trial; set train.mode=cached")
    set_tune_env()
    data = load_source(cfg)
    choices, own = search_space(cfg, data.info)
    dirs = prepare_teachers(cfg, data)
    cfg, _ = student_from_teacher(cfg, dirs, cfg.run_path() / "student_init")
    caches: dict[str, tuple] = {}
    transfers = [config_values({"transfer": t}) for t in choices.get("transfer", ())[1:]]
    for kind in dict.fromkeys(t["data.transfer"] for t in transfers):  # one cache per kind, at its largest size
        size = max(t["data.transfer_size"] for t in transfers if t["data.transfer"] == kind)
        kind_cfg = with_values(cfg, {"data.transfer": kind, "data.transfer_size": size})
        kind_data = load_source(kind_cfg)
        caches[kind] = (build_cache(kind_cfg, kind_data, dirs), kind_data.info, True)
    if not caches:  # nothing to search in the transfer set: the config's own data and cache
        caches["none"] = (build_cache(cfg, data, dirs), data.info, False)
    search_dir = (cfg.run_path() / SEARCH_DIR).resolve()
    search_dir.mkdir(parents=True, exist_ok=True)
    tune_cfg = fit_concurrency(dataclasses.replace(cfg, tune=dataclasses.replace(
        cfg.tune, scheduler="asha", metric="val_accuracy", mode="max", num_samples=samples)))
    log = search_dir / "tune.log"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base_raw=config_to_dict(cfg), caches=caches, storage=str(search_dir / "train")),
        {"cpu": tune_cfg.tune.cpus_per_trial})
    print(f"search: {samples} trials over {', '.join(choices)} (the config's own values first), ASHA on "
          f"val_accuracy, {tune_cfg.tune.max_concurrent} at a time (Tune's log: {log})", flush=True)
    tuner = tune.Tuner(
        trainable, param_space={k: tune.choice(list(v)) for k, v in choices.items()},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=samples,
                                    search_alg=BasicVariantGenerator(points_to_evaluate=[own],
                                                                     max_concurrent=tune_cfg.tune.max_concurrent),
                                    scheduler=_step_asha(cfg, choices, caches)),
        run_config=tune.RunConfig(name="trials", storage_path=str(search_dir),
                                  callbacks=tune_callbacks(dataclasses.replace(cfg, tracking=dataclasses.replace(
                                      cfg.tracking, wandb="disabled")), search_dir), verbose=0))
    with log.open("a") as out, contextlib.redirect_stdout(out):  # Tune's tables: a file, not the terminal
        grid = tuner.fit()
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        best = float(history["val_accuracy"].max()) if history is not None and "val_accuracy" in history else None
        rows.append({"params": config_values({k: result.config.get(k) for k in choices}), "val_accuracy": best,
                     "epochs": (result.metrics or {}).get("epoch"), "error": str(result.error) if result.error else None})
    own = config_values(own)
    # A tie with the config's own values keeps them: the search moves only for a better validation score.
    scored = sorted((r for r in rows if r["val_accuracy"] is not None),
                    key=lambda r: (-r["val_accuracy"], r["params"] != own))
    if not scored:
        raise RuntimeError(f"no search trial reported val_accuracy; see {search_dir / 'trials'}")
    winner = scored[0]
    own_row = next((r for r in scored if r["params"] == own), None)
    found = {"trials": scored + [r for r in rows if r["val_accuracy"] is None], "picked": winner["params"],
             "own": own, "own_val_accuracy": own_row["val_accuracy"] if own_row else None}
    (search_dir / "search.json").write_text(json.dumps(found, indent=2))
    _print_found(found)
    return with_values(cfg, winner["params"]), found


def _step_asha(cfg: ExperimentConfig, choices: dict, caches: dict):
    """ASHA that compares trials at equal optimizer steps, not epochs: an epoch with a transfer set of 8
    copies takes 9x the steps of one without, and a trial must not lose for having seen less."""
    from ray.tune.schedulers import ASHAScheduler

    from distill_ray.kd.objectives import planned_steps

    info = next(iter(caches.values()))[1]
    source = info.counts["train"] - info.transfer_rows
    rows = [source * (1 + config_values({"transfer": t}).get("data.transfer_size", 0)) if t != "none" else source
            for t in choices.get("transfer", ("none",))]
    if "transfer" not in choices:
        rows = [info.counts["train"]]
    steps = [planned_steps(cfg, r, cfg.train.num_workers) for r in rows]
    # Rungs from one epoch of the smallest set, doubling; no trial is stopped at its own last report.
    return ASHAScheduler(time_attr="step", max_t=max(steps) + 1,
                         grace_period=max(1, min(steps) // cfg.train.epochs), reduction_factor=2)


def plain_value(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _describe(params: dict) -> str:
    out = [f"T={params['loss.temperature']:g}", f"alpha={params['loss.alpha']:g}"]
    if "data.transfer" in params:
        out.append("no transfer set" if params["data.transfer"] == "none" else
                   f"transfer {params['data.transfer']} x{params['data.transfer_size']}")
    return ", ".join(out)


def _print_found(found: dict) -> None:
    trials = [t for t in found["trials"] if t["val_accuracy"] is not None]
    for rank, t in enumerate(trials[:5], 1):
        print(f"search: #{rank} val accuracy {t['val_accuracy']:.4f} after {t['epochs']} epochs: "
              f"{_describe(t['params'])}")
    own = found["own_val_accuracy"]
    why = f"the best validation accuracy of {len(trials)} trials ({trials[0]['val_accuracy']:.4f}" + \
        (f"; the config's own settings reached {own:.4f})" if own is not None else ")")
    print(f"search: picked {_describe(found['picked'])}: {why}", flush=True)
