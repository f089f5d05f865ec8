"""The main job, phase by phase: connect to Ray, prepare teachers (``teachers.setup``), cache soft
targets (``cache.build``), train student and baseline (``train.inputs`` -> ``train.loop``), score them
(``scoring``), export. The phases' functions are importable from here too, for the CLI and ``jobs/``. Data moves as Ray Datasets
from storage to the student's loss (``sources.load_source`` -> stages asking the teachers' services that write
the cache -> ``TorchTrainer(datasets=...)``); the driver holds small facts (counts, label names,
fingerprints, manifests), never a split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import ray

from distill_ray.cache.build import build_cache
from distill_ray.config import SELF_TEACHER_SOURCES, ExperimentConfig, TeacherConfig, config_to_dict, dump_config
from distill_ray.console import RunProgress, log_to_run_dir
from distill_ray.data.columns import columns_summary
from distill_ray.evaluation.metrics import disagreements
from distill_ray.models import save_tokenizer
from distill_ray.evaluation.report import final_teacher_weights, gap_recovered
from distill_ray.train.inputs import baseline_config, online_teachers, training_inputs
from distill_ray.evaluation.scoring import evaluate_classifiers, evaluate_language_models, print_summary, train_accuracy
from distill_ray.cache.soft_targets import CachedData
from distill_ray.data.sources import SourceData, load_source
from distill_ray.lm.cut import student_from_teacher
from distill_ray.registry.lineage import run_lineage, write_lineage
from distill_ray.teachers.setup import prepare_teachers
from distill_ray.train.loop import TrainInputs
from distill_ray.evaluation.verdict import Verdict, classification_verdict


def connect_ray(address: str | None = None) -> None:
    """Join the cluster named by ``address`` (``auto``: the one running on this machine) or RAY_ADDRESS;
    with neither, start a local Ray of this process's own, even when another runs on this machine (a Ray
    that happens to run there may be someone else's, sized for other work, or a test suite's).

    A local Ray started here binds its dashboard to nothing (include_dashboard=False) and advertises
    twice the machine's cores (at least 4) as logical CPUs: teacher actors and Train workers reserve
    CPUs for the whole run while mostly waiting on each other, and the Ray Data tasks that read and
    preprocess the stream beside them need CPUs of their own; with exactly the real cores reserved,
    a 2-core laptop would deadlock (every CPU held by actors, no read task can start). Worker output
    stays in Ray's logs unless ``--verbose`` (see ``console.py``).
    """
    from distill_ray.console import is_verbose, native_stderr_to, quiet_ray_loggers, quiet_transformers

    # Ray Data's per-operator bars would print a line per update from every task and Train worker; the
    # datasets built after this carry the setting with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_transformers()
    if ray.is_initialized():
        return
    quiet_ray_loggers()
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's own INFO at start-up ("Started a local Ray instance") stays off the terminal too.
    quiet = {"log_to_driver": is_verbose(), "logging_level": logging.INFO if is_verbose() else logging.WARNING}
    local = {"include_dashboard": False, "num_cpus": max(4, 2 * (os.cpu_count() or 1))}
    # Ray Data reads every Parquet dataset's footers with 32 new actor processes by default, sized for
    # thousands of files on a cluster; a local Ray reading a few files pays ~13x the CPU for it (131 vs
    # 9.7 CPU-s for one read of a 1,200-row cache on 2 cores). Set before ray.init: workers inherit it.
    footer_actors = str(max(1, (os.cpu_count() or 2) // 2))
    if not address or address == "local":  # a private Ray even when another runs on this machine
        local_parquet_settings(footer_actors)
        local_worker_pool_settings()
        try:
            ray.init(address="local", **local, **quiet)
        except Exception as err:  # Ray raises a bare Exception when its raylet is not up within 30 s
            if "timed out during startup" not in str(err):
                raise
            raise RuntimeError(f"the local Ray did not start within Ray's 30 s (load average {os.getloadavg()[0]:.1f} "
                               f"on {os.cpu_count()} cores): the machine is too busy to start it; run again when "
                               f"fewer jobs run, or join a running Ray with --address (its start-up logs: "
                               f"/tmp/ray/session_latest/logs)") from err
    else:
        ray.init(address=address, **quiet)
    quiet_ray_loggers()
    try:  # Ray's C++ messages to the session's logs (RUN_DIR/logs/ray links there), not the terminal
        native_stderr_to(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "driver_native.err")
    except (AttributeError, OSError):  # a client connection has no local session directory
        pass


def local_worker_pool_settings() -> None:
    """Keep idle worker processes. Ray keeps as many idle workers as logical CPUs and kills the rest
    after 1 s idle; every epoch's stream, cache build and Train run then starts its task processes
    anew (Python, Ray, torch imports: seconds each on a laptop). Online mode at 4,096 rows, 2 epochs
    (``bench/online_overlap.py``): run wall 24.9 s against 34.0 s; the test suite's Train-heavy files
    ran 13-15% faster (tests/test_engine.py 264 s against 305 s). The price is memory held by idle
    workers (~0.2 GB each, up to 16). Set before ``ray.init``: the raylet reads it; a user's own wins."""
    os.environ.setdefault("RAY_num_workers_soft_limit", "16")
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "30000")


