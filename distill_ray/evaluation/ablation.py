"""The quality table: which parts of the distillation recipe earn their keep, over seeds.

Every row trains the same student architecture on the same data split with Ray Train
(``distill_ray.train.loop.run_training``), only the distillation setup differs:

====================== =========================================================================
row                    what changes from the config
====================== =========================================================================
scratch                no teachers: the student from the labeled rows alone, no curriculum, as many
                       optimizer steps as the ``learned`` row (the run's baseline)
kd_labeled_only        learned, no curriculum, on the labeled rows only (no transfer set), equal steps
kd_best_teacher        KD from the single teacher with the best validation accuracy, no curriculum
uniform                all teachers, equal weights, no curriculum
confidence             all teachers, per-sample confidence (entropy) weights, no curriculum
learned                all teachers, learned_global weights (fit to labels), no curriculum
learned+multi_stage    learned + the config's multi-stage (POCL) curriculum
learned+linear_ramp    learned + linear_ramp data opening
learned+confidence     learned + confidence-based sampling
learned+broken_teacher learned, no curriculum, plus a 4th "teacher" emitting seeded random logits
scratch+wide           scratch with a student twice as wide (every width option of the student x2)
learned+wide           learned with that twice-as-wide student: does a wider student use more of
                       what the teachers know, or only more of the labels?
====================== =========================================================================

Rows without curriculum train at the constant ``loss.temperature`` and ``loss.alpha``. Curriculum
rows take their settings (num_stages, stage_length, start_fraction, ...) from the config's
curriculum section and as many epochs as it takes them to make the ``learned`` row's optimizer
steps (a curriculum holds data back early, so at equal epochs it would simply train less); the
multi_stage row keeps the section's stage temperatures and alphas (POCL's T 1 -> 2 by default),
whatever scheduler the config itself runs; the other curricula keep temperature and alpha constant.
Teachers are prepared and soft targets cached once; each row reads the cached dataset with the
columns of its own teachers (one, for kd_best_teacher), or adds the broken teacher's seeded random
logits as a Ray Data stage. Seeds are ``train.seed, train.seed + 1, ...``; a run is named by
its row, seed and a digest of its config, so re-running an interrupted ablation into the same
directory resumes (finished runs are only reloaded) and a changed config never reuses a stale run.

A causal language model (``data.task: causal_lm``) gets rows of its own, scored on the test split by
perplexity of the references and, on instruction data, ROUGE-L of greedy responses to held-out
prompts and the share of generated bodies that parse (``scoring.language_model_scores``):

====================== =========================================================================
row                    what changes from the config
====================== =========================================================================
scratch                no teachers: the student from the references alone, the token_kd row's steps
token_kd               token-level KD from the learned blend on the references, no curriculum
seq_kd                 sequence-level KD alone: trained on the teachers' responses
                       (``sequence_kd.mode: teacher``) with ``loss.alpha: 0`` (task loss only)
token+seq_kd           ``sequence_kd.mode: mixed`` (references + responses), token-level KD on both
token_kd+pocl          token_kd + the multi-stage curriculum ranked by ``reference_rouge_loss`` (POCL)
token+seq_kd+pocl      token+seq_kd + that curriculum
====================== =========================================================================

Every row gets (at least, by less than an epoch) the token_kd row's optimizer steps: a row over more
rows (mixed) or holding rows back (POCL) trains the epochs that take. The rows read one of two
caches, each what ``distill-ray run`` builds for its config: the references' (sequence_kd off) and the
responses' (the teachers' responses joined to the references; the same cache for modes teacher and
mixed); a POCL row's cache carries the reference model's ranking, computed from that cache's train rows
(for the responses' cache, references and responses both). Sequence-KD and POCL rows need instruction
data. The teachers and their blend are scored once (they do not depend on the student's seed), the
blend at the mean final learned weights of the token_kd row (or the first row that learned some) and
decoded greedily from the weighted mixture of the teachers' next-token distributions
(``generation.BlendedLM``). Runs already in ``runs.json`` under the same run name are reused as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distill_ray.config import ExperimentConfig, TeacherConfig, config_from_dict, config_to_dict, load_config
from distill_ray.evaluation.report import final_teacher_weights, gap_recovered

ROWS = ("scratch", "kd_labeled_only", "kd_best_teacher", "uniform", "confidence", "learned", "learned+multi_stage",
        "learned+linear_ramp", "learned+confidence", "learned+broken_teacher", "scratch+wide", "learned+wide")
DESCRIPTIONS = {
    "scratch": "student from the labeled rows only, equal steps",
    "kd_labeled_only": "learned blend, labeled rows only (no transfer set), equal steps",
    "kd_best_teacher": "KD from the single best teacher (by validation accuracy)",
    "uniform": "all teachers, uniform blend",
    "confidence": "all teachers, confidence (entropy) blend",
    "learned": "all teachers, learned_global blend, no curriculum",
    "learned+multi_stage": "learned blend + multi-stage (POCL) curriculum",
    "learned+linear_ramp": "learned blend + linear_ramp curriculum",
    "learned+confidence": "learned blend + confidence-sampling curriculum",
    "learned+broken_teacher": "learned blend, no curriculum, + a 4th teacher emitting random logits",
    "scratch+wide": "scratch, with a student twice as wide",
    "learned+wide": "learned blend, no curriculum, with a student twice as wide",
}
LM_ROWS = ("scratch", "token_kd", "seq_kd", "token+seq_kd", "token_kd+pocl", "token+seq_kd+pocl")
LM_DESCRIPTIONS = {
    "scratch": "student from the references only, token_kd's steps",
    "token_kd": "token-level KD from the learned blend on the references",
    "seq_kd": "sequence-level KD: the teachers' responses, task loss only (alpha 0)",
    "token+seq_kd": "references + teachers' responses, token-level KD on both",
    "token_kd+pocl": "token_kd + POCL (multi-stage, reference_rouge_loss)",
    "token+seq_kd+pocl": "token+seq_kd + POCL (multi-stage, reference_rouge_loss)",
}
POCL_MEASURER = "reference_rouge_loss"
# Student options that set a width (MLP hidden sizes, CNN channels, transformer widths): x2 in "+wide".
WIDTH_OPTIONS = ("hidden", "hidden_size", "intermediate_size", "channels", "filters", "d_model", "dim_feedforward")
BROKEN = "broken_random"


@dataclass(frozen=True)
class Prepared:
    """What every row shares: the data's facts, teacher directories, the verified cache."""

    cfg: ExperimentConfig
    info: Any  # sources.DataInfo
    dirs: dict
    cache: Any  # soft_targets.CachedData
    teacher_val: dict[str, float]
    teacher_test: dict[str, float]
    timings: dict[str, float]

    @property
    def best_teacher(self) -> str:
        """The teacher with the best validation accuracy (test accuracy is never used to choose)."""
        return max(self.teacher_val, key=self.teacher_val.get)


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Teachers (trained once, reused) and their soft-target cache, plus each teacher's accuracy."""
    from distill_ray.evaluation.metrics import accuracy
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers
    from distill_ray.evaluation.scoring import classifier_outputs

    timings = {}
    start = time.perf_counter()
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    timings["teachers"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    cache = build_cache(cfg, data, dirs)
    timings["cache"] = round(time.perf_counter() - start, 2)
    scores = {}
    for split in ("val", "test"):
        teachers, _, y = classifier_outputs(cfg, cache, split, {})
        scores[split] = {t.name: accuracy(teachers[k], y) for k, t in enumerate(cfg.teachers)}
    return Prepared(cfg, data.info, dirs, cache, scores["val"], scores["test"], timings)


# --- rows -----------------------------------------------------------------------------------------

def _no_curriculum(cfg: ExperimentConfig) -> ExperimentConfig:
    from distill_ray.train.inputs import without_curriculum

    return without_curriculum(cfg)


def _with_scheduler(cfg: ExperimentConfig, scheduler: str, rows: int) -> ExperimentConfig:
    """The curriculum row, with the epochs that give it the no-curriculum row's optimizer steps."""
    from distill_ray.train.inputs import epochs_for_steps
    from distill_ray.kd.objectives import planned_steps

    if scheduler == "multi_stage":  # the config's own POCL settings, temperature stages included
        out = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, scheduler="multi_stage"))
    else:
        base = _no_curriculum(cfg)
        out = dataclasses.replace(base, curriculum=dataclasses.replace(base.curriculum, scheduler=scheduler))
    steps = planned_steps(_no_curriculum(cfg), rows, cfg.train.num_workers)
    return dataclasses.replace(out, train=dataclasses.replace(out.train, epochs=epochs_for_steps(out, rows, steps)))


