"""The driver's phases: connect to Ray, prepare teachers, cache soft targets, train, evaluate, export.

Each phase is one function the CLI and the ``jobs/`` entrypoints call. Data moves as Ray Datasets
from storage to the student's loss (``sources.load_source`` -> teacher actor-pool stages that write
the cache -> ``TorchTrainer(datasets=...)``); the driver holds small facts (counts, label names,
fingerprints, manifests), never a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import ray
import torch

from distill_ray import curriculum as cur
from distill_ray.config import ExperimentConfig, config_to_dict, dump_config
from distill_ray.console import RunProgress, log_to_run_dir
from distill_ray.data import Split, cache_root, smollm2_path
from distill_ray.models import build_model, load_model, num_params, save_model, save_tokenizer
from distill_ray.report import final_teacher_weights, gap_recovered
from distill_ray.soft_targets import CacheSpec, CachedData, CorruptCacheError, cache_dir_for, write_cache
from distill_ray.sources import DataInfo, SourceData, load_source
from distill_ray.stages import MixSettings, feature_shapes, with_teachers
from distill_ray.teachers import TeacherSpec
from distill_ray.train import TrainInputs


def connect_ray(address: str | None = None) -> None:
    """Join the cluster named by ``address``/RAY_ADDRESS or running on this machine; else start one.

    A local Ray started here binds its dashboard to nothing (include_dashboard=False) and advertises
    twice the machine's cores (at least 4) as logical CPUs: teacher actors and Train workers reserve
    CPUs for the whole run while mostly waiting on each other, and the Ray Data tasks that read and
    preprocess the stream beside them need CPUs of their own; with exactly the real cores reserved,
    a 2-core laptop would deadlock (every CPU held by actors, no read task can start). Worker output
    stays in Ray's logs unless ``--verbose`` (see ``console.py``).
    """
    from distill_ray.console import is_verbose, quiet_ray_loggers

    # Ray Data's per-operator bars would print a line per update from every task and Train worker; the
    # datasets built after this carry the setting with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    quiet_ray_loggers()
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own INFO at start-up ("Started a local Ray instance") stays off the terminal too.
    quiet = {"log_to_driver": is_verbose(), "logging_level": logging.INFO if is_verbose() else logging.WARNING}
    local = {"include_dashboard": False, "num_cpus": max(4, 2 * (os.cpu_count() or 1))}
    if address == "local":  # a private Ray even when another runs on this machine
        ray.init(address="local", **local, **quiet)
    elif address:
        ray.init(address=address, **quiet)
    else:
        try:
            ray.init(address="auto", **quiet)
        except ConnectionError:
            ray.init(**local, **quiet)
    quiet_ray_loggers()


def load_data(cfg: ExperimentConfig) -> SourceData:
    """The configured data as lazy, preprocessed Ray Datasets per split (see ``sources.py``)."""
    return load_source(cfg)


# --- teachers -------------------------------------------------------------------------------------

def _recipe_dir(cfg: ExperimentConfig, index: int, key: str) -> Path:
    t = cfg.teachers[index]
    recipe = json.dumps({"recipe": t.recipe, "options": dict(t.options), "data": key, "seed": cfg.train.seed},
                        sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return Path(t.path).expanduser() if t.path else cache_root() / "teachers" / f"{t.name}-{digest}"


def collect_split(dataset, labeled_only: bool = False, limit: int | None = None) -> Split:
    """Rows of a split as numpy, inside a task that needs them in memory (a recipe's training set)."""
    xs, ys, ids = [], [], []
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        keep = np.ones(len(batch["id"]), bool) if not labeled_only else \
            (batch["label"] >= 0 if batch["label"].ndim == 1 else np.ones(len(batch["id"]), bool))
        xs.append(batch["x"][keep]), ys.append(batch["label"][keep]), ids.append(batch["id"][keep])
        if limit is not None and sum(len(i) for i in ids) >= limit:
            break
    if not ids:
        raise ValueError("the split is empty")
    return Split(np.concatenate(xs), np.concatenate(ys), np.concatenate(ids))


def _train_recipe(name: str, recipe: str, options: dict, train_ds, val_ds, info: dict, seed: int, out_dir: str) -> dict:
    """Runs as a Ray task: read the train split's labeled rows, train one teacher from them, save it
    as a model directory, atomically."""
    from distill_ray.evaluate import accuracy, lm_label_logprobs, predict_logits, token_accuracy
    from distill_ray.recipes import train_recipe

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, val = collect_split(train_ds, labeled_only=True), collect_split(val_ds, labeled_only=True)
    if len(train) == 0:
        raise ValueError(f"teacher {name}: the train split has no labeled rows to train a recipe on")
    model = build_model(recipe, tuple(info["input_shape"]), info["num_classes"], options)
    start = time.perf_counter()
    train_recipe(model, train, options, seed=seed, desc=f"teacher {name}", pad_id=info["pad_id"])
    seconds = round(time.perf_counter() - start, 1)
    if info["task"] == "causal_lm":  # next-token accuracy; a [N, L, V] logits tensor would not fit
        val_acc = token_accuracy(lm_label_logprobs(model, val.inputs, val.labels)[1], val.labels)
    else:
        val_acc = accuracy(predict_logits(model, val.inputs), val.labels)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    save_model(model, tmp, {"arch": recipe, "input_shape": list(info["input_shape"]), "num_classes": info["num_classes"],
                            "options": options, "teacher": name, "val_accuracy": val_acc, "train_seconds": seconds})
    if info["tokenizer"]:  # text teachers carry their tokenizer, so the directory works on its own
        save_tokenizer(info["tokenizer"], tmp, max_length=info["input_shape"][-1])
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"name": name, "val_accuracy": val_acc, "params": num_params(model), "seconds": seconds}