def local_parquet_settings(footer_actors: str) -> None:
    """Parquet reading for a Ray this process starts on one machine (set before ``ray.init``: the
    workers inherit the environment). Ray Data 2.60's V2 Parquet reader lists files through a pool of
    footer-reading actors, new processes per read, sized for thousands of remote files; for the few
    local files of a cache the V1 reader is ~3x faster per read (``bench/parquet_read.py``), and every
    run reads Parquet many times (each split, each epoch of a curriculum, each Train run's shard).
    A user's own setting wins; a cluster keeps Ray's defaults."""
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", footer_actors)
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
    ray.data.DataContext.get_current().use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"] != "0"


def load_data(cfg: ExperimentConfig) -> SourceData:
    """The configured data as lazy, preprocessed Ray Datasets per split (see ``data/sources.py``)."""
    return load_source(cfg)


# --- the main job ---------------------------------------------------------------------------------

def run_experiment(cfg: ExperimentConfig, retrain_teachers: bool = False, rebuild_cache: bool = False,
                   search: dict | None = None) -> dict:
    """data -> teachers -> soft-target cache -> student (and baseline) on Ray Train -> test metrics -> RUN_DIR.
    ``search``: what ``--search`` found (``search.run_search``), kept in metrics.json.
    ``train.generations`` > 1 (born-again networks): one run per generation (``run_generations``)."""
    from distill_ray.train.loop import export_student, load_trained_student, run_training

    if cfg.train.generations > 1:
        return run_generations(cfg, lambda gen_cfg: run_experiment(gen_cfg, retrain_teachers, rebuild_cache, search))

    timings: dict[str, float] = {}

    def timed(phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[phase] = round(time.perf_counter() - start, 2)
        return out

    def trained(name: str, inputs: TrainInputs, run_cfg: ExperimentConfig) -> ray.train.Result:
        """One Ray Train run, announced and summed up on one line each."""
        source = 'online teachers' if inputs.online_teachers else 'cached targets' if inputs.use_teachers else 'labels only'
        if inputs.scorers:  # on-policy KD: the student writes, the teachers' services score it
            source += f", {run_cfg.loss.on_policy.lmbda:.0%} of steps on-policy"
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
          f"({data.info.labeled['train']:,} train rows labeled{_cut_note(data.info)}{_transfer_note(cfg, data.info)}) "
          f"in {timings['data']:.0f}s{_columns_note(data.info)}", flush=True)
    run_dir = cfg.run_path().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_to_run_dir(run_dir)
    _set_aside_stale_checkpoints(run_dir, dump_config(cfg))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    info = data.info
    # A self_ema teacher lives in the Train worker: only the teachers outside the student are prepared,
    # cached, served and scored; generation 1 of born-again networks may have none (it learns from labels).
    outside = outside_teachers(cfg)
    dirs = timed("teachers", prepare_teachers, outside, data, retrain_teachers)
    cfg, cut = student_from_teacher(cfg, dirs, run_dir / "student_init")
    if cut is not None:
        print(f"student: cut from {cut['teacher']}, layers {cut['layers']} of {cut['teacher_layers']}, "
              f"{cut['params']:,} of its {cut['teacher_params']:,} parameters ({run_dir / 'student_init'})", flush=True)
    storage = run_dir / "ray_results"
    # Online or on-policy: the teachers' services start here, answer the cache build and every epoch (and
    # score what the student writes), and stop after.
    with online_teachers(outside, dirs, info.task) as services:
        cache = timed("cache", build_cache, outside, data, dirs, rebuild=rebuild_cache, services=services or None)
        student_inputs = training_inputs(cfg, cache, info, services=services, use_teachers=bool(cfg.teachers))
        result = trained("student", student_inputs, cfg)
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
        rows, reliability = evaluate_classifiers(outside, cache, dirs, student, baseline, history)
        metric = "accuracy"
    weights = final_teacher_weights(history)
    if not weights and cfg.teachers:
        raise ValueError("the student's history has no teacher weights")
    main = "perplexity" if metric == "perplexity" else "accuracy"
    metrics = {
        "student": rows["student"][main],
        # None for a teacher with its own tokenizer (and the blend, when one is in it): no score on these tokens
        "teachers": {t.name: rows[t.name].get(main) for t in outside.teachers},
        "blend": rows.get("blend", {}).get(main),
        "baseline": rows["baseline"][main] if baseline is not None else None,
        "teacher_weights": weights,
        # Both at their best validation epoch (0-based), never at an arbitrary last one.
        "best_epoch": {"student": state.get("best_epoch"), "baseline": base_state.get("best_epoch")},
        "epochs": {"student": cfg.train.epochs, "baseline": base_cfg.train.epochs if baseline is not None else None},
        "params": {"student": rows["student"]["params"],
                   "teachers": {t.name: rows[t.name]["params"] for t in outside.teachers}},
        "ece": {name: r["ece"] for name, r in rows.items() if r.get("ece") is not None},
        "latency_ms": {name: r["latency_ms"] for name, r in rows.items() if "latency_ms" in r},
        "timings": timings,
        "metric": metric,
        "split": "test",
        "num_test": cache.rows("test"),
        "data": {"format": cfg.data.format, "source": info.source, "rows": dict(info.counts),
                 "labeled": dict(info.labeled), "kind": info.kind,
                 "transfer": info.transfer, "transfer_rows": info.transfer_rows,
                 "feature_fields": list(info.feature_fields), "left_out": dict(info.left_out),
                 "class_counts": list(info.class_counts)},
    }
    if search is not None:
        metrics["search"] = search
    if cut is not None:
        metrics["student_init"] = cut
    scored = [v for v in metrics["teachers"].values() if v is not None]
    metrics["gap_recovered"] = gap_recovered(metrics["student"], metrics["baseline"],
                                             (min if metric == "perplexity" else max)(scored) if scored else None,
                                             lower_is_better=metric == "perplexity")
    if metric == "perplexity":
        metrics["token_accuracy"] = {name: r.get("accuracy") for name, r in rows.items()}
        own = {name: {k: r[k] for k in ("own_perplexity", "own_accuracy", "own_tokenizer")}
               for name, r in rows.items() if "own_perplexity" in r}
        if own:  # per token of the teacher's own tokenizer, on the test split tokenized its way
            metrics["own_tokenizer"] = own
        for key in ("rouge_l", "parses"):  # instruction data: greedy responses to held-out prompts
            if any(key in r for r in rows.values()):
                metrics[key] = {name: r[key] for name, r in rows.items() if key in r}
    else:  # each class counted once (long-tailed data), and each class's recall, on the test split
        metrics["balanced_accuracy"] = {name: r.get("balanced_accuracy") for name, r in rows.items()}
        metrics["per_class_recall"] = {name: r["recall"] for name, r in rows.items() if "recall" in r}
        metrics["data"]["class_names"] = list(info.class_names)
        metrics["long_tail"] = {"class_weights": cfg.loss.class_weights, "class_temperature": cfg.loss.class_temperature,
                                "logit_adjustment": cfg.loss.logit_adjustment,
                                "imbalance": cfg.data.long_tail.imbalance}
    verdict = run_verdict(outside, cache, student, metrics, reliability) if baseline is not None else None
    metrics["verdict"] = verdict.to_dict() if verdict is not None else None
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
    write_lineage(run_dir, run_lineage(outside, dirs, val_class_counts(cache, info), info.class_names))
    print_summary(rows, cfg.teacher_names(), weights, metric, metrics["gap_recovered"])

    from distill_ray.evaluation.report import write_report

    report = write_report(run_dir, metrics, history, base_history if baseline is not None else None, rows,
                          reliability, config_name=cfg.name)
    print(f"\nrun directory: {run_dir}\nreport: {report}")
    if verdict is not None:  # the run's last lines: did distillation pay, and if not, what to try
        print("\n" + "\n".join(verdict.lines), flush=True)
    return metrics