def wider(cfg: ExperimentConfig, factor: int = 2) -> ExperimentConfig:
    """The config with every width option of its student (``WIDTH_OPTIONS``; ints or lists of ints)
    multiplied by ``factor``; depth, heads and the rest unchanged."""
    options = dict(cfg.student.options)
    scaled = {k: [v * factor for v in options[k]] if isinstance(options[k], (list, tuple)) else options[k] * factor
              for k in WIDTH_OPTIONS if isinstance(options.get(k), (int, list, tuple))}
    if not scaled:
        raise ValueError(f"student {cfg.student.arch!r} has none of the width options {', '.join(WIDTH_OPTIONS)} "
                         "among its options; set one in student.options to run the '+wide' rows")
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, options={**options, **scaled}))


def add_broken_teacher(batch: dict[str, np.ndarray], name: str, real: Sequence[str], topk: int | None,
                       seed: int) -> dict[str, np.ndarray]:
    """A Ray Data stage adding a "teacher" of seeded Gaussian logits with, row by row, the mean and
    spread of the real teachers' logits for that row: as confident as a real teacher, right only by
    chance. Each row's logits depend only on (seed, id), never on how rows are batched."""
    from distill_ray.kd.losses import teacher_topk

    key = "logits" if topk is None else "topk_logprobs"
    first = batch[f"{real[0]}/{key}"]
    reference = np.stack([np.asarray(batch[f"{t}/{key}"], np.float32) for t in real], 1)  # [N, K, C or k]
    num_classes = first.shape[-1] if topk is None else int(max(np.asarray(batch[f"{t}/topk_indices"]).max()
                                                               for t in real)) + 1
    mean, std = reference.mean((1, 2)), reference.std((1, 2)) + 1e-6
    logits = np.stack([np.random.default_rng([seed, int(i) & (2**63 - 1)]).standard_normal(num_classes)
                       for i in batch["id"]]).astype(np.float32) * std[:, None] + mean[:, None]
    if topk is None:
        batch[f"{name}/logits"] = logits.astype(first.dtype)
    else:
        logp, idx = teacher_topk(torch.as_tensor(logits), topk)
        batch[f"{name}/topk_logprobs"] = logp.numpy().astype(first.dtype)
        batch[f"{name}/topk_indices"] = idx.numpy().astype(np.int32)
    return batch