def prepare_teachers(cfg: ExperimentConfig, data: SourceData, retrain: bool = False) -> dict[str, Path]:
    """Model directory per teacher; recipes are trained (in parallel Ray tasks that read the train
    split themselves) unless already there for this data."""
    key = data.info.fingerprint
    dirs, jobs, splits = {}, [], None
    for i, t in enumerate(cfg.teachers):
        if t.source != "recipe":
            # 'smollm2' names the pretrained SmolLM2 from PyPI (converted once); anything else is a directory.
            dirs[t.name] = smollm2_path() if t.path == "smollm2" else Path(t.path).expanduser()
            continue
        out = _recipe_dir(cfg, i, key)
        dirs[t.name] = out
        if (out / "distill_spec.json").is_file() and not retrain:
            print(f"teacher {t.name}: reusing {out}")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        # Read once for all recipes, into the object store (never the driver): the tasks then hold their
        # CPU without needing more for read tasks, and every recipe reads the same blocks.
        splits = splits or (data.train.materialize(), data.val.materialize())
        task = ray.remote(num_cpus=1, num_gpus=t.num_gpus)(_train_recipe)
        jobs.append(task.remote(t.name, t.recipe, dict(t.options), *splits, data.info.to_dict(),
                                cfg.train.seed, str(out)))
    for info in ray.get(jobs):
        print(f"teacher {info['name']}: trained in {info['seconds']:.0f}s, {info['params']:,} params, "
              f"val accuracy {info['val_accuracy']:.4f}")
    return dirs


def teacher_specs(cfg: ExperimentConfig, dirs: dict[str, Path], causal: bool = False,
                  features: dict[str, tuple[str, ...]] | None = None, trace_file: str | None = None) -> list[TeacherSpec]:
    """Each teacher as an actor-pool stage: where it lives, its actors' size, what it answers."""
    return [TeacherSpec(t.name, str(dirs[t.name]), t.num_cpus, t.num_gpus, t.replicas, t.dtype,
                        topk=cfg.loss.topk, features=(features or {}).get(t.name, ()),
                        # per-token logits [b, L, V] of a language model are big until top-k cuts them
                        batch_size=32 if causal else 512, trace_file=trace_file)
            for t in cfg.teachers]


# --- soft-target cache ----------------------------------------------------------------------------

def cache_spec(cfg: ExperimentConfig, info: DataInfo, dirs: dict[str, Path]) -> CacheSpec:
    from distill_ray.models import fingerprint

    prints = {}
    for t in cfg.teachers:
        model, _ = load_model(dirs[t.name])
        prints[t.name] = fingerprint(model)
    return CacheSpec(teacher_fingerprints=prints, data_fingerprint=info.fingerprint, num_classes=info.num_classes,
                     topk=cfg.loss.topk, dtype=cfg.cache.dtype,
                     seq_len=info.input_shape[-1] if info.task == "causal_lm" else None)