def outside_teachers(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the teachers outside the student alone: a self_ema teacher (the moving average of the
    student's weights, ``kd/self_ema.py``) has no model to prepare, no targets to cache (they change every
    step) and no service; the Train worker computes them. A previous_generation teacher is a model only
    once ``generation_config`` names the generation. Not validated again (it may hold no teacher)."""
    return dataclasses.replace(cfg, teachers=tuple(t for t in cfg.teachers if t.source not in SELF_TEACHER_SOURCES))


# --- born-again networks: one run per generation ----------------------------------------------------

def generation_config(cfg: ExperimentConfig, generation: int) -> ExperimentConfig:
    """Generation ``generation``'s (1-based) run of a born-again config, in RUN_DIR/gen{generation}: the
    first learns without the previous_generation teacher (from the labels, or the other teachers); each
    later one distils from the frozen student of the one before, a torch_checkpoint teacher
    (RUN_DIR/gen{k-1}/student), so its targets are prepared, cached and served like any teacher's.
    Only the last generation trains the scratch baseline (generation 1 is one already, without teachers)."""
    previous = cfg.run_path() / f"gen{generation - 1}" / "student"
    teachers = tuple(t for t in cfg.teachers if t.source != "previous_generation") if generation == 1 else tuple(
        TeacherConfig(name=t.name, source="torch_checkpoint", path=str(previous), num_cpus=t.num_cpus,
                      num_gpus=t.num_gpus, replicas=t.replicas, dtype=t.dtype)
        if t.source == "previous_generation" else t for t in cfg.teachers)
    last = generation == cfg.train.generations
    train = dataclasses.replace(cfg.train, generations=1, baseline=cfg.train.baseline and last and generation > 1)
    return dataclasses.replace(cfg, name=f"gen{generation}", run_dir=str(cfg.run_path()), teachers=teachers,
                               train=train)


def run_generations(cfg: ExperimentConfig, run_one) -> dict:
    """Born-again networks (Furlanello et al. 2018): ``run_one(generation_config(cfg, k))`` for k = 1..N in
    turn, a finished generation skipped when run again (its metrics.json is there), so a stopped run
    resumes at the generation it stopped in (which resumes from its own checkpoints). Writes
    RUN_DIR/generations.json and RUN_DIR/report.md (each generation's test score) and RUN_DIR/metrics.json,
    and returns the last generation's metrics with ``generations`` added."""
    run_dir = cfg.run_path().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    scores, metrics = [], {}
    for generation in range(1, cfg.train.generations + 1):
        gen_cfg = generation_config(cfg, generation)
        done = gen_cfg.run_path() / "metrics.json"
        if done.is_file():
            print(f"generation {generation}: done before, {done}", flush=True)
            metrics = json.loads(done.read_text())
        else:
            print(f"generation {generation} of {cfg.train.generations}: {gen_cfg.run_path()}", flush=True)
            metrics = run_one(gen_cfg)
        scores.append({"generation": generation, "teachers": list(gen_cfg.teacher_names()),
                       "metric": metrics.get("metric"), "student": metrics.get("student"),
                       "baseline": metrics.get("baseline"), "run_dir": str(gen_cfg.run_path())})
    (run_dir / "generations.json").write_text(json.dumps(scores, indent=2))
    (run_dir / "report.md").write_text(generations_report(cfg.name, scores))
    # RUN_DIR/metrics.json as for any run (the last generation's student), for jobs/ that read it
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "generations": scores}, indent=2, sort_keys=True))
    print("\n".join(f"generation {s['generation']}: test {s['metric']} {s['student']:.4f}" for s in scores), flush=True)
    return {**metrics, "generations": scores}