def row_setup(row: str, prep: Prepared, seed: int):
    """(config, extra Ray Data stage or None, use_teachers, labeled rows only) of one row at one seed."""
    from distill_ray.train.inputs import baseline_config, epochs_for_steps, with_epochs
    from distill_ray.kd.objectives import planned_steps

    base = dataclasses.replace(prep.cfg, train=dataclasses.replace(prep.cfg.train, seed=seed, baseline=False))
    learned = dataclasses.replace(base, blend=dataclasses.replace(base.blend, kind="learned_global"))
    rows, labeled = prep.info.counts["train"], prep.info.labeled["train"]
    if row.endswith("+wide"):
        cfg, stage, use_teachers, labeled_only = row_setup(row.removesuffix("+wide"), prep, seed)
        return wider(cfg), stage, use_teachers, labeled_only
    if row == "scratch":
        return baseline_config(_no_curriculum(learned), rows, labeled), None, False, True
    if row == "kd_labeled_only":
        cfg = _no_curriculum(learned)
        epochs = epochs_for_steps(cfg, labeled, planned_steps(cfg, rows, cfg.train.num_workers))
        return with_epochs(cfg, epochs), None, True, True
    if row == "kd_best_teacher":
        k = prep.cfg.teacher_names().index(prep.best_teacher)
        cfg = _no_curriculum(dataclasses.replace(base, teachers=(base.teachers[k],),
                                                 blend=dataclasses.replace(base.blend, kind="uniform")))
        return cfg, None, True, False
    if row in ("uniform", "confidence"):
        return _no_curriculum(dataclasses.replace(base, blend=dataclasses.replace(base.blend, kind=row))), None, True, False
    if row == "learned":
        return _no_curriculum(learned), None, True, False
    if row.startswith("learned+") and row.split("+", 1)[1] in ("multi_stage", "linear_ramp", "confidence"):
        return _with_scheduler(learned, row.split("+", 1)[1], rows), None, True, False
    if row == "learned+broken_teacher":
        broken = TeacherConfig(name=BROKEN, source="recipe", recipe="mlp")  # never built: logits are synthetic
        cfg = _no_curriculum(dataclasses.replace(learned, teachers=(*learned.teachers, broken)))
        stage = (add_broken_teacher, {"name": BROKEN, "real": list(prep.cfg.teacher_names()), "topk": cfg.loss.topk,
                                      "seed": 10_007 * (seed + 1)})
        return cfg, stage, True, False
    raise ValueError(f"unknown ablation row {row!r}; choose from: {', '.join(ROWS)}")


def _run_name(row: str, cfg: ExperimentConfig, seed: int) -> str:
    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{row.replace('+', '_')}-seed{seed}-{digest}"


def run_row(row: str, prep: Prepared, seed: int, storage: Path) -> dict[str, Any]:
    """Train one row at one seed on Ray Train; test accuracy of the result and its final weights."""
    from distill_ray.evaluation.metrics import classifier_scores
    from distill_ray.models import num_params
    from distill_ray.train.inputs import training_inputs
    from distill_ray.evaluation.scoring import classifier_outputs
    from distill_ray.train.loop import load_trained_student, run_training

    cfg, stage, use_teachers, labeled_only = row_setup(row, prep, seed)
    inputs = training_inputs(cfg, prep.cache, prep.info, use_teachers=use_teachers, stage=stage,
                             labeled_only=labeled_only)
    start = time.perf_counter()
    result = run_training(cfg, inputs, str(storage), _run_name(row, cfg, seed))
    seconds = time.perf_counter() - start
    student, history, _ = load_trained_student(cfg, inputs, result.checkpoint)
    _, outputs, y = classifier_outputs(prep.cfg, prep.cache, "test", {"student": student})
    scores = classifier_scores(outputs["student"].softmax(-1), y)
    weights = final_teacher_weights(history) if use_teachers else {}
    epochs = [r for r in history if r.get("kind") == "epoch"]
    best = next((r for r in epochs if r["epoch"] == epochs[-1].get("best_epoch")), epochs[-1]) if epochs else {}
    return {"row": row, "seed": seed, "test_accuracy": scores["accuracy"], "test_ece": scores["ece"],
            "val_accuracy": best.get("val_accuracy"), "best_epoch": best.get("epoch"), "epochs": cfg.train.epochs,
            "teacher_weights": weights, "train_seconds": round(seconds, 2), "student_params": num_params(student)}


# --- the table ------------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def machine_info() -> dict[str, Any]:
    import ray

    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads()}