def finish_rows(batch: dict[str, np.ndarray], teachers: tuple[str, ...], dtype: str, topk: int | None,
                num_classes: int, causal: bool, pad_id: int | None) -> dict[str, np.ndarray]:
    """The last stage before the cache: targets in the storage dtype (refusing a float16 overflow,
    which would NaN the loss later) and every difficulty measure as a column, so any curriculum
    config reads the same cache."""
    from distill_ray.losses import dense_from_topk, topk_label_logprobs

    for t in teachers:
        key = f"{t}/logits" if topk is None else f"{t}/topk_logprobs"
        values = np.asarray(batch[key], dtype=np.float32)
        with np.errstate(over="ignore"):
            stored = values.astype(dtype)
        bad = np.isinf(stored) & np.isfinite(values)
        if bad.any():
            raise ValueError(f"teacher {t!r}: values overflow {dtype} (max |x| = {np.abs(values[bad]).max():.4g}); "
                             "store them as float32 (cache.dtype=float32)")
        batch[key] = stored
        if topk is not None:
            batch[f"{t}/topk_indices"] = np.asarray(batch[f"{t}/topk_indices"], dtype=np.int32)
    labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
    if causal:
        logp = torch.stack([torch.as_tensor(np.asarray(batch[f"{t}/topk_logprobs"], np.float32)) for t in teachers])
        idx = torch.stack([torch.as_tensor(np.asarray(batch[f"{t}/topk_indices"], np.int64)) for t in teachers])
        mask = (labels >= 0).float()
        nll = -topk_label_logprobs(logp, idx, labels.unsqueeze(0).expand(len(teachers), -1, -1), num_classes).mean(0)
        batch["difficulty/teacher_ce"] = ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).numpy().astype(np.float32)
        x = np.asarray(batch["x"])
        batch["difficulty/sequence_length"] = (x != (0 if pad_id is None else pad_id)).sum(1).astype(np.float32)
        return batch
    if topk is None:
        logits = torch.stack([torch.as_tensor(np.asarray(batch[f"{t}/logits"], np.float32)) for t in teachers])
    else:
        logits = torch.stack([dense_from_topk(torch.as_tensor(np.asarray(batch[f"{t}/topk_logprobs"], np.float32)),
                                              torch.as_tensor(np.asarray(batch[f"{t}/topk_indices"], np.int64)),
                                              num_classes) for t in teachers])
    batch["difficulty/ensemble_entropy"] = cur.ensemble_entropy(logits).numpy().astype(np.float32)
    batch["difficulty/teacher_disagreement"] = cur.teacher_disagreement(logits).numpy().astype(np.float32)
    # Unlabeled rows: the mean teacher's loss on its own top guess (how unsure the teachers are).
    mean_logp = torch.logsumexp(torch.log_softmax(logits, -1), 0) - np.log(len(teachers))
    target = torch.where(labels >= 0, labels, mean_logp.argmax(-1))
    batch["difficulty/teacher_ce"] = cur.teacher_ce(logits, target).numpy().astype(np.float32)
    return batch


def build_cache(cfg: ExperimentConfig, data: SourceData, dirs: dict[str, Path], rebuild: bool = False) -> CachedData:
    """Every split's rows with every teacher's soft targets and the difficulty measures, computed once
    by Ray Data actor pools (one per teacher) whose tasks write the Parquet files themselves."""
    spec = cache_spec(cfg, data.info, dirs)
    directory = cache_dir_for(Path(cfg.cache.dir).expanduser(), spec)
    if directory.exists() and not (rebuild or cfg.cache.rebuild):
        try:
            cache = CachedData.open(directory, spec)
            print(f"soft targets: reusing verified cache {directory}")
            return cache
        except CorruptCacheError as err:
            raise CorruptCacheError(f"{err}. Rebuild it with `distill-ray cache CONFIG --rebuild`.") from None

    causal = data.info.task == "causal_lm"
    ds = with_teachers(data.rows, tuple(teacher_specs(cfg, dirs, causal)))
    ds = ds.map_batches(finish_rows, fn_kwargs={"teachers": cfg.teacher_names(), "dtype": cfg.cache.dtype,
                                                "topk": cfg.loss.topk, "num_classes": data.info.num_classes,
                                                "causal": causal, "pad_id": data.info.pad_id},
                        batch_format="numpy", batch_size=512)
    start = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    write_cache(directory, spec, ds, max_rows_per_file=cfg.cache.shard_rows)
    cache = CachedData.open(directory, spec)
    print(f"soft targets: {cache.manifest['num_rows']:,} rows x {len(cfg.teachers)} teachers cached in "
          f"{time.perf_counter() - start:.1f}s at {directory}")
    return cache


