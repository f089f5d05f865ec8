"""The causal language model's rows of the ablation table (``ablation`` runs them over seeds and writes
the table).

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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from distill_ray.config import ExperimentConfig, config_from_dict, config_to_dict
from distill_ray.evaluation.ablation import AblationTable, best_epoch, markdown_header, mean_std, mean_weights, \
    percent, prepare_teachers_timed, run_name, seed_spread, train_row, weights_text
from distill_ray.evaluation.report import final_teacher_weights, gap_recovered

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


def lm_variant(cfg: ExperimentConfig, mode: str, pocl: bool) -> ExperimentConfig:
    """``cfg`` with ``sequence_kd.mode`` = ``mode`` and, with ``pocl``, the config's multi-stage
    curriculum ranked by ``reference_rouge_loss`` alone (POCL for language models), else no curriculum;
    validated as a YAML of it would be."""
    from distill_ray.train.inputs import without_curriculum

    out = dataclasses.replace(cfg, sequence_kd=dataclasses.replace(cfg.sequence_kd, mode=mode))
    if pocl:
        out = dataclasses.replace(out, curriculum=dataclasses.replace(out.curriculum, scheduler="multi_stage",
                                                                      measurers=(POCL_MEASURER,)))
    else:
        out = without_curriculum(out)
    return config_from_dict(config_to_dict(out))


def lm_row_setup(row: str, cfg: ExperimentConfig, seed: int, counts: dict[str, int]) -> tuple[ExperimentConfig, str, bool]:
    """(config, the cache it reads: ``references`` or ``responses``, use_teachers) of one causal-LM row at
    one seed. ``counts``: train rows by source, ``reference`` and (for rows that read the responses)
    ``teacher``. Every row gets at least the token_kd row's optimizer steps."""
    from distill_ray.kd.objectives import planned_steps
    from distill_ray.train.inputs import baseline_config, epochs_for_steps, with_epochs

    base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, baseline=False),
                               blend=dataclasses.replace(cfg.blend, kind="learned_global"))
    token_kd = lm_variant(base, "off", pocl=False)
    references = counts["reference"]
    steps = planned_steps(token_kd, references, cfg.train.num_workers)
    if row == "scratch":
        return baseline_config(token_kd, references, references), "references", False
    if row == "token_kd":
        return token_kd, "references", True
    if row == "seq_kd":  # the teachers' responses alone, and no token-level KD: alpha 0 leaves the task loss
        out = lm_variant(dataclasses.replace(base, loss=dataclasses.replace(base.loss, alpha=0.0)), "teacher", False)
        return with_epochs(out, epochs_for_steps(out, counts["teacher"], steps)), "responses", True
    if row in ("token+seq_kd", "token_kd+pocl", "token+seq_kd+pocl"):
        pocl, mixed = row.endswith("+pocl"), row.startswith("token+seq_kd")
        out = lm_variant(base, "mixed" if mixed else "off", pocl)
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
    from distill_ray.pipeline import build_cache
    from distill_ray.cache.responses import rows_of_source
    from distill_ray.lm.cut import student_from_teacher
    from distill_ray.lm.sequence_kd import TEACHER

    data, dirs, timings = prepare_teachers_timed(cfg)
    cfg, _ = student_from_teacher(cfg, dirs, Path(cfg.run_dir) / "student_init" / cfg.name)  # every row starts from it
    readers = {"references": [r for r in rows if r in ("token_kd", "token_kd+pocl")],
               "responses": [r for r in rows if "seq_kd" in r]}
    if "scratch" in rows and not readers["responses"]:  # scratch reads the references of either cache
        readers["references"].append("scratch")
    caches = {}
    for kind, readers_of_kind in readers.items():
        if readers_of_kind:
            start = time.perf_counter()
            variant = _cache_variant(cfg, kind, any(r.endswith("+pocl") for r in readers_of_kind), data, dirs)
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
    plain = lm_variant(cfg, mode, pocl)
    if pocl or not is_instruction_data(cfg):
        return plain
    richer = lm_variant(cfg, mode, True)
    spec = cache_spec(richer, with_responses(richer, data, dirs).info, dirs)
    return richer if cache_dir_for(richer.cache.dir, spec).is_dir() else plain