def summarize(runs: list[dict], prep: Prepared, rows: Sequence[str]) -> dict[str, Any]:
    best = prep.best_teacher
    best_acc = prep.teacher_test[best]
    table: dict[str, Any] = {}
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        mean, std = _mean_std([r["test_accuracy"] for r in mine])
        weights = {}
        for name in (mine[0]["teacher_weights"] if mine else {}):
            weights[name] = _mean_std([r["teacher_weights"][name] for r in mine])[0]
        table[row] = {"description": DESCRIPTIONS[row], "mean": mean, "std": std, "n": len(mine),
                      "per_seed": {r["seed"]: r["test_accuracy"] for r in mine}, "teacher_weights": weights,
                      "student_params": mine[0].get("student_params") if mine else None,
                      "train_seconds_mean": _mean_std([r["train_seconds"] for r in mine])[0]}
    scratch = table.get("scratch", {}).get("mean")
    for row, entry in table.items():
        entry["gap_recovered"] = gap_recovered(entry["mean"], scratch, best_acc)
    out: dict[str, Any] = {"rows": table, "best_teacher": {"name": best, "val_accuracy": prep.teacher_val[best],
                                                           "test_accuracy": best_acc},
                           "teachers": {n: {"val_accuracy": prep.teacher_val[n], "test_accuracy": prep.teacher_test[n]}
                                        for n in prep.teacher_val}}
    if "learned" in table and "uniform" in table:
        diffs = [table["learned"]["per_seed"][s] - table["uniform"]["per_seed"][s]
                 for s in table["learned"]["per_seed"] if s in table["uniform"]["per_seed"]]
        mean, std = _mean_std(diffs) if diffs else (math.nan, math.nan)
        out["learned_vs_uniform"] = {"mean_diff": mean, "std_diff": std, "per_seed_diff": diffs,
                                     "learned_ge_uniform": bool(table["learned"]["mean"] >= table["uniform"]["mean"])}
    if "learned+broken_teacher" in table:
        entry = table["learned+broken_teacher"]
        weights = [r["teacher_weights"].get(BROKEN) for r in runs if r["row"] == "learned+broken_teacher"]
        broken = {"final_weight_mean": _mean_std(weights)[0], "final_weight_max": max(weights),
                  "per_seed_weight": weights}
        if "learned" in table:
            broken["accuracy_drop_vs_learned"] = table["learned"]["mean"] - entry["mean"]
        out["broken_teacher"] = broken
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def ablation_markdown(result: dict[str, Any]) -> str:
    cfg_name, m = result["config_name"], result["machine"]
    best = result["best_teacher"]
    lines = [f"# Ablation: {cfg_name}", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu_cores']} CPU cores, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
             f"ray {m['ray']}. Seeds: {', '.join(map(str, result['seeds']))} (train.seed). "
             f"Test split: {result['num_test']} samples; student: {result['student']}. "
             f"Wall time: {result['wall_seconds'] / 60:.1f} min.", "",
             "Teachers (test accuracy): " + ", ".join(f"{n} {v['test_accuracy']:.4f}"
                                                     for n, v in result["teachers"].items())
             + f". Best by validation accuracy: **{best['name']}** (test {best['test_accuracy']:.4f}).", "",
             "| row | setup | student params | test accuracy (mean ± std) | per seed | gap recovered | "
             "final teacher weights |",
             "|---|---|---:|---:|---|---:|---|"]
    for row, e in result["rows"].items():
        per_seed = ", ".join(f"{v:.4f}" for v in e["per_seed"].values())
        weights = ", ".join(f"{n} {w:.3f}" for n, w in e["teacher_weights"].items()) or "-"
        params = f"{e['student_params']:,}" if e.get("student_params") else "-"
        lines.append(f"| {row} | {e['description']} | {params} | {e['mean']:.4f} ± {e['std']:.4f} | {per_seed} | "
                     f"{_pct(e['gap_recovered'])} | {weights} |")
    lines += ["", "Gap recovered = (row − scratch) / (best teacher − scratch), on mean test accuracy.", ""]
    if "learned_vs_uniform" in result:
        c = result["learned_vs_uniform"]
        lines.append(f"Learned vs uniform blend: learned − uniform = {100 * c['mean_diff']:+.2f} ± "
                     f"{100 * c['std_diff']:.2f} points (paired by seed: "
                     + ", ".join(f"{100 * d:+.2f}" for d in c["per_seed_diff"]) + ").")
    if "broken_teacher" in result:
        b = result["broken_teacher"]
        text = (f"Broken teacher ({BROKEN}, random logits): final learned weight {b['final_weight_mean']:.4f} "
                f"(max over seeds {b['final_weight_max']:.4f})")
        if "accuracy_drop_vs_learned" in b:
            text += f"; student accuracy vs the same run without it: {-100 * b['accuracy_drop_vs_learned']:+.2f} points"
        lines.append(text + ".")
    return "\n".join(lines) + "\n"


# --- causal language models -----------------------------------------------------------------------