# --- training inputs ------------------------------------------------------------------------------

def training_inputs(cfg: ExperimentConfig, data: CachedData | SourceData, info: DataInfo, use_teachers: bool = True,
                    stage: tuple | None = None, dirs: dict[str, Path] | None = None,
                    teacher_trace: str | None = None, labeled_only: bool | None = None) -> TrainInputs:
    """What Ray Train gets: the train and val splits as datasets (only the columns this run reads: its
    own teachers' targets and the difficulty measures) and the facts about them.

    ``data`` is the verified cache, or (online mode without a cache) the source splits themselves.
    Online mode (``train.mode=online``, teacher directories in ``dirs``) reads no targets: each rank's
    stream passes through one actor-pool stage per teacher (``stages.rank_stream``), validation too
    when it has no cached targets. ``stage`` = (fn, kwargs) adds a Ray Data map_batches stage to both
    (the ablation's synthetic teacher); ``teacher_trace`` makes the online teachers log the ids they
    answer (tests). ``labeled_only`` (default: when there are no teachers) trains on the labeled train
    rows alone."""
    online = use_teachers and cfg.train.mode == "online"
    if online and dirs is None:
        raise ValueError("online mode runs the teachers as stages: pass their directories (dirs=)")
    causal = info.task == "causal_lm"
    if isinstance(data, SourceData):
        if use_teachers and not online:
            raise ValueError("cached mode reads the teachers' targets from the cache; pass the CachedData")
        train, val, index = data.train, data.val, data.train.select_columns(["id"])
        rows, train_bytes = info.counts["train"], 0
    else:
        targets = teacher_columns(cfg.teacher_names(), cfg.loss.topk)
        stored = [c for c in targets if c in data.columns]
        measures = [c for c in data.columns if c.startswith("difficulty/")] if use_teachers else []
        train = data.dataset("train", ["id", "x", "label", *(stored if use_teachers and not online else []), *measures])
        index = data.dataset("train", ["id", *measures])
        val = data.dataset("val", ["id", "x", "label", *stored])
        rows, train_bytes = data.rows("train"), sum(os.path.getsize(f) for f in data.files("train"))
    if (not use_teachers if labeled_only is None else labeled_only) and info.task == "classification" \
            and info.labeled["train"] < rows:
        # The baseline learns from labels alone: the unlabeled transfer rows have nothing to teach it.
        train, index, rows = train.map_batches(labeled_rows, batch_format="numpy"), None, info.labeled["train"]
        train_bytes = train_bytes * rows // max(1, info.counts["train"])
    if stage is not None:
        fn, kwargs = stage
        train = train.map_batches(fn, fn_kwargs=kwargs, batch_format="numpy") if use_teachers and not online else train
        val = val.map_batches(fn, fn_kwargs=kwargs, batch_format="numpy")
    teachers, shapes, probe = (), {}, None
    if online:
        hint_teacher = cfg.loss.hint_teacher or cfg.teacher_names()[0]
        features = ("hint",) * (cfg.loss.hint_weight > 0) + ("attention",) * (cfg.loss.attention_weight > 0)
        teachers = tuple(teacher_specs(cfg, dirs, causal, {hint_teacher: features}, teacher_trace))
        if not any(c.endswith(("/logits", "/topk_logprobs")) for c in val.schema().names):
            val = with_teachers(val, teachers)  # agreement on validation needs the teachers' answers
        if features:  # the hint projector is sized before the first step: ask the teacher once, here
            probe = train.select_columns(["x"]).take_batch(2, batch_format="numpy")["x"]
            spec = next(t for t in teachers if t.name == hint_teacher)
            shapes = ray.get(feature_shapes.options(num_cpus=spec.num_cpus).remote(spec, probe))
    mix = MixSettings(cfg.loss.mixup_alpha, cfg.loss.cutmix_alpha, info.num_classes, cfg.train.seed)
    # Teachers asked afresh and pairs mixed afresh every epoch: nothing to keep between epochs.
    streamed_only = online or mix.active
    mode = cfg.train.data_mode
    keep = not streamed_only and (mode == "memory" or (
        mode == "auto" and train_bytes / cfg.train.num_workers <= cfg.train.memory_budget_mb * 2**20))
    return TrainInputs(train=train, val=val, index=index, teacher_names=cfg.teacher_names(),
                       num_classes=info.num_classes, input_shape=info.input_shape, train_rows=rows,
                       train_bytes=train_bytes, task=info.task, topk=cfg.loss.topk,
                       all_labeled=info.labeled["train"] == info.counts["train"], use_teachers=use_teachers,
                       online_teachers=teachers, mix=mix if mix.active else None, keep_shard=keep,
                       epoch_stage=not keep and (mix.active or cfg.curriculum.scheduler != "none"),
                       feature_shapes=shapes, probe=probe)


