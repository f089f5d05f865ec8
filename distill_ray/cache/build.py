"""The soft-target cache, built once: every split's rows through one Ray Data stage per teacher
(asking its service), finished with the storage dtype and every difficulty measure as columns, written as
verified Parquet by the Ray Data tasks themselves (``soft_targets.write_cache``)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from distill_ray.kd import curriculum
from distill_ray.config import ExperimentConfig
from distill_ray.models import load_model
from distill_ray.lm.reference import reference_key, with_reference_difficulty
from distill_ray.cache.responses import with_responses
from distill_ray.cache.soft_targets import CacheSpec, CachedData, CorruptCacheError, cache_dir_for, write_cache
from distill_ray.cache.topk_encoding import encode_targets
from distill_ray.data.sources import DataInfo, SourceData
from distill_ray.train.stages import with_teachers
from distill_ray.train.streams import DIFFICULTY_PREFIX
from distill_ray.teachers.service import TeacherService, teacher_services
from distill_ray.teachers.setup import teacher_specs


def cache_spec(cfg: ExperimentConfig, info: DataInfo, dirs: dict[str, Path], any_scheduler: bool = False) -> CacheSpec:
    from distill_ray.models import fingerprint

    prints = {}
    for t in cfg.teachers:
        model, _ = load_model(dirs[t.name])
        prints[t.name] = fingerprint(model)
        if t.tokenizer:  # the same weights read through another tokenizer, or carried another way, answer otherwise
            prints[t.name] += f"|tokenizer={t.tokenizer}|{cfg.loss.cross_tokenizer}"
    return CacheSpec(teacher_fingerprints=prints, data_fingerprint=info.fingerprint + reference_key(cfg, info.fingerprint, any_scheduler),
                     num_classes=info.num_classes,
                     topk=cfg.loss.topk, dtype=cfg.cache.dtype, topk_encoding=cfg.cache.topk_encoding,
                     seq_len=info.input_shape[-1] if info.task == "causal_lm" else None)


def finish_rows(batch: dict[str, np.ndarray], teachers: tuple[str, ...], dtype: str, topk: int | None,
                num_classes: int, causal: bool, pad_id: int | None, topk_encoding: str = "plain") -> dict[str, np.ndarray]:
    """The last stage before the cache: targets in the storage dtype (refusing a float16 overflow,
    which would NaN the loss later), every difficulty measure as a column, so any curriculum
    config reads the same cache, and top-k targets in the stored columns of ``topk_encoding``."""
    batch = _with_difficulty(batch, teachers, dtype, topk, num_classes, causal, pad_id)
    if topk is not None:
        batch = encode_targets(batch, teachers, topk_encoding, num_classes, dtype)
    return batch


def _dense(values, dtype) -> np.ndarray:
    """A tensor column as one ``[N, ...]`` array of ``dtype``. Ray Data hands it over as an object array
    of per-row arrays when it concatenated blocks whose tensor types differ (e.g. a teacher stage's empty
    block, re-bundled for the next teacher's batch size, makes the column variable-shaped); rows of
    one shape stack back."""
    values = np.asarray(values)
    if values.dtype == object:
        values = np.stack(values) if len(values) else values.astype(dtype)
    return values.astype(dtype, copy=False)


def _with_difficulty(batch: dict[str, np.ndarray], teachers: tuple[str, ...], dtype: str, topk: int | None,
                     num_classes: int, causal: bool, pad_id: int | None) -> dict[str, np.ndarray]:
    from distill_ray.kd.losses import dense_from_topk, topk_label_logprobs

    for t in teachers:
        key = f"{t}/logits" if topk is None else f"{t}/topk_logprobs"
        values = _dense(batch[key], np.float32)
        with np.errstate(over="ignore"):
            stored = values.astype(dtype)
        bad = np.isinf(stored) & np.isfinite(values)
        if bad.any():
            raise ValueError(f"teacher {t!r}: values overflow {dtype} (max |x| = {np.abs(values[bad]).max():.4g}); "
                             "store them as float32 (cache.dtype=float32)")
        batch[key] = stored
        if topk is not None:
            batch[f"{t}/topk_indices"] = _dense(batch[f"{t}/topk_indices"], np.int32)
    labels = torch.as_tensor(_dense(batch["label"], np.int64))
    if not teachers:  # self-distillation: no teacher outside the student, nothing to measure difficulty by
        return batch
    if causal:
        logp = torch.stack([torch.as_tensor(np.asarray(batch[f"{t}/topk_logprobs"], np.float32)) for t in teachers])
        idx = torch.stack([torch.as_tensor(np.asarray(batch[f"{t}/topk_indices"], np.int64)) for t in teachers])
        # A teacher with its own tokenizer leaves NaN where it has no aligned position: those tokens count for none.
        aligned = ~torch.isnan(logp[..., 0]).any(0)
        mask = ((labels >= 0) & aligned).float()
        # teacher_ce per token from the top-k targets (curriculum.teacher_ce needs the dense vocabulary)
        nll = -topk_label_logprobs(logp.nan_to_num(0.0), idx, labels.unsqueeze(0).expand(len(teachers), -1, -1),
                                   num_classes).mean(0)
        batch[DIFFICULTY_PREFIX + "teacher_ce"] = ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).numpy().astype(np.float32)
        real_tokens = torch.as_tensor(np.asarray(batch["x"]) != (0 if pad_id is None else pad_id))
        return _measured(batch, {"sequence_length": (real_tokens,)})
    if topk is None:
        logits = torch.stack([torch.as_tensor(np.asarray(batch[f"{t}/logits"], np.float32)) for t in teachers])
    else:
        logits = torch.stack([dense_from_topk(torch.as_tensor(np.asarray(batch[f"{t}/topk_logprobs"], np.float32)),
                                              torch.as_tensor(np.asarray(batch[f"{t}/topk_indices"], np.int64)),
                                              num_classes) for t in teachers])
    # Unlabeled rows: the mean teacher's loss on its own top guess (how unsure the teachers are).
    mean_logp = torch.logsumexp(torch.log_softmax(logits, -1), 0) - np.log(len(teachers))
    target = torch.where(labels >= 0, labels, mean_logp.argmax(-1))
    return _measured(batch, {"ensemble_entropy": (logits,), "teacher_disagreement": (logits,),
                             "teacher_ce": (logits, target)})


def _measured(batch: dict[str, np.ndarray], arguments: dict[str, tuple]) -> dict[str, np.ndarray]:
    """``batch`` with a ``difficulty/NAME`` column per measurer, each computed by its
    ``curriculum.MEASURERS`` function from the arguments given for it."""
    for name, args in arguments.items():
        batch[DIFFICULTY_PREFIX + name] = curriculum.MEASURERS[name](*args).numpy().astype(np.float32)
    return batch


def build_cache(cfg: ExperimentConfig, data: SourceData, dirs: dict[str, Path], rebuild: bool = False,
                trace_file: str | None = None, any_scheduler: bool = False,
                services: dict[str, TeacherService] | None = None) -> CachedData:
    """Every split's rows with every teacher's soft targets and the difficulty measures, computed once
    by the teachers' services (``teachers/service.py``: the running ``services`` of an online run, or
    started here for the build) through Ray Data stages whose tasks write the Parquet files themselves.
    ``trace_file`` (tests): one line per teacher ``generate`` call of sequence-level KD.
    ``any_scheduler``: runs on this cache may use another curriculum scheduler than ``cfg``'s (a sweep),
    so measures only some schedulers read are computed anyway (``reference.wanted``)."""
    # Sequence-level KD: the teachers' responses join the train rows first (generated once, cached), so
    # their token-level targets are cached with everything else.
    data = with_responses(cfg, data, dirs, rebuild=rebuild, trace_file=trace_file)
    spec = cache_spec(cfg, data.info, dirs, any_scheduler)
    directory = cache_dir_for(Path(cfg.cache.dir).expanduser(), spec)
    if directory.exists() and not (rebuild or cfg.cache.rebuild):
        try:
            cache = CachedData.open(directory, spec)
            print(f"soft targets: reusing verified cache {directory}")
            return cache
        except CorruptCacheError as err:
            raise CorruptCacheError(f"{err}. Rebuild it with `distill-ray cache CONFIG --rebuild`.") from None

    causal = data.info.task == "causal_lm"
    specs = teacher_specs(cfg, dirs, causal)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        running = services or stack.enter_context(teacher_services(specs))
        # The cache's own requests (no features) to whichever replicas answer them.
        ds = with_teachers(data.rows, tuple(TeacherService(s, running[s.name].replicas) for s in specs))
        ds = with_reference_difficulty(cfg, data, dirs, ds, any_scheduler)  # POCL's reference_rouge_loss, when read
        ds = ds.map_batches(finish_rows, fn_kwargs={"teachers": cfg.teacher_names(), "dtype": cfg.cache.dtype,
                                                    "topk": cfg.loss.topk, "num_classes": data.info.num_classes,
                                                    "causal": causal, "pad_id": data.info.pad_id,
                                                    "topk_encoding": spec.topk_encoding},
                            batch_format="numpy", batch_size=512)
        directory.parent.mkdir(parents=True, exist_ok=True)
        write_cache(directory, spec, ds, max_rows_per_file=cfg.cache.shard_rows)
    cache = CachedData.open(directory, spec)
    print(f"soft targets: {cache.manifest['num_rows']:,} rows x {len(cfg.teachers)} teachers cached in "
          f"{time.perf_counter() - start:.1f}s at {directory}")
    return cache


def teacher_columns(names, topk: int | None) -> list[str]:
    return [f"{t}/logits" for t in names] if topk is None else \
        [c for t in names for c in (f"{t}/topk_logprobs", f"{t}/topk_indices")]