def valid_rows(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The rows an ablation of ``cfg`` can run (all of them by default): the classifier rows, the causal-LM
    rows, or for a language model on plain text (no prompts) the two without responses or POCL."""
    from distill_ray.evaluation.scoring import is_instruction_data

    if cfg.data.task != "causal_lm":
        return ROWS
    return LM_ROWS if is_instruction_data(cfg) else ("scratch", "token_kd")


def check_rows(rows: Sequence[str], cfg: ExperimentConfig) -> None:
    """ValueError naming the rows ``cfg``'s task has no use for and the rows it has; ConfigError (the key
    and why) for a row whose variant of ``cfg`` is not valid."""
    valid = valid_rows(cfg)
    bad = [r for r in rows if r not in valid]
    if not bad:
        if cfg.data.task == "causal_lm":  # each row's config checked now, not after the caches are built
            for row in rows:
                _lm_variant(cfg, "mixed" if "seq_kd" in row else "off", row.endswith("+pocl"))
        return
    causal = cfg.data.task == "causal_lm"
    other = [r for r in bad if r in (ROWS if causal else LM_ROWS) and r not in valid]
    why = ""
    if other:
        why = f"; {', '.join(other)} {'is a row' if len(other) == 1 else 'are rows'} of the " \
              f"{'classifier' if causal else 'causal language model'} table"
    if causal and any(r in LM_ROWS for r in bad):
        why += ("; sequence-level KD and POCL rows need instruction data (data.format=python_functions, or "
                "data.prompt_field / data.messages_field)")
    raise ValueError(f"unknown ablation rows {bad} for data.task={cfg.data.task}{why}; choose from: {', '.join(valid)}")


def _lm_variant(cfg: ExperimentConfig, mode: str, pocl: bool) -> ExperimentConfig:
    """``cfg`` with ``sequence_kd.mode`` = ``mode`` and, with ``pocl``, the config's multi-stage
    curriculum ranked by ``reference_rouge_loss`` alone (POCL for language models), else no curriculum;
    validated as a YAML of it would be."""
    out = dataclasses.replace(cfg, sequence_kd=dataclasses.replace(cfg.sequence_kd, mode=mode))
    if pocl:
        out = dataclasses.replace(out, curriculum=dataclasses.replace(out.curriculum, scheduler="multi_stage",
                                                                      measurers=(POCL_MEASURER,)))
    else:
        out = _no_curriculum(out)
    return config_from_dict(config_to_dict(out))


def lm_row_setup(row: str, cfg: ExperimentConfig, seed: int, counts: dict[str, int]) -> tuple[ExperimentConfig, str, bool]:
    """(config, the cache it reads: ``references`` or ``responses``, use_teachers) of one causal-LM row at
    one seed. ``counts``: train rows by source, ``reference`` and (for rows that read the responses)
    ``teacher``. Every row gets at least the token_kd row's optimizer steps."""
    from distill_ray.kd.objectives import planned_steps
    from distill_ray.train.inputs import baseline_config, epochs_for_steps, with_epochs

    base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, baseline=False),
                               blend=dataclasses.replace(cfg.blend, kind="learned_global"))
    token_kd = _lm_variant(base, "off", pocl=False)
    references = counts["reference"]
    steps = planned_steps(token_kd, references, cfg.train.num_workers)
    if row == "scratch":
        return baseline_config(token_kd, references, references), "references", False
    if row == "token_kd":
        return token_kd, "references", True
    if row == "seq_kd":  # the teachers' responses alone, and no token-level KD: alpha 0 leaves the task loss
        out = _lm_variant(dataclasses.replace(base, loss=dataclasses.replace(base.loss, alpha=0.0)), "teacher", False)
        return with_epochs(out, epochs_for_steps(out, counts["teacher"], steps)), "responses", True
    if row in ("token+seq_kd", "token_kd+pocl", "token+seq_kd+pocl"):
        pocl, mixed = row.endswith("+pocl"), row.startswith("token+seq_kd")
        out = _lm_variant(base, "mixed" if mixed else "off", pocl)
        rows = references + counts["teacher"] if mixed else references
        epochs = epochs_for_steps(out, rows, steps)
        # A curriculum keeps its own validation rhythm (as the classifier rows do); the others validate as often as token_kd.
        out = dataclasses.replace(out, train=dataclasses.replace(out.train, epochs=epochs)) if pocl \
            else with_epochs(out, epochs)
        return out, "responses" if mixed else "references", True
    raise ValueError(f"unknown causal-LM ablation row {row!r}; choose from: {', '.join(LM_ROWS)}")


@dataclass(frozen=True)
class LMPrepared:
    """What a causal-LM ablation's rows share: the data's facts, teacher directories, the caches."""

    cfg: ExperimentConfig
    info: Any  # sources.DataInfo
    dirs: dict
    caches: dict[str, Any]
    """``references`` (sequence_kd off) and/or ``responses`` (the teachers' responses joined), as rows need."""
    counts: dict[str, int]
    """Train rows by source: ``reference`` and, with the responses' cache, ``teacher``."""
    timings: dict[str, float]


def prepare_lm(cfg: ExperimentConfig, rows: Sequence[str]) -> LMPrepared:
    """Teachers (trained once, reused) and the caches the rows read, each the one ``distill-ray run``
    builds for a config of that mode; one with a POCL row gets the reference model's ranking."""
    from distill_ray.pipeline import build_cache, load_data, prepare_teachers
    from distill_ray.cache.responses import rows_of_source
    from distill_ray.lm.sequence_kd import TEACHER

    timings = {}
    start = time.perf_counter()
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    timings["teachers"] = round(time.perf_counter() - start, 2)
    readers = {"references": [r for r in rows if r in ("token_kd", "token_kd+pocl")],
               "responses": [r for r in rows if "seq_kd" in r]}
    if "scratch" in rows and not readers["responses"]:  # scratch reads the references of either cache
        readers["references"].append("scratch")
    caches = {}
    for kind, mine in readers.items():
        if mine:
            start = time.perf_counter()
            variant = _cache_variant(cfg, kind, any(r.endswith("+pocl") for r in mine), data, dirs)
            caches[kind] = build_cache(variant, data, dirs)
            timings[f"cache_{kind}"] = round(time.perf_counter() - start, 2)
    counts = {"reference": data.info.counts["train"]}
    if "responses" in caches:
        counts["teacher"] = rows_of_source(caches["responses"].files("train"), TEACHER)
    return LMPrepared(cfg, data.info, dirs, caches, counts, timings)