def labeled_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = np.asarray(batch["label"]) >= 0
    return {k: v[keep] for k, v in batch.items()}


def epochs_for_steps(cfg: ExperimentConfig, rows: int, steps: int) -> int:
    """The fewest epochs over ``rows`` in which ``cfg`` (its curriculum included) takes at least
    ``steps`` optimizer steps: how runs on fewer rows, or holding rows back, get an equal step budget."""
    from dataclasses import replace

    from distill_ray.train import planned_steps

    epochs = 1
    while planned_steps(replace(cfg, train=replace(cfg.train, epochs=epochs)), rows, cfg.train.num_workers) < steps:
        epochs += 1
    return epochs


def without_curriculum(cfg: ExperimentConfig) -> ExperimentConfig:
    """All data open from the first step, temperature and alpha at their constant or scheduled values."""
    from dataclasses import replace

    c = cfg.curriculum
    return replace(cfg, curriculum=replace(
        c, scheduler="none", temperature_schedule="constant" if c.temperature_schedule == "stage" else c.temperature_schedule,
        alpha_schedule="constant" if c.alpha_schedule == "stage" else c.alpha_schedule))


def baseline_config(cfg: ExperimentConfig, student_rows: int, labeled_rows: int) -> ExperimentConfig:
    """The baseline's run: the student's architecture, optimizer and lr schedule on the labeled rows,
    without teachers or curriculum, for train.baseline_epochs or else as many optimizer steps as the
    student takes (so 5k labeled rows against a 54k-row transfer set get ~11x the epochs)."""
    from dataclasses import replace

    from distill_ray.train import planned_steps

    base = without_curriculum(cfg)
    epochs = cfg.train.baseline_epochs or epochs_for_steps(
        base, labeled_rows, planned_steps(cfg, student_rows, cfg.train.num_workers))
    every = max(cfg.train.eval_every_epochs, round(epochs / max(1, cfg.train.epochs / cfg.train.eval_every_epochs)))
    return replace(base, train=replace(base.train, epochs=epochs, eval_every_epochs=every))


def teacher_columns(names, topk: int | None) -> list[str]:
    return [f"{t}/logits" for t in names] if topk is None else \
        [c for t in names for c in (f"{t}/topk_logprobs", f"{t}/topk_indices")]


# --- the main job ---------------------------------------------------------------------------------

