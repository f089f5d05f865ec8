"""POCL's difficulty for instruction data (``curriculum.measurers: [reference_rouge_loss]``): how well
a reference model, one that learned the task without the teachers, already answers each train row.

Per train row the reference gives its mean token loss on the row's reference response and the
ROUGE-L of its greedy response against it; the two are fused by reciprocal rank over the whole train
split (``curriculum.reference_rouge_loss``, k = ``curriculum.rrf_k``) into the cache column
``difficulty/reference_rouge_loss``, beside the raw ``reference/rouge_l`` and ``reference/loss``.

The reference is the student's architecture trained from the labels for
``curriculum.reference_epochs`` (``reference: scratch``; a Ray task, reused while data and settings
are unchanged) or one of the teachers. It runs once, when the cache is built, as a Ray Data
actor-pool stage over the train rows; ranks need every row, so the driver gathers (id, ROUGE-L,
loss), 16 bytes a row, fuses, and a last stage joins the result onto the rows being cached. Val and
test rows get NaN: only the train split is ever ordered. With ``curriculum.scheduler`` none or
confidence nothing reads the ranking, so no reference is trained (``wanted``), unless a sweep varies
the scheduler.

Cost on CPU is greedy generation: one token per step for each train row, up to the row's reference
length capped by ``curriculum.reference_max_new_tokens``, in length-sorted batches
(``generation.batched_responses``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch

from distill_ray.kd import curriculum
from distill_ray.config import ExperimentConfig
from distill_ray.train.streams import DIFFICULTY_PREFIX

MEASURER = "reference_rouge_loss"
COLUMN = DIFFICULTY_PREFIX + MEASURER
ROUGE_COLUMN, LOSS_COLUMN = "reference/rouge_l", "reference/loss"
ROWS_PER_BATCH = 128  # rows one Ray Data batch gives the reference; generation sorts them by prompt length


def wanted(cfg: ExperimentConfig, any_scheduler: bool = False) -> bool:
    """Whether the cache gets the reference's columns: the measurer is listed and a scheduler that
    opens rows by difficulty (``curriculum.DIFFICULTY_SCHEDULERS``) will read them, the config's own
    or, ``any_scheduler``, whichever a sweep's trials run. Under ``none`` or ``confidence`` alone no
    reference is trained: nothing would read what it costs."""
    c = cfg.curriculum
    return MEASURER in c.measurers and (any_scheduler or c.scheduler in curriculum.DIFFICULTY_SCHEDULERS)


# --- per row, no Ray --------------------------------------------------------------------------------

def row_measures(model, tokenizer, inputs: np.ndarray, labels: np.ndarray, max_new_tokens: int,
                 pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ROUGE-L, mean token loss) of ``model`` on each instruction row, each float32 ``[N]``.

    The prompt is every token up to the first labelled position, the reference the labelled tokens
    (``generation.prompts_and_references``); the greedy response gets at most the reference's length
    and ``max_new_tokens`` tokens. ROUGE-L compares decoded whitespace words (as the run's scores do).
    A row with no labelled token has nothing to answer: loss inf and ROUGE-L 0, the hardest."""
    from distill_ray.evaluation.metrics import lm_label_logprobs
    from distill_ray.lm.generation import GENERATE_BATCH, batched_responses, rouge_l

    x, y = np.asarray(inputs), np.asarray(labels)
    taught = y >= 0
    logp, _ = lm_label_logprobs(model, x, y)
    counts = taught.sum(1)
    loss = np.full(len(x), np.inf, np.float32)
    loss[counts > 0] = (-(logp.numpy() * taught).sum(1)[counts > 0] / counts[counts > 0]).astype(np.float32)
    rows = [i for i in range(len(x)) if counts[i] > 0]
    prompts = [x[i, :np.flatnonzero(taught[i])[0] + 1].tolist() for i in rows]
    references = [y[i, taught[i]].tolist() for i in rows]
    eos = tokenizer.eos_token_id
    responses = batched_responses(model, prompts, [min(len(r), max_new_tokens) for r in references], eos, pad_id,
                                  batch_size=GENERATE_BATCH)
    rouge = np.zeros(len(x), np.float32)
    for i, response, reference in zip(rows, responses, references):
        rouge[i] = rouge_l(tokenizer.decode(response, skip_special_tokens=True),
                           tokenizer.decode([t for t in reference if t != eos], skip_special_tokens=True))
    return rouge, loss


class ReferenceColumns:
    """Ray Data callable: the reference's ``rouge_l`` and ``loss`` for a batch of train rows (with ``id``)."""

    def __init__(self, model_dir: str, tokenizer: str, max_new_tokens: int, pad_id: int, torch_threads: int = 1):
        from distill_ray.data.bundled import load_tokenizer
        from distill_ray.models import freeze, load_model

        torch.set_num_threads(torch_threads)
        self.model = freeze(load_model(model_dir)[0])
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_new_tokens, self.pad_id = max_new_tokens, pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rouge, loss = row_measures(self.model, self.tokenizer, batch["x"], batch["label"], self.max_new_tokens,
                                   self.pad_id)
        return {"id": np.asarray(batch["id"]), "rouge_l": rouge, "loss": loss}