def generations_report(name: str, scores: list[dict]) -> str:
    """RUN_DIR/report.md of a born-again run: each generation's test score, teachers and report."""
    lines = [f"# {name}: born-again generations", "", "| generation | learns from | test score | report |",
             "|---:|---|---:|---|"]
    for s in scores:
        source = ", ".join(s["teachers"]) or "labels alone"
        lines.append(f"| {s['generation']} | {source} | {s['student']:.4f} ({s['metric']}) | "
                     f"[gen{s['generation']}/report.md](gen{s['generation']}/report.md) |")
    return "\n".join(lines) + "\n"


def val_class_counts(cache: CachedData, info) -> list[int]:
    """Labeled validation rows per class (classification; [] for a causal LM): what the model registry
    measures a served student's predicted-class mix against (``registry/drift.py``)."""
    if info.task != "classification" or not cache.rows("val"):
        return []
    import pyarrow.parquet as pq

    # The label column of a few files, read here: a Ray Data job would cost more than the read.
    labels = np.concatenate([pq.read_table(f, columns=["label"])["label"].to_numpy() for f in cache.files("val")])
    labels = labels[labels >= 0].astype("int64")
    return [int(n) for n in np.bincount(labels, minlength=info.num_classes)]


def _transfer_note(cfg: ExperimentConfig, info) -> str:
    """', N of them a transfer set (KIND x SIZE, KD only)' when data.transfer made rows, else ''."""
    if not info.transfer_rows:
        return ""
    return f"; {info.transfer_rows:,} transfer rows by data.transfer={info.transfer} x{cfg.data.transfer_size}, KD only"


