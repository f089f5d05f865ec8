"""What each Ray Train run reads and how long it runs: the train and validation datasets with only
the columns it needs (``training_inputs``), the labeled-rows-only view, and the step budgets that
make the baseline and the ablation's rows comparable with the student (``baseline_config``,
``epochs_for_steps``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from distill_ray.cache.build import teacher_columns
from distill_ray.config import ExperimentConfig
from distill_ray.cache.responses import rows_of_source, train_sources
from distill_ray.lm.sequence_kd import rows_from
from distill_ray.cache.soft_targets import CachedData
from distill_ray.data.bundled import load_tokenizer
from distill_ray.data.sources import DataInfo, SourceData
from distill_ray.train.stages import MixSettings, with_teachers
from distill_ray.train.streams import DIFFICULTY_PREFIX
from distill_ray.teachers.spec import TeacherSpec
from distill_ray.teachers.service import TeacherService, teacher_services
from distill_ray.teachers.setup import teacher_specs
from distill_ray.train.loop import TrainInputs


def online_specs(cfg: ExperimentConfig, dirs: dict[str, Path], task: str, trace_file: str | None = None
                 ) -> list[TeacherSpec]:
    """The teachers of an online run, the hint teacher asked for the features the loss reads."""
    hint_teacher = cfg.loss.hint_teacher or cfg.teacher_names()[0]
    features = ("hint",) * (cfg.loss.hint_weight > 0) + ("attention",) * (cfg.loss.attention_weight > 0)
    return teacher_specs(cfg, dirs, task == "causal_lm", {hint_teacher: features}, trace_file)


@contextlib.contextmanager
def online_teachers(cfg: ExperimentConfig, dirs: dict[str, Path] | None, task: str, trace_file: str | None = None,
                    scope: str | None = None, on_policy: bool = False) -> Iterator[dict[str, TeacherService]]:
    """For the ``with`` block, the teachers' services of an online or on-policy run, by name (loaded once,
    whatever the epochs); nothing in cached mode. Under a sweep's ``scope`` they are the sweep's, found
    running. ``on_policy``: start them even if ``cfg`` has no on-policy steps (a sweep whose trials may).
    ``trace_file`` (tests): the teachers log the ids they answer, and each load."""
    if cfg.train.mode != "online" and cfg.loss.on_policy.lmbda == 0 and not on_policy:
        yield {}
        return
    with teacher_services(online_specs(cfg, dirs, task, trace_file), scope) as services:
        yield services


def training_inputs(cfg: ExperimentConfig, data: CachedData | SourceData, info: DataInfo, use_teachers: bool = True,
                    stage: tuple | None = None, services: dict[str, TeacherService] | None = None,
                    labeled_only: bool | None = None) -> TrainInputs:
    """What Ray Train gets: the train and val splits as datasets (only the columns this run reads: its
    own teachers' targets and the difficulty measures) and the facts about them.

    ``data`` is the verified cache, or (online mode without a cache) the source splits themselves.
    Online mode (``train.mode=online``, the teachers' running ``services``, see ``online_teachers``)
    reads no targets: each rank's stream passes through one stage per teacher asking its service
    (``stages.rank_stream``), validation too when it has no cached targets. ``stage`` = (fn, kwargs)
    adds a Ray Data map_batches stage to both (the ablation's synthetic teacher). ``labeled_only`` (default: when there are no teachers) trains on the labeled train
    rows alone."""
    online = use_teachers and cfg.train.mode == "online"
    if online and not services:
        raise ValueError("online mode asks the teachers' services: start them with online_teachers() and pass "
                         "them (services=)")
    if isinstance(data, SourceData):
        if use_teachers and not online:
            raise ValueError("cached mode reads the teachers' targets from the cache; pass the CachedData")
        train, val, index = data.train, data.val, data.train.select_columns(["id"])
        rows, train_bytes = info.counts["train"], 0
    else:
        targets = teacher_columns(cfg.teacher_names(), cfg.loss.topk)
        stored = [c for c in targets if c in data.columns]
        measures = [c for c in data.columns if c.startswith(DIFFICULTY_PREFIX)] if use_teachers else []
        train_columns = ["id", "x", "label", *(stored if use_teachers and not online else []), *measures]
        train = data.dataset("train", train_columns)
        index = data.dataset("train", ["id", *measures])
        val = data.dataset("val", ["id", "x", "label", *stored])
        rows, train_bytes = data.rows("train"), sum(os.path.getsize(f) for f in data.files("train"))
        source = train_sources(cfg, use_teachers) if "source" in data.columns else None
        if source is not None:  # sequence-level KD: the references, or the teachers' responses, alone
            train = data.dataset("train", [*train_columns, "source"]).map_batches(
                rows_from, fn_kwargs={"source": source}, batch_format="numpy")
            index = data.dataset("train", ["id", *measures, "source"]).map_batches(
                rows_from, fn_kwargs={"source": source}, batch_format="numpy")
            kept = rows_of_source(data.files("train"), source)
            rows, train_bytes = kept, train_bytes * kept // max(1, rows)
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
        teachers = tuple(services[name] for name in cfg.teacher_names())
        if not any(c.endswith(("/logits", "/topk_logprobs")) for c in val.schema().names):
            val = with_teachers(val, teachers)  # agreement on validation needs the teachers' answers
        asking = [t for t in teachers if t.spec.features]
        if asking:  # the hint projector is sized before the first step: ask the teacher once, here
            probe = train.select_columns(["x"]).take_batch(2, batch_format="numpy")["x"]
            shapes = asking[0].feature_shapes(probe, asking[0].spec.features)
    scorers, eos_id, pad_id = (), None, 0
    if use_teachers and cfg.loss.on_policy.lmbda > 0:  # the student's responses are scored by every teacher
        if not services:
            raise ValueError("on-policy steps ask the teachers' services to score the student's responses: start "
                             "them with online_teachers() and pass them (services=)")
        scorers = tuple(services[name] for name in cfg.teacher_names())
        tokenizer = load_tokenizer(info.tokenizer)
        eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mix = MixSettings(cfg.loss.mixup_alpha, cfg.loss.cutmix_alpha, info.num_classes, cfg.train.seed)
    # Teachers asked afresh and pairs mixed afresh every epoch: nothing to keep between epochs.
    streamed_only = online or mix.active
    mode = cfg.train.data_mode
    keep_shard = not streamed_only and (mode == "memory" or (
        mode == "auto" and train_bytes / cfg.train.num_workers <= cfg.train.memory_budget_mb * 2**20))
    return TrainInputs(train=train, val=val, index=index, teacher_names=cfg.teacher_names(),
                       num_classes=info.num_classes, input_shape=info.input_shape, train_rows=rows,
                       train_bytes=train_bytes, task=info.task, topk=cfg.loss.topk,
                       all_labeled=info.labeled["train"] == info.counts["train"], use_teachers=use_teachers,
                       online_teachers=teachers, mix=mix if mix.active else None, keep_shard=keep_shard,
                       epoch_stage=not keep_shard and (mix.active or cfg.curriculum.scheduler != "none"),
                       feature_shapes=shapes, probe=probe, scorers=scorers, eos_id=eos_id, pad_id=pad_id,
                       class_counts=tuple(info.class_counts))


def labeled_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    labeled = np.asarray(batch["label"]) >= 0
    return {k: v[labeled] for k, v in batch.items()}


def epochs_for_steps(cfg: ExperimentConfig, rows: int, steps: int) -> int:
    """The fewest epochs over ``rows`` in which ``cfg`` (its curriculum included) takes at least
    ``steps`` optimizer steps: how runs on fewer rows, or holding rows back, get an equal step budget."""
    from dataclasses import replace

    from distill_ray.kd.objectives import planned_steps

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
    from distill_ray.kd.objectives import planned_steps

    base = without_curriculum(cfg)
    epochs = cfg.train.baseline_epochs or epochs_for_steps(
        base, labeled_rows, planned_steps(cfg, student_rows, cfg.train.num_workers))
    return with_epochs(base, epochs)


def with_epochs(cfg: ExperimentConfig, epochs: int) -> ExperimentConfig:
    """``cfg`` trained for ``epochs``, validating about as many times as ``cfg`` did (a run of many
    short epochs would otherwise validate, report and checkpoint after each)."""
    from dataclasses import replace

    validations = max(1, cfg.train.epochs / cfg.train.eval_every_epochs)
    every = max(cfg.train.eval_every_epochs, round(epochs / validations))
    return replace(cfg, train=replace(cfg.train, epochs=epochs, eval_every_epochs=every))
