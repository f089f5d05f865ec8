"""The driver's phases: connect to Ray, prepare teachers, cache soft targets, train, evaluate, export.

Each phase is one function the CLI and the ``jobs/`` entrypoints call. Ray appears only where work
is spread out: recipe training as tasks, soft targets through Ray Data actor pools, the student
through Ray Train.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from distill_ray import curriculum as cur
from distill_ray.config import ExperimentConfig, config_to_dict, dump_config
from distill_ray.data import ClassificationData, cache_root, load_fashion_mnist, load_fortunes, load_python_corpus, smollm2_path
from distill_ray.models import build_model, load_model, num_params, save_model, save_tokenizer
from distill_ray.soft_targets import CacheSpec, CorruptCacheError, SoftTargets, StoreWriter, cache_dir_for, \
    data_fingerprint
from distill_ray.teachers import TeacherBatchUDF, TeacherPool, TeacherSpec


def connect_ray(address: str | None = None) -> None:
    """Join the cluster named by ``address``/RAY_ADDRESS or running on this machine; else start one.

    A local Ray started here binds its dashboard to nothing (include_dashboard=False).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        ray.init(include_dashboard=False, log_to_driver=True)


def load_data(cfg: ExperimentConfig) -> ClassificationData:
    d = cfg.data
    if d.format == "python_stdlib":
        return load_python_corpus(val_fraction=d.val_fraction, split_seed=d.split_seed, max_length=d.max_length,
                                  tokenizer=d.tokenizer, max_train_samples=d.max_train_samples,
                                  max_eval_samples=d.max_eval_samples)
    if d.format == "fortunes":
        return load_fortunes(val_fraction=d.val_fraction, split_seed=d.split_seed, max_length=d.max_length,
                             tokenizer=d.tokenizer, max_train_samples=d.max_train_samples,
                             max_eval_samples=d.max_eval_samples)
    return load_fashion_mnist(val_fraction=d.val_fraction, split_seed=d.split_seed,
                              max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples)


def data_key(data: ClassificationData) -> str:
    """Fingerprint of the exact samples and split (what a recipe was trained on, what a cache holds)."""
    return data_fingerprint(data.train.ids, data.val.ids, data.test.ids, data.train.inputs[:256],
                            extra=f"{len(data.train)}/{len(data.val)}/{len(data.test)}")


# --- teachers -------------------------------------------------------------------------------------

def _recipe_dir(cfg: ExperimentConfig, index: int, key: str) -> Path:
    t = cfg.teachers[index]
    recipe = json.dumps({"recipe": t.recipe, "options": dict(t.options), "data": key, "seed": cfg.train.seed},
                        sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return Path(t.path).expanduser() if t.path else cache_root() / "teachers" / f"{t.name}-{digest}"


def _train_recipe(name: str, recipe: str, options: dict, data: ClassificationData, seed: int, out_dir: str) -> dict:
    """Runs as a Ray task: train one teacher from labels and save it as a model directory, atomically."""
    from distill_ray.evaluate import accuracy, predict_logits
    from distill_ray.recipes import train_recipe

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = build_model(recipe, data.input_shape, data.num_classes, options)
    start = time.perf_counter()
    train_recipe(model, data.train, options, seed=seed, desc=f"teacher {name}", pad_id=data.pad_id)
    seconds = round(time.perf_counter() - start, 1)
    if data.task == "causal_lm":  # next-token accuracy; a [N, L, V] logits tensor would not fit
        from distill_ray.evaluate import lm_label_logprobs, token_accuracy

        val_acc = token_accuracy(lm_label_logprobs(model, data.val.inputs, data.val.labels)[1], data.val.labels)
    else:
        val_acc = accuracy(predict_logits(model, data.val.inputs), data.val.labels)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    save_model(model, tmp, {"arch": recipe, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                            "options": options, "teacher": name, "val_accuracy": val_acc, "train_seconds": seconds})
    if data.tokenizer:  # text teachers carry their tokenizer, so the directory works on its own
        save_tokenizer(data.tokenizer, tmp, max_length=data.input_shape[-1])
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"name": name, "val_accuracy": val_acc, "params": num_params(model), "seconds": seconds}


