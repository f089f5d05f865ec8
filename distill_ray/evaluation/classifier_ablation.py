"""The classifier's rows of the ablation table (``ablation`` runs them over seeds and writes the table).

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
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distill_ray.config import ExperimentConfig, TeacherConfig
from distill_ray.evaluation.ablation import AblationTable, best_epoch, markdown_header, mean_std, mean_weights, \
    percent, prepare_teachers_timed, run_name, train_row, weights_text
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
    from distill_ray.pipeline import build_cache
    from distill_ray.evaluation.scoring import classifier_outputs

    data, dirs, timings = prepare_teachers_timed(cfg)
    start = time.perf_counter()
    cache = build_cache(cfg, data, dirs)
    timings["cache"] = round(time.perf_counter() - start, 2)
    scores = {}
    for split in ("val", "test"):
        teachers, _, y = classifier_outputs(cfg, cache, split, {})
        scores[split] = {t.name: accuracy(teachers[k], y) for k, t in enumerate(cfg.teachers)}
    return Prepared(cfg, data.info, dirs, cache, scores["val"], scores["test"], timings)



def _with_scheduler(cfg: ExperimentConfig, scheduler: str, rows: int) -> ExperimentConfig:
    """The curriculum row, with the epochs that give it the no-curriculum row's optimizer steps."""
    from distill_ray.train.inputs import epochs_for_steps, without_curriculum
    from distill_ray.kd.objectives import planned_steps

    if scheduler == "multi_stage":  # the config's own POCL settings, temperature stages included
        out = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, scheduler="multi_stage"))
    else:
        base = without_curriculum(cfg)
        out = dataclasses.replace(base, curriculum=dataclasses.replace(base.curriculum, scheduler=scheduler))
    steps = planned_steps(without_curriculum(cfg), rows, cfg.train.num_workers)
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
    from distill_ray.train.inputs import baseline_config, epochs_for_steps, with_epochs, without_curriculum
    from distill_ray.kd.objectives import planned_steps

    base = dataclasses.replace(prep.cfg, train=dataclasses.replace(prep.cfg.train, seed=seed, baseline=False))
    learned = dataclasses.replace(base, blend=dataclasses.replace(base.blend, kind="learned_global"))
    rows, labeled = prep.info.counts["train"], prep.info.labeled["train"]
    if row.endswith("+wide"):
        cfg, stage, use_teachers, labeled_only = row_setup(row.removesuffix("+wide"), prep, seed)
        return wider(cfg), stage, use_teachers, labeled_only
    if row == "scratch":
        return baseline_config(without_curriculum(learned), rows, labeled), None, False, True
    if row == "kd_labeled_only":
        cfg = without_curriculum(learned)
        epochs = epochs_for_steps(cfg, labeled, planned_steps(cfg, rows, cfg.train.num_workers))
        return with_epochs(cfg, epochs), None, True, True
    if row == "kd_best_teacher":
        k = prep.cfg.teacher_names().index(prep.best_teacher)
        cfg = without_curriculum(dataclasses.replace(base, teachers=(base.teachers[k],),
                                                 blend=dataclasses.replace(base.blend, kind="uniform")))
        return cfg, None, True, False
    if row in ("uniform", "confidence"):
        return without_curriculum(dataclasses.replace(base, blend=dataclasses.replace(base.blend, kind=row))), None, True, False
    if row == "learned":
        return without_curriculum(learned), None, True, False
    if row.startswith("learned+") and row.split("+", 1)[1] in ("multi_stage", "linear_ramp", "confidence"):
        return _with_scheduler(learned, row.split("+", 1)[1], rows), None, True, False
    if row == "learned+broken_teacher":
        broken = TeacherConfig(name=BROKEN, source="recipe", recipe="mlp")  # never built: logits are synthetic
        cfg = without_curriculum(dataclasses.replace(learned, teachers=(*learned.teachers, broken)))
        stage = (add_broken_teacher, {"name": BROKEN, "real": list(prep.cfg.teacher_names()), "topk": cfg.loss.topk,
                                      "seed": 10_007 * (seed + 1)})
        return cfg, stage, True, False
    raise ValueError(f"unknown ablation row {row!r}; choose from: {', '.join(ROWS)}")