def _cache_variant(cfg: ExperimentConfig, kind: str, pocl: bool, data, dirs: dict) -> ExperimentConfig:
    """The config a cache of ``kind`` is built from: ``sequence_kd.mode`` off (references) or mixed
    (responses), with POCL's ranking when a POCL row reads it. Without one, a cache of the same inputs
    that already carries the ranking (an earlier ablation with POCL rows) is reused: its rows and
    targets are the same, so an ablation of fewer rows after a full one builds nothing."""
    from distill_ray.cache.build import cache_spec
    from distill_ray.cache.responses import with_responses
    from distill_ray.evaluation.scoring import is_instruction_data
    from distill_ray.cache.soft_targets import cache_dir_for

    mode = "off" if kind == "references" else "mixed"
    plain = _lm_variant(cfg, mode, pocl)
    if pocl or not is_instruction_data(cfg):
        return plain
    richer = _lm_variant(cfg, mode, True)
    spec = cache_spec(richer, with_responses(richer, data, dirs).info, dirs)
    return richer if cache_dir_for(richer.cache.dir, spec).is_dir() else plain


def run_lm_row(row: str, prep: LMPrepared, seed: int, storage: Path) -> dict[str, Any]:
    """Train one causal-LM row at one seed on Ray Train; the test figures of its student."""
    from distill_ray.models import num_params
    from distill_ray.kd.objectives import planned_steps
    from distill_ray.train.inputs import training_inputs
    from distill_ray.evaluation.scoring import language_model_scores
    from distill_ray.train.loop import load_trained_student, run_training

    cfg, kind, use_teachers = lm_row_setup(row, prep.cfg, seed, prep.counts)
    cache = prep.caches.get(kind) or prep.caches["responses"]  # only scratch may read the other one
    inputs = training_inputs(cfg, cache, prep.info, use_teachers=use_teachers)
    name = _run_name(row, cfg, seed)
    start = time.perf_counter()
    result = run_training(cfg, inputs, str(storage), name)
    seconds = time.perf_counter() - start
    student, history, _ = load_trained_student(cfg, inputs, result.checkpoint)
    scores = language_model_scores(cfg, cache, {"student": student})["student"]
    epochs = [r for r in history if r.get("kind") == "epoch"]
    best = next((r for r in epochs if r["epoch"] == epochs[-1].get("best_epoch")), epochs[-1]) if epochs else {}
    return {"row": row, "seed": seed, "run_name": name, "test_perplexity": scores["perplexity"],
            "test_token_accuracy": scores["accuracy"], "rouge_l": scores.get("rouge_l"), "parses": scores.get("parses"),
            "val_perplexity": best.get("val_perplexity"), "best_epoch": best.get("epoch"), "epochs": cfg.train.epochs,
            "train_rows": inputs.train_rows, "steps": planned_steps(cfg, inputs.train_rows, cfg.train.num_workers),
            "teacher_weights": final_teacher_weights(history) if use_teachers else {},
            "train_seconds": round(seconds, 2), "student_params": num_params(student)}


# The row whose learned weights the blend is scored at: token-level KD on the references first; seq_kd
# (alpha 0) last, its weights are fit to a teacher's own text.
BLEND_WEIGHTS_FROM = ("token_kd", "token+seq_kd", "token_kd+pocl", "token+seq_kd+pocl", "seq_kd")


def lm_reference_scores(prep: LMPrepared, runs: list[dict]) -> dict[str, Any]:
    """The teachers' test figures and their blend's, at the mean final learned weights of the first row
    of ``BLEND_WEIGHTS_FROM`` that ran (no blend when none did). Teachers with a tokenizer of their own
    read other tokens and are left out (as in ``distill-ray run``'s table)."""
    from distill_ray.lm.generation import BlendedLM
    from distill_ray.models import load_model, num_params
    from distill_ray.evaluation.scoring import language_model_scores

    cfg = prep.cfg
    same = [t.name for t in cfg.teachers if t.tokenizer is None]
    models = {name: load_model(prep.dirs[name])[0].eval() for name in same}
    source = next((row for row in BLEND_WEIGHTS_FROM if any(r["row"] == row and r["teacher_weights"] for r in runs)),
                  None)
    weights = {}
    if source is not None and len(same) == len(cfg.teachers):
        mine = [r["teacher_weights"] for r in runs if r["row"] == source]
        weights = {name: _mean_std([w[name] for w in mine])[0] for name in same}
        models["blend"] = BlendedLM([models[n] for n in same], [weights[n] for n in same])
    scores = language_model_scores(cfg, next(iter(prep.caches.values())), models)
    teachers = {name: {**scores[name], "params": num_params(models[name])} for name in same}
    blend = {**scores["blend"], "weights": weights, "weights_from": source} if "blend" in scores else None
    return {"teachers": teachers, "blend": blend}


LM_METRICS = {"perplexity": "test_perplexity", "rouge_l": "rouge_l", "parses": "parses"}