def prepare_teachers(cfg: ExperimentConfig, data: ClassificationData, retrain: bool = False) -> dict[str, Path]:
    """Model directory per teacher; recipes are trained (in parallel Ray tasks) unless already there."""
    key = data_key(data)
    dirs, jobs = {}, []
    data_ref = None
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
        data_ref = data_ref or ray.put(data)
        task = ray.remote(num_cpus=1, num_gpus=t.num_gpus)(_train_recipe)
        jobs.append(task.remote(t.name, t.recipe, dict(t.options), data_ref, cfg.train.seed, str(out)))
    for info in ray.get(jobs):
        print(f"teacher {info['name']}: trained in {info['seconds']:.0f}s, {info['params']:,} params, "
              f"val accuracy {info['val_accuracy']:.4f}")
    return dirs


def teacher_specs(cfg: ExperimentConfig, dirs: dict[str, Path]) -> list[TeacherSpec]:
    return [TeacherSpec(t.name, str(dirs[t.name]), t.num_cpus, t.num_gpus, t.replicas, t.dtype, t.max_restarts)
            for t in cfg.teachers]


# --- soft-target cache ----------------------------------------------------------------------------

def _all_samples(data: ClassificationData) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([data.train.ids, data.val.ids, data.test.ids])
    x = np.concatenate([data.train.inputs, data.val.inputs, data.test.inputs])
    return ids, x


def cache_spec(cfg: ExperimentConfig, data: ClassificationData, dirs: dict[str, Path]) -> CacheSpec:
    from distill_ray.models import fingerprint

    prints = {}
    for t in cfg.teachers:
        model, _ = load_model(dirs[t.name])
        prints[t.name] = fingerprint(model)
    return CacheSpec(teacher_fingerprints=prints, data_fingerprint=data_key(data), num_classes=data.num_classes,
                     topk=cfg.loss.topk, dtype=cfg.cache.dtype,
                     seq_len=data.input_shape[-1] if data.task == "causal_lm" else None)