def add_reference_columns(batch: dict[str, np.ndarray], ids: np.ndarray, rouge_l: np.ndarray, loss: np.ndarray,
                          difficulty: np.ndarray) -> dict[str, np.ndarray]:
    """Ray Data stage: each train row's measures and fused difficulty, looked up by id (``ids`` sorted);
    NaN for val and test rows."""
    row_ids = np.asarray(batch["id"])
    train = np.asarray(batch["split"]) == "train"
    pos = np.minimum(np.searchsorted(ids, row_ids), max(len(ids) - 1, 0))
    found = (ids[pos] == row_ids) if len(ids) else np.zeros(len(row_ids), bool)
    if (train & ~found).any():
        raise ValueError(f"{int((train & ~found).sum())} train rows have no reference measures (ids "
                         f"{row_ids[train & ~found][:3].tolist()}...): the train split changed while the cache was built")
    for column, values, dtype in ((ROUGE_COLUMN, rouge_l, np.float32), (LOSS_COLUMN, loss, np.float32),
                                  (COLUMN, difficulty, np.float64)):
        out = np.full(len(row_ids), np.nan, dtype)
        out[train] = values[pos[train]]
        batch[column] = out
    return batch


# --- which reference, trained where ------------------------------------------------------------------

def _scratch_recipe(cfg: ExperimentConfig) -> tuple[str, dict]:
    options = {**dict(cfg.student.options), "epochs": cfg.curriculum.reference_epochs, "lr": cfg.train.lr,
               "batch_size": cfg.train.batch_size}
    return cfg.student.arch, options


def _scratch_name(cfg: ExperimentConfig, data_fingerprint: str) -> str:
    """The scratch reference's name: a digest of what it is trained from (as a recipe teacher's directory)."""
    arch, options = _scratch_recipe(cfg)
    blob = json.dumps({"arch": arch, "options": options, "data": data_fingerprint, "seed": cfg.train.seed},
                      sort_keys=True)
    return f"scratch-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def reference_key(cfg: ExperimentConfig, data_fingerprint: str, any_scheduler: bool = False) -> str:
    """What the cached difficulty depends on, '' without it (``wanted``): part of the cache's key, so a
    changed reference (or its settings) never reuses another reference's ranking, and a cache built
    without the reference is never taken for one with it."""
    if not wanted(cfg, any_scheduler):
        return ""
    c = cfg.curriculum
    # A teacher's weights are already in the key (the cache's teacher fingerprints).
    source = _scratch_name(cfg, data_fingerprint) if c.reference == "scratch" else f"teacher:{c.reference}"
    return f"|{MEASURER}={source},max_new_tokens={c.reference_max_new_tokens},k={c.rrf_k}"


def prepare_reference(cfg: ExperimentConfig, data, dirs: dict[str, Path]) -> Path:
    """The reference's model directory: a teacher's, or the scratch reference trained now (a Ray task,
    as recipe teachers are) unless already there for this data and these settings."""
    from distill_ray.data.bundled import cache_root
    from distill_ray.teachers.setup import train_teacher_task

    if cfg.curriculum.reference != "scratch":
        return dirs[cfg.curriculum.reference]
    out = cache_root() / "references" / _scratch_name(cfg, data.info.fingerprint)
    if (out / "distill_spec.json").is_file():
        print(f"reference: reusing {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    arch, options = _scratch_recipe(cfg)
    task = ray.remote(num_cpus=1)(train_teacher_task)
    info = ray.get(task.remote("reference", arch, options, data.train.materialize(), data.val.materialize(),
                               data.info.to_dict(), cfg.train.seed, str(out)))
    print(f"reference: {arch} trained from the labels for {cfg.curriculum.reference_epochs} epoch(s) in "
          f"{info['seconds']:.0f}s, {info['params']:,} params, val token accuracy {info['val_accuracy']:.4f}")
    return out


def measure_train_rows(cfg: ExperimentConfig, data, model_dir: Path) -> dict[str, np.ndarray]:
    """Every train row's reference ROUGE-L and loss (a Ray Data actor-pool stage), gathered sorted by
    id, and their reciprocal-rank fusion: ``{"ids", "rouge_l", "loss", "difficulty"}``."""
    start = time.perf_counter()
    ds = data.train.select_columns(["id", "x", "label"]).map_batches(
        ReferenceColumns, fn_constructor_args=(str(model_dir), data.info.tokenizer,
                                               cfg.curriculum.reference_max_new_tokens, int(data.info.pad_id or 0)),
        batch_format="numpy", batch_size=ROWS_PER_BATCH, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    ids = np.concatenate([p["id"] for p in parts])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    rouge = np.concatenate([p["rouge_l"] for p in parts])[order]
    loss = np.concatenate([p["loss"] for p in parts])[order]
    if len(np.unique(ids)) != len(ids):
        raise ValueError("train rows with duplicate ids: the reference cannot tell them apart")
    # Fused from the float32 values stored beside it, so the column is reproducible from the cache alone.
    difficulty = curriculum.reference_rouge_loss(torch.from_numpy(rouge), torch.from_numpy(loss), k=cfg.curriculum.rrf_k)
    print(f"reference: {len(ids):,} train rows measured in {time.perf_counter() - start:.0f}s (greedy up to "
          f"{cfg.curriculum.reference_max_new_tokens} tokens; mean ROUGE-L {rouge.mean():.3f}, mean loss "
          f"{loss[np.isfinite(loss)].mean():.3f})", flush=True)
    return {"ids": ids, "rouge_l": rouge, "loss": loss, "difficulty": difficulty.numpy()}


def with_reference_difficulty(cfg: ExperimentConfig, data, dirs: dict[str, Path], ds, any_scheduler: bool = False):
    """``ds`` (every split's rows) with the reference columns when ``wanted``, else ``ds``."""
    if not wanted(cfg, any_scheduler):
        return ds
    measures = measure_train_rows(cfg, data, prepare_reference(cfg, data, dirs))
    return ds.map_batches(add_reference_columns, fn_kwargs=measures, batch_format="numpy")