def summarize_lm(runs: list[dict], rows: Sequence[str], reference: dict[str, Any]) -> dict[str, Any]:
    """The causal-LM table: per row, mean ± std over seeds of test perplexity, ROUGE-L and parses (None
    where a run has no such figure), the share of scratch's perplexity gap to the best teacher closed,
    steps and rows trained; plus the teachers' and the blend's figures (``lm_reference_scores``)."""
    teachers = reference["teachers"]
    best = min(teachers, key=lambda n: teachers[n]["perplexity"]) if teachers else None
    table: dict[str, Any] = {}
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        entry: dict[str, Any] = {"description": LM_DESCRIPTIONS[row], "n": len(mine)}
        for metric, key in LM_METRICS.items():
            values = [r.get(key) for r in mine]
            if mine and all(v is not None for v in values):
                mean, std = _mean_std(values)
                entry[metric] = {"mean": mean, "std": std, "per_seed": {r["seed"]: r[key] for r in mine}}
            else:
                entry[metric] = None
        first = mine[0] if mine else {}
        entry.update({key: first.get(key) for key in ("epochs", "train_rows", "steps", "student_params")})
        entry["teacher_weights"] = {name: _mean_std([r["teacher_weights"][name] for r in mine])[0]
                                    for name in first.get("teacher_weights", {})}
        entry["train_seconds_mean"] = _mean_std([r["train_seconds"] for r in mine])[0] if mine else None
        table[row] = entry
    scratch = (table.get("scratch") or {}).get("perplexity")
    for entry in table.values():
        entry["gap_recovered"] = gap_recovered(
            entry["perplexity"]["mean"] if entry["perplexity"] else None, scratch["mean"] if scratch else None,
            teachers[best]["perplexity"] if best else None, lower_is_better=True)
    return {"task": "causal_lm", "rows": table, "teachers": teachers, "blend": reference["blend"],
            "best_teacher": {"name": best, "test_perplexity": teachers[best]["perplexity"]} if best else None}


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _spread(entry: dict | None, digits: int) -> str:
    return "-" if entry is None else f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def lm_ablation_markdown(result: dict[str, Any]) -> str:
    from distill_ray.evaluation.scoring import GENERATION_ROWS

    m = result["machine"]
    lines = [f"# Ablation: {result['config_name']} (causal language model)", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu_cores']} CPU cores, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
             f"ray {m['ray']}. Seeds: {', '.join(map(str, result['seeds']))} (train.seed). "
             f"Test split: {result['num_test']} references (perplexity); ROUGE-L and parses of greedy responses to "
             f"the first {GENERATION_ROWS} test prompts. Student: {result['student']}. "
             f"Wall time: {result['wall_seconds'] / 60:.1f} min.", "",
             "Teachers and their blend (scored once; they do not depend on the student's seed):", "",
             "| model | test perplexity | ROUGE-L | parses | params |", "|---|---:|---:|---:|---:|"]
    for name, r in result["teachers"].items():
        lines.append(f"| {name} | {r['perplexity']:.2f} | {_figure(r.get('rouge_l'), 4)} | "
                     f"{_figure(r.get('parses'), 4)} | {r['params']:,} |")
    blend = result.get("blend")
    if blend:
        weights = ", ".join(f"{n} {w:.3f}" for n, w in blend["weights"].items())
        lines.append(f"| blend ({weights}; mean final weights of {blend['weights_from']}) | {blend['perplexity']:.2f} | "
                     f"{_figure(blend.get('rouge_l'), 4)} | {_figure(blend.get('parses'), 4)} | - |")
    lines += ["", "| row | setup | epochs | train rows | steps | test perplexity (mean ± std) | per seed | "
                  "ROUGE-L (mean ± std) | parses (mean ± std) | gap recovered (perplexity) | final teacher weights |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for row, e in result["rows"].items():
        per_seed = ", ".join(f"{v:.2f}" for v in e["perplexity"]["per_seed"].values()) if e["perplexity"] else "-"
        weights = ", ".join(f"{n} {w:.3f}" for n, w in e["teacher_weights"].items()) or "-"
        lines.append(f"| {row} | {e['description']} | {e['epochs']} | {e['train_rows']:,} | {e['steps']} | "
                     f"{_spread(e['perplexity'], 2)} | {per_seed} | {_spread(e['rouge_l'], 4)} | "
                     f"{_spread(e['parses'], 4)} | {_pct(e['gap_recovered'])} | {weights} |")
    lines += ["", "Gap recovered = (scratch − row) / (scratch − best teacher), on mean test perplexity"
                  + (f" (best teacher: {result['best_teacher']['name']})." if result.get("best_teacher") else ".")]
    if all(e["parses"] is None for e in result["rows"].values()):
        lines.append("Parses: none of the references parses once decoded (a tokenizer that does not round-trip "
                     "whitespace, like WordPiece), or the data is not code; the code check needs a byte-level tokenizer.")
    return "\n".join(lines) + "\n"


def _run_lm_ablation(cfg: ExperimentConfig, seeds: int, out_dir: Path, rows: Sequence[str], command: str | None,
                     wall: float) -> dict[str, Any]:
    prep = prepare_lm(cfg, rows)
    print(f"ablation: {prep.counts['reference']:,} reference train rows"
          + (f", {prep.counts['teacher']:,} teacher responses" if "teacher" in prep.counts else "")
          + f"; caches: {', '.join(prep.caches)}", flush=True)
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    runs_file = out_dir / "runs.json"
    # A run finished and scored before (same row, seed and config: the same run name) is not redone.
    earlier = {r.get("run_name"): r for r in json.loads(runs_file.read_text())} if runs_file.is_file() else {}
    runs, total, done = [], len(rows) * len(seed_list), 0
    for row in rows:
        for seed in seed_list:
            done += 1
            name = _run_name(row, lm_row_setup(row, prep.cfg, seed, prep.counts)[0], seed)
            reused = name in earlier
            run = earlier[name] if reused else run_lm_row(row, prep, seed, out_dir / "ray_results")
            runs.append(run)
            rouge = f", ROUGE-L {run['rouge_l']:.4f}" if run.get("rouge_l") is not None else ""
            took = "reused from runs.json" if reused else f"{run['train_seconds']:.0f}s"
            print(f"ablation [{done}/{total}] {row:<18} seed {seed}: test perplexity {run['test_perplexity']:.2f}{rouge} "
                  f"({took})", flush=True)
            # Earlier runs of rows or seeds not asked for this time stay listed, for a later run that asks.
            kept = [r for n, r in earlier.items() if n not in {run["run_name"] for run in runs}]
            runs_file.write_text(json.dumps(runs + kept, indent=2))
    start = time.perf_counter()
    reference = lm_reference_scores(prep, runs)
    prep.timings["score_teachers_and_blend"] = round(time.perf_counter() - start, 2)
    result = summarize_lm(runs, rows, reference)
    result["counts"] = prep.counts
    return _finish(result, cfg, prep, next(iter(prep.caches.values())).rows("test"), seed_list, runs, command, wall,
                   out_dir, lm_ablation_markdown)


def _finish(result: dict[str, Any], cfg: ExperimentConfig, prep, num_test: int, seed_list: list[int], runs: list[dict],
            command: str | None, wall: float, out_dir: Path, markdown) -> dict[str, Any]:
    """Both tables' common tail: what was run, where and how long, then ablation.json and ablation.md."""
    from distill_ray.models import build_model, num_params

    student = build_model(cfg.student.arch, prep.info.input_shape, prep.info.num_classes, cfg.student.options)
    result.update({
        "config_name": cfg.name, "seeds": seed_list, "num_test": num_test,
        "student": f"{cfg.student.arch} {dict(cfg.student.options)}, {num_params(student):,} params",
        "command": command or " ".join(shlex.quote(a) for a in sys.argv), "machine": machine_info(),
        "wall_seconds": round(time.perf_counter() - wall, 1), "timings": prep.timings, "runs": runs,
    })
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "ablation.md").write_text(markdown(result))
    print(f"\n{markdown(result)}\nablation: wrote {out_dir / 'ablation.md'} and {out_dir / 'ablation.json'}")
    return result