def run_experiment(cfg: ExperimentConfig, retrain_teachers: bool = False, rebuild_cache: bool = False) -> dict:
    """data -> teachers -> soft-target cache -> student (and baseline) on Ray Train -> test metrics -> RUN_DIR."""
    from distill_ray.train import export_student, load_trained_student, run_training

    timings: dict[str, float] = {}

    def timed(phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[phase] = round(time.perf_counter() - start, 2)
        return out

    def trained(name: str, inputs: TrainInputs, run_cfg: ExperimentConfig = cfg) -> ray.train.Result:
        """One Ray Train run, announced and summed up on one line each."""
        source = 'online teachers' if inputs.online_teachers else 'cached targets' if inputs.use_teachers else 'labels only'
        print(f"{name}: training {run_cfg.train.epochs} epochs on {run_cfg.train.num_workers} Ray Train worker(s), "
              f"{inputs.train_rows:,} rows, {source}", flush=True)
        storage.mkdir(parents=True, exist_ok=True)
        progress = storage / f".{name}.progress.json"
        with RunProgress(progress, name):
            result = timed(f"train_{name}", run_training, run_cfg, inputs, str(storage), name,
                           progress_file=str(progress))
        best = best_epoch_row(result)
        score = ", ".join(f"{k} {best[k]:.4f}" for k in ("val_accuracy", "val_perplexity") if k in best)
        print(f"{name}: done in {timings[f'train_{name}']:.0f}s (best epoch {best.get('epoch', 0) + 1}: {score})",
              flush=True)
        return result

    data = timed("data", load_data, cfg)  # bad data fails here, before anything is written
    counts = data.info.counts
    print(f"data: {cfg.data.format}, {counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test rows "
          f"({data.info.labeled['train']:,} train rows labeled) in {timings['data']:.0f}s", flush=True)
    run_dir = cfg.run_path().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_to_run_dir(run_dir)
    _set_aside_stale_checkpoints(run_dir, dump_config(cfg))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    info = data.info
    dirs = timed("teachers", prepare_teachers, cfg, data, retrain_teachers)
    cache = timed("cache", build_cache, cfg, data, dirs, rebuild=rebuild_cache)
    storage = run_dir / "ray_results"

    student_inputs = training_inputs(cfg, cache, info, dirs=dirs)
    result = trained("student", student_inputs)
    student, history, state = load_trained_student(cfg, student_inputs, result.checkpoint)
    baseline, base_state = None, {}
    if cfg.train.baseline:
        base_cfg = baseline_config(cfg, student_inputs.train_rows, info.labeled["train"])
        baseline_inputs = training_inputs(base_cfg, cache, info, use_teachers=False)
        base_result = trained("baseline", baseline_inputs, base_cfg)
        baseline, base_history, base_state = load_trained_student(base_cfg, baseline_inputs, base_result.checkpoint)
        (run_dir / "baseline_history.json").write_text(json.dumps(base_history))

    if info.task == "causal_lm":
        rows, reliability = evaluate_language_models(cfg, cache, dirs, student, baseline, history)
        metric = "perplexity"
    else:
        rows, reliability = evaluate_classifiers(cfg, cache, dirs, student, baseline, history)
        metric = "accuracy"
    weights = final_teacher_weights(history)
    if not weights:
        raise ValueError("the student's history has no teacher weights")
    main = "perplexity" if metric == "perplexity" else "accuracy"
    metrics = {
        "student": rows["student"][main],
        "teachers": {t.name: rows[t.name][main] for t in cfg.teachers},
        "blend": rows["blend"][main],
        "baseline": rows["baseline"][main] if baseline is not None else None,
        "teacher_weights": weights,
        # Both at their best validation epoch (0-based), never at an arbitrary last one.
        "best_epoch": {"student": state.get("best_epoch"), "baseline": base_state.get("best_epoch")},
        "epochs": {"student": cfg.train.epochs, "baseline": base_cfg.train.epochs if baseline is not None else None},
        "params": {"student": rows["student"]["params"], "teachers": {t.name: rows[t.name]["params"] for t in cfg.teachers}},
        "ece": {name: r["ece"] for name, r in rows.items() if r.get("ece") is not None},
        "latency_ms": {name: r["latency_ms"] for name, r in rows.items() if "latency_ms" in r},
        "timings": timings,
        "metric": metric,
        "split": "test",
        "num_test": cache.rows("test"),
        "data": {"format": cfg.data.format, "source": info.source, "rows": dict(info.counts),
                 "labeled": dict(info.labeled), "kind": info.kind},
    }
    metrics["gap_recovered"] = gap_recovered(metrics["student"], metrics["baseline"],
                                             (min if metric == "perplexity" else max)(metrics["teachers"].values()))
    if metric == "perplexity":
        metrics["token_accuracy"] = {name: r["accuracy"] for name, r in rows.items()}
    card = {"name": cfg.name, "task": cfg.data.task, "dataset": cfg.data.format, "teachers": list(cfg.teacher_names()),
            "teacher_weights": weights, "metrics": {f"test_{metric}": metrics["student"]},
            "loss": config_to_dict(cfg.loss), "blend": cfg.blend.kind, "curriculum": cfg.curriculum.scheduler,
            "version": "v1", "class_names": list(info.class_names)}
    export_student(cfg, student_inputs, student, run_dir / "student", card, info.to_dict())
    if info.tokenizer:  # a text student serves raw text: its tokenizer goes with it
        save_tokenizer(info.tokenizer, run_dir / "student", max_length=info.input_shape[-1])
    (run_dir / "distill_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    (run_dir / "history.json").write_text(json.dumps(history))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print_summary(rows, cfg.teacher_names(), weights, metric, metrics["gap_recovered"])

    from distill_ray.report import write_report

    report = write_report(run_dir, metrics, history, base_history if baseline is not None else None, rows,
                          reliability, config_name=cfg.name)
    print(f"report: {report}")
    return metrics


def evaluate_language_models(cfg: ExperimentConfig, cache: CachedData, dirs: dict[str, Path], student,
                             baseline, history: list[dict]) -> tuple[dict[str, dict], dict]:
    """Test perplexity and next-token accuracy of every teacher (run exactly, not from the top-k
    cache), their learned blend, the baseline and the student, streamed over the test split."""
    from distill_ray.evaluate import lm_label_logprobs, perplexity, single_sample_latency_ms, token_accuracy

    models = {t.name: load_model(dirs[t.name])[0] for t in cfg.teachers}
    models.update({name: m for name, m in (("student", student), ("baseline", baseline)) if m is not None})
    logp: dict[str, list] = {name: [] for name in models}
    top1: dict[str, list] = {name: [] for name in models}
    labels, example = [], None
    for batch in cache.dataset("test", ["x", "label"]).iter_batches(batch_size=64, batch_format="numpy"):
        example = example if example is not None else torch.from_numpy(np.array(batch["x"][:1]))
        labels.append(torch.from_numpy(np.array(batch["label"])))
        for name, model in models.items():
            lp, t1 = lm_label_logprobs(model, batch["x"], batch["label"])
            logp[name].append(lp)
            top1[name].append(t1)
    y = torch.cat(labels)
    weights = torch.tensor(list(final_teacher_weights(history).values()))
    rows: dict[str, dict] = {}
    for name, model in models.items():
        lp, t1 = torch.cat(logp[name]), torch.cat(top1[name])
        rows[name] = {"perplexity": perplexity(lp, y), "accuracy": token_accuracy(t1, y), "params": num_params(model),
                      "latency_ms": single_sample_latency_ms(model, example, repeats=20, warmup=3)}
    teacher_logp = torch.stack([torch.cat(logp[t.name]) for t in cfg.teachers])
    blend_logp = torch.logsumexp(teacher_logp + weights.log().view(-1, 1, 1), dim=0)
    rows["blend"] = {"perplexity": perplexity(blend_logp, y), "accuracy": None}
    return {name: rows[name] for name in (*cfg.teacher_names(), "blend", "student", "baseline") if name in rows}, {}


def classifier_outputs(cfg: ExperimentConfig, cache: CachedData, split: str, models: dict):
    """Streamed over a cached split: the teachers' logits [K, N, C] (from the cache), each model's
    logits [N, C] and the labels [N]. Unlabeled rows are left out (they have nothing to score)."""
    from distill_ray.evaluate import predict_logits
    from distill_ray.train import batch_targets

    names = cfg.teacher_names()
    teacher_parts, model_parts, labels = [], {name: [] for name in models}, []
    for batch in cache.dataset(split, ["x", "label", *teacher_columns(names, cache.spec.topk)]).iter_batches(
            batch_size=1024, batch_format="numpy"):
        cols = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
        labeled = cols["label"] >= 0
        cols = {k: v[labeled] for k, v in cols.items()}
        labels.append(cols["label"])
        teacher_parts.append(batch_targets(cols, names, cache.spec.num_classes, cache.spec.topk, False, "cpu")[0])
        for name, model in models.items():
            model_parts[name].append(predict_logits(model, cols["x"]))
    return torch.cat(teacher_parts, dim=1), {n: torch.cat(p) for n, p in model_parts.items()}, torch.cat(labels)


def evaluate_classifiers(cfg: ExperimentConfig, cache: CachedData, dirs: dict[str, Path], student, baseline,
                         history: list[dict]) -> tuple[dict[str, dict], dict]:
    """Test accuracy, ECE, size and latency of every teacher (from the cache), their blend, the
    baseline and the student, streamed over the test split; plus each one's test probabilities for
    the reliability diagram."""
    from distill_ray.blending import blend_probs
    from distill_ray.evaluate import accuracy, expected_calibration_error, single_sample_latency_ms

    models = {"student": student, **({"baseline": baseline} if baseline is not None else {})}
    teachers, outputs, y = classifier_outputs(cfg, cache, "test", models)
    example = torch.from_numpy(np.array(cache.dataset("test", ["x"]).take_batch(1, batch_format="numpy")["x"]))
    rows: dict[str, dict] = {}
    for k, t in enumerate(cfg.teachers):
        model, _ = load_model(dirs[t.name])
        rows[t.name] = {"accuracy": accuracy(teachers[k], y), "ece": expected_calibration_error(teachers[k].softmax(-1), y),
                        "params": num_params(model), "latency_ms": single_sample_latency_ms(model, example)}
    weights = torch.tensor(list(final_teacher_weights(history).values()))
    blend = blend_probs(teachers, weights, temperature=1.0)
    rows["blend"] = {"accuracy": accuracy(blend, y), "ece": expected_calibration_error(blend, y)}
    for name, model in models.items():
        logits = outputs[name]
        rows[name] = {"accuracy": accuracy(logits, y), "ece": expected_calibration_error(logits.softmax(-1), y),
                      "params": num_params(model), "latency_ms": single_sample_latency_ms(model, example)}
    test_probs = {t.name: teachers[k].float().softmax(-1) for k, t in enumerate(cfg.teachers)}
    test_probs.update({name: outputs[name].softmax(-1) for name in models})
    return rows, {name: (p.numpy(), y.numpy()) for name, p in test_probs.items()}


def best_epoch_row(result: ray.train.Result) -> dict:
    """The history row of the run's best validation epoch (what its student is reported at)."""
    with result.checkpoint.as_directory() as ckpt_dir:
        history = json.loads((Path(ckpt_dir) / "history.json").read_text())
    epochs = [r for r in history if r.get("kind") == "epoch"]
    if not epochs:
        return {}
    best = epochs[-1].get("best_epoch")
    return next((r for r in epochs if r["epoch"] == best), epochs[-1])


def _set_aside_stale_checkpoints(run_dir: Path, config_text: str) -> None:
    """Same name, same config: the next run resumes from RUN_DIR's checkpoints. Same name, changed
    config: those checkpoints belong to another experiment (resuming could load a different
    architecture), so they are moved aside, not deleted, and the run starts fresh."""
    old_config, results = run_dir / "config.yaml", run_dir / "ray_results"
    if results.exists() and old_config.is_file() and old_config.read_text() != config_text:
        aside = run_dir / f"ray_results.before-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(results, aside)
        old_config.replace(aside / "config.yaml")
        print(f"config changed since the last run in {run_dir}: its checkpoints moved to {aside}; starting fresh")


def print_summary(rows: dict[str, dict], teachers: tuple[str, ...], weights: dict[str, float],
                  metric: str = "accuracy", gap: float | None = None) -> None:
    lm = metric == "perplexity"
    first, second = ("perplexity", "tok acc") if lm else ("test acc", "ECE")
    print(f"\n{'model':<12}{first:>11}{second:>9}{'params':>13}{'latency ms':>12}{'weight':>8}")
    for name in (*teachers, "blend", "baseline", "student"):
        if name not in rows:
            continue
        r = rows[name]
        a, b = (r.get("perplexity"), r.get("accuracy")) if lm else (r.get("accuracy"), r.get("ece"))
        params = f"{r['params']:,}" if "params" in r else "-"
        latency = f"{r['latency_ms']:.3f}" if "latency_ms" in r else "-"
        weight = f"{weights[name]:.3f}" if name in weights else ""
        first_cell = f"{a:.4f}" if a is not None else "-"
        second_cell = f"{b:.4f}" if b is not None else "-"
        print(f"{name:<12}{first_cell:>11}{second_cell:>9}{params:>13}{latency:>12}{weight:>8}")
    if "baseline" in rows:
        print(f"gap recovered (student - baseline) / (best teacher - baseline): "
              f"{'n/a (no teacher beats the baseline)' if gap is None else f'{gap:.1%}'}")