def run_verdict(cfg: ExperimentConfig, cache: CachedData, student, metrics: dict,
                reliability: dict) -> Verdict | None:
    """The verdict on a classifier run with a baseline (``verdict.classification_verdict``), from its own
    figures: test accuracies, the rows student and baseline disagree on (``reliability`` holds both
    models' test probabilities and the labels), train rows labeled or not, whether every teacher is a
    recipe (trained on those labeled rows) and the reported student's accuracy on its train rows.
    None for a causal LM (see ``evaluation/verdict.py``)."""
    if metrics["metric"] != "accuracy" or metrics.get("baseline") is None or "baseline" not in reliability:
        return None
    (student_probs, labels), (baseline_probs, _) = reliability["student"], reliability["baseline"]
    student_only, baseline_only = disagreements(student_probs, baseline_probs, labels)
    data = metrics["data"]
    return classification_verdict(
        student=metrics["student"], baseline=metrics["baseline"], teachers=metrics["teachers"],
        num_test=int((labels >= 0).sum()), student_only=student_only, baseline_only=baseline_only,
        train_rows=data["rows"]["train"], labeled_rows=data["labeled"]["train"],
        transfer_rows=int(data.get("transfer_rows") or 0),
        teachers_are_recipes=all(t.source == "recipe" for t in cfg.teachers),
        student_train_accuracy=train_accuracy(cache, student))


def _cut_note(info) -> str:
    """', N cut at data.max_length' for instruction data that had rows cut, else ''."""
    cut = sum((info.truncated or {}).values())
    return f", {cut:,} cut at data.max_length" if cut else ""


def _columns_note(info) -> str:
    """'; N feature columns (...); left out: col (why), ...' when there are columns to name, else ''."""
    summary = columns_summary(info.feature_fields, info.left_out)
    return f"; {summary}" if summary else ""


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