def build_cache(cfg: ExperimentConfig, data: ClassificationData, dirs: dict[str, Path],
                rebuild: bool = False) -> SoftTargets:
    """Soft targets of every teacher for every split, computed once with Ray Data actor pools."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    spec = cache_spec(cfg, data, dirs)
    directory = cache_dir_for(Path(cfg.cache.dir).expanduser(), spec)
    if directory.exists() and not (rebuild or cfg.cache.rebuild):
        try:
            targets = SoftTargets.open(directory, spec)
            print(f"soft targets: reusing verified cache {directory}")
            return targets
        except CorruptCacheError as err:
            raise CorruptCacheError(f"{err}. Rebuild it with `distill-ray cache CONFIG --rebuild`.") from None

    ids, x = _all_samples(data)
    ds = ray.data.from_arrow(pa.table({"id": ids, "x": ArrowTensorArray.from_numpy(x)}))
    for t in teacher_specs(cfg, dirs):
        ds = ds.map_batches(TeacherBatchUDF, fn_constructor_kwargs={"name": t.name, "model_dir": t.model_dir,
                                                                    "dtype": t.dtype, "topk": cfg.loss.topk},
                            compute=ray.data.ActorPoolStrategy(size=t.replicas), num_cpus=t.num_cpus,
                            num_gpus=t.num_gpus or None,
                            # per-token logits [b, L, V] of a language model are big until top-k cuts them
                            batch_size=32 if data.task == "causal_lm" else 512)
    start = time.perf_counter()
    with StoreWriter(directory, spec, shard_rows=cfg.cache.shard_rows) as writer:
        for batch in ds.iter_batches(batch_size=2048, batch_format="numpy"):
            outputs = {}
            for t in cfg.teachers:
                if cfg.loss.topk is None:
                    outputs[t.name] = batch[f"{t.name}/logits"]
                else:
                    outputs[t.name] = (batch[f"{t.name}/topk_logprobs"], batch[f"{t.name}/topk_indices"])
            writer.add(batch["id"], outputs)
        writer.finish()
    print(f"soft targets: {len(ids):,} rows x {len(cfg.teachers)} teachers cached in "
          f"{time.perf_counter() - start:.1f}s at {directory}")
    return SoftTargets.open(directory, spec)


# --- training inputs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitTargets:
    """Per split: classification logits [K, N, C]; causal LM (log-probs, indices), each [K, N, L, k]."""

    train: np.ndarray | tuple[np.ndarray, np.ndarray]
    val: np.ndarray | tuple[np.ndarray, np.ndarray]
    test: np.ndarray | tuple[np.ndarray, np.ndarray]


def split_targets(targets: SoftTargets, data: ClassificationData) -> SplitTargets:
    """Teacher targets per split: logits, or for a top-k cache the log-probs rebuilt from the top k
    (tail mass spread evenly), which blend and temper the same way. A language model's per-token
    top-k stay sparse (a dense [K, N, L, V] would not fit in memory)."""
    def stacked(rows: np.ndarray):
        if data.task == "causal_lm":
            pairs = [targets.topk(name, rows) for name in targets.teachers]
            return (np.stack([p[0] for p in pairs]).astype(np.float16),
                    np.stack([p[1] for p in pairs]).astype(np.int32))
        if targets.spec.topk is None:
            return targets.stacked_logits(rows)
        from distill_ray.losses import dense_from_topk

        return np.stack([dense_from_topk(*map(torch.as_tensor, targets.topk(name, rows)), data.num_classes).numpy()
                         for name in targets.teachers])

    return SplitTargets(*(stacked(targets.rows_for(s.ids)) for s in (data.train, data.val, data.test)))


def sequence_difficulty(cfg: ExperimentConfig, train_topk: tuple[np.ndarray, np.ndarray], inputs: np.ndarray,
                        labels: np.ndarray, pad_id: int | None, vocab_size: int) -> np.ndarray | None:
    """Causal LM: per-sequence difficulty from the teachers' mean next-token NLL (teacher_ce) and
    the count of real tokens (sequence_length), fused by reciprocal rank like classification."""
    from distill_ray.losses import topk_label_logprobs

    y = torch.as_tensor(labels)
    mask = (y >= 0).float()
    measures = []
    for name in cfg.curriculum.measurers:
        if name == "teacher_ce":
            logp, idx = (torch.as_tensor(a) for a in train_topk)
            nll = -topk_label_logprobs(logp, idx, y.unsqueeze(0).expand(len(logp), -1, -1), vocab_size).mean(0)
            measures.append((nll * mask).sum(1) / mask.sum(1).clamp_min(1))
        elif name == "sequence_length":
            measures.append((torch.as_tensor(inputs) != (0 if pad_id is None else pad_id)).sum(1).float())
    if not measures:
        return None
    fused = measures[0] if len(measures) == 1 else cur.reciprocal_rank_fusion(*measures, k=cfg.curriculum.rrf_k)
    return fused.numpy()


def teacher_difficulty(cfg: ExperimentConfig, train_logits: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """Teacher-based difficulty of each training sample (student_loss is measured live by workers)."""
    logits = torch.as_tensor(train_logits, dtype=torch.float32)
    y = torch.as_tensor(labels)
    measures = []
    for name in cfg.curriculum.measurers:
        if name == "ensemble_entropy":
            measures.append(cur.ensemble_entropy(logits))
        elif name == "teacher_disagreement":
            measures.append(cur.teacher_disagreement(logits))
        elif name == "teacher_ce":
            measures.append(cur.teacher_ce(logits, y))
    if not measures:
        return None
    fused = measures[0] if len(measures) == 1 else cur.reciprocal_rank_fusion(*measures, k=cfg.curriculum.rrf_k)
    return fused.numpy()


# --- the main job ---------------------------------------------------------------------------------

def distill_data(cfg: ExperimentConfig, data: ClassificationData, st: SplitTargets | None,
                 use_teachers: bool = True, pool: TeacherPool | None = None) -> "DistillData":
    """Worker inputs. With a ``pool`` (online mode) workers ask the teacher actors per batch instead
    of reading cached train targets; the cache still ranks difficulty and scores agreement."""
    from distill_ray.train import DistillData

    online = pool is not None and use_teachers
    if data.task == "causal_lm":
        return DistillData(
            train_x=data.train.inputs, train_y=data.train.labels, val_x=data.val.inputs, val_y=data.val.labels,
            teacher_names=cfg.teacher_names(), num_classes=data.num_classes, input_shape=data.input_shape,
            task="causal_lm", teacher_handles=dict(pool.actor_handles()) if online else None,
            teacher_topk=st.train if st is not None and use_teachers and not online else None,
            val_teacher_topk=st.val if st is not None else None,
            difficulty=sequence_difficulty(cfg, st.train, data.train.inputs, data.train.labels, data.pad_id,
                                           data.num_classes) if st is not None and use_teachers else None,
            use_teachers=use_teachers)
    return DistillData(
        train_x=data.train.inputs, train_y=data.train.labels, val_x=data.val.inputs, val_y=data.val.labels,
        teacher_names=cfg.teacher_names(), num_classes=data.num_classes, input_shape=data.input_shape,
        # Workers get the cache's precision: fp16 halves the object-store copy; float32 keeps targets
        # bit-equal to what the teacher actors answer in online mode.
        teacher_logits=st.train.astype(np.dtype(cfg.cache.dtype)) if st is not None and use_teachers and not online
        else None,
        teacher_handles=dict(pool.actor_handles()) if online else None,
        val_teacher_logits=st.val if st is not None else None,
        difficulty=teacher_difficulty(cfg, st.train, data.train.labels) if st is not None and use_teachers else None,
        use_teachers=use_teachers)


def run_experiment(cfg: ExperimentConfig, retrain_teachers: bool = False, rebuild_cache: bool = False) -> dict:
    """teachers -> soft-target cache -> student (and baseline) on Ray Train -> test metrics -> RUN_DIR."""
    from distill_ray.train import export_student, load_trained_student, run_training

    run_dir = cfg.run_path().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _set_aside_stale_checkpoints(run_dir, dump_config(cfg))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    timings: dict[str, float] = {}

    def timed(phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[phase] = round(time.perf_counter() - start, 2)
        return out

    data = timed("data", load_data, cfg)
    dirs = timed("teachers", prepare_teachers, cfg, data, retrain_teachers)
    targets = timed("cache", build_cache, cfg, data, dirs, rebuild=rebuild_cache)
    st = split_targets(targets, data)
    storage = run_dir / "ray_results"

    pool = TeacherPool(teacher_specs(cfg, dirs), topk=cfg.loss.topk) if cfg.train.mode == "online" else None
    # Built once: the difficulty ranking inside is the expensive part.
    student_inputs = distill_data(cfg, data, st, pool=pool)
    try:
        result = timed("train_student", run_training, cfg, student_inputs, str(storage), "student")
    finally:
        if pool is not None:
            pool.shutdown()
    student, history, state = load_trained_student(cfg, student_inputs, result.checkpoint)
    baseline = None
    if cfg.train.baseline:
        baseline_inputs = distill_data(cfg, data, st, use_teachers=False)
        base_result = timed("train_baseline", run_training, cfg, baseline_inputs, str(storage), "baseline")
        baseline, base_history, _ = load_trained_student(cfg, baseline_inputs, base_result.checkpoint)
        (run_dir / "baseline_history.json").write_text(json.dumps(base_history))

    if data.task == "causal_lm":
        rows, reliability = evaluate_language_models(cfg, data, dirs, student, baseline, history)
        metric = "perplexity"
    else:
        rows, reliability = evaluate_classifiers(cfg, data, dirs, st, student, baseline, history)
        metric = "accuracy"
    weights = {name: float(w) for name, w in zip(cfg.teacher_names(), _final_weights(history))}
    main = "perplexity" if metric == "perplexity" else "accuracy"
    metrics = {
        "student": rows["student"][main],
        "teachers": {t.name: rows[t.name][main] for t in cfg.teachers},
        "blend": rows["blend"][main],
        "baseline": rows["baseline"][main] if baseline is not None else None,
        "teacher_weights": weights,
        "params": {"student": rows["student"]["params"], "teachers": {t.name: rows[t.name]["params"] for t in cfg.teachers}},
        "ece": {name: r["ece"] for name, r in rows.items() if r.get("ece") is not None},
        "latency_ms": {name: r["latency_ms"] for name, r in rows.items() if "latency_ms" in r},
        "timings": timings,
        "metric": metric,
        "split": "test",
        "num_test": int(len(data.test)),
    }
    if metric == "perplexity":
        metrics["token_accuracy"] = {name: r["accuracy"] for name, r in rows.items()}
    card = {"name": cfg.name, "task": cfg.data.task, "dataset": cfg.data.format, "teachers": list(cfg.teacher_names()),
            "teacher_weights": weights, "metrics": {f"test_{metric}": metrics["student"]},
            "loss": config_to_dict(cfg.loss), "blend": cfg.blend.kind, "curriculum": cfg.curriculum.scheduler,
            "version": "v1", "class_names": list(data.class_names)}
    export_student(cfg, student_inputs, student, run_dir / "student", card)
    if data.tokenizer:  # a text student serves raw text: its tokenizer goes with it
        save_tokenizer(data.tokenizer, run_dir / "student", max_length=data.input_shape[-1])
    (run_dir / "distill_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    (run_dir / "history.json").write_text(json.dumps(history))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print_summary(rows, cfg.teacher_names(), weights, metric)

    from distill_ray.report import write_report

    report = write_report(run_dir, metrics, history, base_history if baseline is not None else None, rows,
                          reliability, config_name=cfg.name)
    print(f"report: {report}")
    return metrics


def evaluate_language_models(cfg: ExperimentConfig, data: ClassificationData, dirs: dict[str, Path], student,
                             baseline, history: list[dict]) -> tuple[dict[str, dict], dict]:
    """Test perplexity and next-token accuracy of every teacher (run exactly, not from the top-k
    cache), their learned blend, the baseline and the student."""
    from distill_ray.evaluate import lm_label_logprobs, perplexity, single_sample_latency_ms, token_accuracy

    x, y = data.test.inputs, data.test.labels
    weights = torch.tensor(_final_weights(history))
    rows: dict[str, dict] = {}
    teacher_logp = []
    for t in cfg.teachers:
        model, _ = load_model(dirs[t.name])
        logp, top1 = lm_label_logprobs(model, x, y)
        teacher_logp.append(logp)
        rows[t.name] = {"perplexity": perplexity(logp, y), "accuracy": token_accuracy(top1, y),
                        "params": num_params(model),
                        "latency_ms": single_sample_latency_ms(model, torch.as_tensor(x[:1]), repeats=20, warmup=3)}
    blend_logp = torch.logsumexp(torch.stack(teacher_logp) + weights.log().view(-1, 1, 1), dim=0)
    rows["blend"] = {"perplexity": perplexity(blend_logp, y), "accuracy": None}
    for name, model in (("student", student), ("baseline", baseline)):
        if model is None:
            continue
        logp, top1 = lm_label_logprobs(model, x, y)
        rows[name] = {"perplexity": perplexity(logp, y), "accuracy": token_accuracy(top1, y),
                      "params": num_params(model),
                      "latency_ms": single_sample_latency_ms(model, torch.as_tensor(x[:1]), repeats=20, warmup=3)}
    return rows, {}


def evaluate_classifiers(cfg: ExperimentConfig, data: ClassificationData, dirs: dict[str, Path], st: SplitTargets,
                         student, baseline, history: list[dict]) -> tuple[dict[str, dict], dict]:
    """Test accuracy, ECE, size and latency of every teacher (from the cache), their blend, the
    baseline and the student; plus each one's test probabilities for the reliability diagram."""
    from distill_ray.blending import blend_probs
    from distill_ray.evaluate import accuracy, expected_calibration_error, predict_logits, single_sample_latency_ms

    y = data.test.labels
    rows: dict[str, dict] = {}
    for k, t in enumerate(cfg.teachers):
        logits = torch.as_tensor(st.test[k])
        model, _ = load_model(dirs[t.name])
        rows[t.name] = {"accuracy": accuracy(logits, y), "ece": expected_calibration_error(logits.softmax(-1), y),
                        "params": num_params(model),
                        "latency_ms": single_sample_latency_ms(model, torch.as_tensor(data.test.inputs[:1]))}
    weights = torch.tensor(_final_weights(history))
    blend = blend_probs(torch.as_tensor(st.test), weights, temperature=1.0)
    rows["blend"] = {"accuracy": accuracy(blend, y), "ece": expected_calibration_error(blend, y)}
    models = {"student": student, **({"baseline": baseline} if baseline is not None else {})}
    for name, model in models.items():
        logits = predict_logits(model, data.test.inputs)
        rows[name] = {"accuracy": accuracy(logits, y), "ece": expected_calibration_error(logits.softmax(-1), y),
                      "params": num_params(model),
                      "latency_ms": single_sample_latency_ms(model, torch.as_tensor(data.test.inputs[:1]))}
    test_probs = {t.name: torch.as_tensor(st.test[k]).float().softmax(-1) for k, t in enumerate(cfg.teachers)}
    test_probs.update({name: predict_logits(m, data.test.inputs).softmax(-1) for name, m in models.items()})
    return rows, {name: (p.numpy(), y) for name, p in test_probs.items()}


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


def _final_weights(history: list[dict]) -> list[float]:
    for row in reversed(history):
        found = [v for k, v in row.items() if k.startswith("teacher_weight/")]
        if found:
            return found
    raise ValueError("history has no teacher weights")


def print_summary(rows: dict[str, dict], teachers: tuple[str, ...], weights: dict[str, float],
                  metric: str = "accuracy") -> None:
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