def run_row(row: str, prep: Prepared, seed: int, storage: Path) -> dict[str, Any]:
    """Train one row at one seed on Ray Train; test accuracy of the result and its final weights."""
    from distill_ray.evaluation.metrics import classifier_scores
    from distill_ray.models import num_params
    from distill_ray.train.inputs import training_inputs
    from distill_ray.evaluation.scoring import classifier_outputs

    cfg, stage, use_teachers, labeled_only = row_setup(row, prep, seed)
    inputs = training_inputs(cfg, prep.cache, prep.info, use_teachers=use_teachers, stage=stage,
                             labeled_only=labeled_only)
    student, history, seconds = train_row(cfg, inputs, storage, run_name(row, cfg, seed))
    _, outputs, y = classifier_outputs(prep.cfg, prep.cache, "test", {"student": student})
    scores = classifier_scores(outputs["student"].softmax(-1), y)
    weights = final_teacher_weights(history) if use_teachers else {}
    best = best_epoch(history)
    return {"row": row, "seed": seed, "test_accuracy": scores["accuracy"], "test_ece": scores["ece"],
            "val_accuracy": best.get("val_accuracy"), "best_epoch": best.get("epoch"), "epochs": cfg.train.epochs,
            "teacher_weights": weights, "train_seconds": round(seconds, 2), "student_params": num_params(student)}


# --- the table ------------------------------------------------------------------------------------

def summarize(runs: list[dict], prep: Prepared, rows: Sequence[str]) -> dict[str, Any]:
    best = prep.best_teacher
    best_acc = prep.teacher_test[best]
    table: dict[str, Any] = {}
    for row in rows:
        row_runs = [r for r in runs if r["row"] == row]
        mean, std = mean_std([r["test_accuracy"] for r in row_runs])
        table[row] = {"description": DESCRIPTIONS[row], "mean": mean, "std": std, "n": len(row_runs),
                      "per_seed": {r["seed"]: r["test_accuracy"] for r in row_runs}, "teacher_weights": mean_weights(row_runs),
                      "student_params": row_runs[0].get("student_params") if row_runs else None,
                      "train_seconds_mean": mean_std([r["train_seconds"] for r in row_runs])[0]}
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
        mean, std = mean_std(diffs) if diffs else (math.nan, math.nan)
        out["learned_vs_uniform"] = {"mean_diff": mean, "std_diff": std, "per_seed_diff": diffs,
                                     "learned_ge_uniform": bool(table["learned"]["mean"] >= table["uniform"]["mean"])}
    if "learned+broken_teacher" in table:
        entry = table["learned+broken_teacher"]
        weights = [r["teacher_weights"].get(BROKEN) for r in runs if r["row"] == "learned+broken_teacher"]
        broken = {"final_weight_mean": mean_std(weights)[0], "final_weight_max": max(weights),
                  "per_seed_weight": weights}
        if "learned" in table:
            broken["accuracy_drop_vs_learned"] = table["learned"]["mean"] - entry["mean"]
        out["broken_teacher"] = broken
    return out



def ablation_markdown(result: dict[str, Any]) -> str:
    best = result["best_teacher"]
    lines = [*markdown_header(result, result["config_name"],
                              f"{result['num_test']} samples; student: {result['student']}."),
             "Teachers (test accuracy): " + ", ".join(f"{n} {v['test_accuracy']:.4f}"
                                                     for n, v in result["teachers"].items())
             + f". Best by validation accuracy: **{best['name']}** (test {best['test_accuracy']:.4f}).", "",
             "| row | setup | student params | test accuracy (mean ± std) | per seed | gap recovered | "
             "final teacher weights |",
             "|---|---|---:|---:|---|---:|---|"]
    for row, e in result["rows"].items():
        per_seed = ", ".join(f"{v:.4f}" for v in e["per_seed"].values())
        weights = weights_text(e["teacher_weights"])
        params = f"{e['student_params']:,}" if e.get("student_params") else "-"
        lines.append(f"| {row} | {e['description']} | {params} | {e['mean']:.4f} ± {e['std']:.4f} | {per_seed} | "
                     f"{percent(e['gap_recovered'])} | {weights} |")
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


def _announce(prep: Prepared) -> str:
    best = prep.best_teacher
    return (f"ablation: best teacher by validation accuracy: {best} "
            f"(val {prep.teacher_val[best]:.4f}, test {prep.teacher_test[best]:.4f})")


def _progress(run: dict[str, Any], reused: bool) -> str:
    weights = " ".join(f"{n}={w:.3f}" for n, w in run["teacher_weights"].items())
    return f"test acc {run['test_accuracy']:.4f} ({run['train_seconds']:.0f}s) {weights}"


TABLE = AblationTable(prepare=lambda cfg, rows: prepare(cfg), announce=_announce, run_row=run_row, progress=_progress,
                      row_width=24, tabulate=summarize, test_rows=lambda prep: prep.cache.rows("test"),
                      markdown=ablation_markdown)
"""The classifier table: every run is trained afresh (Ray Train resumes an interrupted run of the same name)."""