def run_lm_row(row: str, prep: LMPrepared, seed: int, storage: Path) -> dict[str, Any]:
    """Train one causal-LM row at one seed on Ray Train; the test figures of its student."""
    from distill_ray.models import num_params
    from distill_ray.kd.objectives import planned_steps
    from distill_ray.train.inputs import training_inputs
    from distill_ray.evaluation.scoring import language_model_scores

    cfg, kind, use_teachers = lm_row_setup(row, prep.cfg, seed, prep.counts)
    cache = prep.caches.get(kind) or prep.caches["responses"]  # only scratch may read the other one
    inputs = training_inputs(cfg, cache, prep.info, use_teachers=use_teachers)
    name = run_name(row, cfg, seed)
    student, history, seconds = train_row(cfg, inputs, storage, name)
    scores = language_model_scores(cfg, cache, {"student": student})["student"]
    best = best_epoch(history)
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
        source_weights = [r["teacher_weights"] for r in runs if r["row"] == source]
        weights = {name: mean_std([w[name] for w in source_weights])[0] for name in same}
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
        row_runs = [r for r in runs if r["row"] == row]
        entry: dict[str, Any] = {"description": LM_DESCRIPTIONS[row], "n": len(row_runs),
                                 **{metric: seed_spread(row_runs, key) for metric, key in LM_METRICS.items()}}
        first = row_runs[0] if row_runs else {}
        entry.update({key: first.get(key) for key in ("epochs", "train_rows", "steps", "student_params")})
        entry["teacher_weights"] = mean_weights(row_runs)
        entry["train_seconds_mean"] = mean_std([r["train_seconds"] for r in row_runs])[0] if row_runs else None
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

    lines = [*markdown_header(result, f"{result['config_name']} (causal language model)",
                              f"{result['num_test']} references (perplexity); ROUGE-L and parses of greedy responses "
                              f"to the first {GENERATION_ROWS} test prompts. Student: {result['student']}."),
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
        weights = weights_text(e["teacher_weights"])
        lines.append(f"| {row} | {e['description']} | {e['epochs']} | {e['train_rows']:,} | {e['steps']} | "
                     f"{_spread(e['perplexity'], 2)} | {per_seed} | {_spread(e['rouge_l'], 4)} | "
                     f"{_spread(e['parses'], 4)} | {percent(e['gap_recovered'])} | {weights} |")
    lines += ["", "Gap recovered = (scratch − row) / (scratch − best teacher), on mean test perplexity"
                  + (f" (best teacher: {result['best_teacher']['name']})." if result.get("best_teacher") else ".")]
    if all(e["parses"] is None for e in result["rows"].values()):
        lines.append("Parses: none of the references parses once decoded (a tokenizer that does not round-trip "
                     "whitespace, like WordPiece), or the data is not code; the code check needs a byte-level tokenizer.")
    return "\n".join(lines) + "\n"


def _announce(prep: LMPrepared) -> str:
    return (f"ablation: {prep.counts['reference']:,} reference train rows"
            + (f", {prep.counts['teacher']:,} teacher responses" if "teacher" in prep.counts else "")
            + f"; caches: {', '.join(prep.caches)}")


def _progress(run: dict[str, Any], reused: bool) -> str:
    rouge = f", ROUGE-L {run['rouge_l']:.4f}" if run.get("rouge_l") is not None else ""
    took = "reused from runs.json" if reused else f"{run['train_seconds']:.0f}s"
    return f"test perplexity {run['test_perplexity']:.2f}{rouge} ({took})"


def _tabulate(runs: list[dict], prep: LMPrepared, rows: Sequence[str]) -> dict[str, Any]:
    """The teachers and their blend scored once (timed), then the table."""
    start = time.perf_counter()
    reference = lm_reference_scores(prep, runs)
    prep.timings["score_teachers_and_blend"] = round(time.perf_counter() - start, 2)
    result = summarize_lm(runs, rows, reference)
    result["counts"] = prep.counts
    return result


TABLE = AblationTable(prepare=prepare_lm, announce=_announce, run_row=run_lm_row, progress=_progress, row_width=18,
                      tabulate=_tabulate, test_rows=lambda prep: next(iter(prep.caches.values())).rows("test"),
                      markdown=lm_ablation_markdown,
                      row_config=lambda row, prep, seed: lm_row_setup(row, prep.cfg, seed, prep.counts)[0])
"""The causal-LM table: a run already in runs.json under the same run name is reused as it is."""