def run_ablation(cfg: ExperimentConfig, seeds: int, out_dir: str | Path, rows: Sequence[str] | None = None,
                 command: str | None = None) -> dict[str, Any]:
    """Train every row (default: all rows of the config's task, ``valid_rows``) at ``seeds`` seeds, write
    ``ablation.json`` and ``ablation.md`` into ``out_dir``.

    Needs a connected Ray (``pipeline.connect_ray``). Returns the table (what ablation.json holds).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    rows = tuple(rows) if rows else valid_rows(cfg)
    check_rows(rows, cfg)
    if cfg.train.mode != "cached":
        raise ValueError("the ablation reuses cached soft targets; use train.mode=cached")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    if cfg.data.task == "causal_lm":
        return _run_lm_ablation(cfg, seeds, out_dir, rows, command, wall)
    prep = prepare(cfg)
    print(f"ablation: best teacher by validation accuracy: {prep.best_teacher} "
          f"(val {prep.teacher_val[prep.best_teacher]:.4f}, test {prep.teacher_test[prep.best_teacher]:.4f})",
          flush=True)
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    runs, total, done = [], len(rows) * len(seed_list), 0
    for row in rows:
        for seed in seed_list:
            done += 1
            run = run_row(row, prep, seed, out_dir / "ray_results")
            runs.append(run)
            weights = " ".join(f"{n}={w:.3f}" for n, w in run["teacher_weights"].items())
            print(f"ablation [{done}/{total}] {row:<24} seed {seed}: test acc {run['test_accuracy']:.4f} "
                  f"({run['train_seconds']:.0f}s) {weights}", flush=True)
            (out_dir / "runs.json").write_text(json.dumps(runs, indent=2))
    return _finish(summarize(runs, prep, rows), cfg, prep, prep.cache.rows("test"), seed_list, runs, command, wall,
                   out_dir, ablation_markdown)


def ablation_main(config_path: str | Path, overrides: Sequence[str] = (), seeds: int = 3, address: str | None = None,
                  out_dir: str | Path | None = None, rows: Sequence[str] | None = None,
                  command: str | None = None) -> dict[str, Any]:
    """CLI entry: load and validate the config, join/start Ray, run the ablation.

    ``out_dir`` defaults to ``<run_dir>/<name>-ablation``.
    """
    from distill_ray.pipeline import connect_ray

    cfg = load_config(config_path, overrides)
    rows = tuple(rows) if rows else valid_rows(cfg)
    check_rows(rows, cfg)  # before Ray starts
    connect_ray(address)
    out = Path(out_dir) if out_dir else Path(cfg.run_dir).expanduser() / f"{cfg.name}-ablation"
    return run_ablation(cfg, seeds, out, rows=rows, command=command)
