"""The run report: four plots and ``report.md`` in RUN_DIR, from what the run already computed. No Ray.

``write_report`` takes the run's metrics, the student's (and baseline's) training history and the
per-model test rows, and writes:

* ``val_accuracy.png``: student and baseline validation accuracy per epoch;
* ``teacher_weights.png``: each teacher's blend weight over training steps;
* ``schedule.png``: temperature, alpha and open data fraction over steps, with curriculum stage
  boundaries as vertical lines;
* ``reliability.png``: reliability diagram of every model given, ECE in the legend;
* ``report.md``: the final table, the gap recovered, the verdict (``metrics['verdict']``, the lines the
  run printed last), each class's test recall and the balanced accuracy (long-tailed data, or a
  long-tail loss), the data (feature columns, columns left out and why), the plots, the timings.

matplotlib runs on the Agg backend (files only, no display).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distill_ray.data.rows import SPLITS
from distill_ray.evaluation.metrics import reliability_bins
from distill_ray.extras import available, install_hint, require

LONG_TAIL_RATIO = 10  # most / least frequent class's train rows from which the report gives each class's recall
MAX_CLASSES_SHOWN = 50  # above, per-class recall stays in metrics.json
PLOTS = ("val_accuracy.png", "teacher_weights.png", "schedule.png", "reliability.png")
VAL_ACCURACY_PLOT, TEACHER_WEIGHTS_PLOT, SCHEDULE_PLOT, RELIABILITY_PLOT = PLOTS
WEIGHT_PREFIX = "teacher_weight/"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on workers and servers)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _step_rows(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in history if r.get("kind") != "epoch" and "step" in r]


def _epoch_rows(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in history if r.get("kind") == "epoch"]


def final_teacher_weights(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Teacher name -> blend weight, from the last history row that logged weights ({} if none did)."""
    for row in reversed(history):
        found = {k[len(WEIGHT_PREFIX):]: float(v) for k, v in row.items() if k.startswith(WEIGHT_PREFIX)}
        if found:
            return found
    return {}


def gap_recovered(student: float | None, baseline: float | None, best_teacher: float | None,
                  lower_is_better: bool = False) -> float | None:
    """``(student - baseline) / (best_teacher - baseline)``: the share of the baseline-to-teacher gap the
    student closes, for a metric where higher is better or (``lower_is_better``, perplexity) lower is.
    None when undefined (no baseline, or the best teacher is not better than the baseline)."""
    if student is None or baseline is None or best_teacher is None:
        return None
    denominator = best_teacher - baseline
    if not (denominator < 0 if lower_is_better else denominator > 0):
        return None
    return (student - baseline) / denominator


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _save_axes(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """A one-axes plot's labels, title and grid, then saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_val_accuracy(path: Path, history: Sequence[Mapping], baseline_history: Sequence[Mapping] | None) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for label, rows, style in (("student", history, "-o"), ("baseline", baseline_history or [], "--s")):
        epochs = [r for r in _epoch_rows(rows) if "val_accuracy" in r]
        if epochs:
            ax.plot([r["epoch"] + 1 for r in epochs], [r["val_accuracy"] for r in epochs], style, label=label)
            drawn = True
    if drawn:
        ax.legend()
    else:
        _empty(ax, "no epoch rows in the history")
    return _save_axes(fig, ax, path, "epoch", "validation accuracy", "Validation accuracy per epoch")


def plot_teacher_weights(path: Path, history: Sequence[Mapping]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in _step_rows(history) if any(k.startswith(WEIGHT_PREFIX) for k in r)]
    names = sorted({k[len(WEIGHT_PREFIX):] for r in rows for k in r if k.startswith(WEIGHT_PREFIX)})
    for name in names:
        points = [(r["step"], r[WEIGHT_PREFIX + name]) for r in rows if WEIGHT_PREFIX + name in r]
        ax.plot(*zip(*points), label=name)
    if names:
        ax.legend()
        ax.set_ylim(-0.02, 1.02)
    else:
        _empty(ax, "no teacher weights logged")
    return _save_axes(fig, ax, path, "step", "blend weight", "Teacher weights over training")


def stage_boundaries(history: Sequence[Mapping]) -> list[int]:
    """Steps at which the curriculum stage changes (first logged step of each new stage)."""
    steps, last = [], None
    for r in _step_rows(history):
        stage = r.get("stage")
        if last is not None and stage != last:
            steps.append(r["step"])
        last = stage
    return steps


def plot_schedule(path: Path, history: Sequence[Mapping]) -> Path:
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    rows = _step_rows(history)
    steps = [r["step"] for r in rows]
    if rows and "temperature" in rows[0]:
        top.plot(steps, [r.get("temperature", math.nan) for r in rows], color="tab:red", label="temperature")
        top.legend(loc="best")
    else:
        _empty(top, "no schedule logged")
    for key, color in (("alpha", "tab:blue"), ("open_fraction", "tab:green")):
        if rows and key in rows[0]:
            bottom.plot(steps, [r.get(key, math.nan) for r in rows], color=color, label=key)
    if rows:
        bottom.legend(loc="best")
        bottom.set_ylim(-0.05, 1.05)
    for step in stage_boundaries(history):
        for ax in (top, bottom):
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("temperature")
    bottom.set_ylabel("alpha / open fraction")
    bottom.set_xlabel("step (dotted: curriculum stage boundaries)")
    top.set_title("Distillation schedule")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reliability(path: Path, reliability: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     n_bins: int = 15) -> dict[str, float]:
    """Reliability diagram (bin confidence vs bin accuracy) per model; returns each model's ECE."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    eces = {}
    for name, (probs, labels) in reliability.items():
        bins = reliability_bins(probs, labels, n_bins=n_bins)
        filled = bins["count"] > 0
        eces[name] = bins["ece"]
        style = "-o" if name in ("student", "baseline") else "-."
        ax.plot(bins["confidence"][filled], bins["accuracy"][filled], style, markersize=3,
                label=f"{name} (ECE {bins['ece']:.4f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    _save_axes(fig, ax, path, "confidence (mean max probability in bin)", "accuracy in bin",
               f"Reliability on the test split ({n_bins} bins)")
    return eces


def _fmt(value: Any, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def report_markdown(metrics: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]],
                    config_name: str | None = None, plots: bool = True) -> str:
    teachers = list(metrics.get("teachers", {}))
    weights = metrics.get("teacher_weights", {})
    lm = metrics.get("metric") == "perplexity"  # lower is better; rows carry token accuracy, no ECE
    pick = min if lm else max
    scored = [n for n in teachers if metrics["teachers"][n] is not None]  # None: a tokenizer of its own
    best_name = pick(scored, key=lambda n: metrics["teachers"][n]) if scored else None
    best = metrics["teachers"][best_name] if best_name else None
    student, baseline = metrics.get("student"), metrics.get("baseline")
    gap = gap_recovered(student, baseline, best, lower_is_better=lm)

    lines = [f"# Distillation report: {config_name or metrics.get('name', 'run')}", ""]
    if config_name:
        lines += [f"Config: `{config_name}`. "
                  f"Metric: {metrics.get('metric', 'accuracy')} on the {metrics.get('split', 'test')} split"
                  f" ({metrics.get('num_test', '?')} samples).", ""]
    first, second = ("perplexity", "next-token accuracy") if lm else ("test accuracy", "ECE")
    lines += [f"| model | {first} | {second} | params | latency ms (1 sample, CPU) | teacher weight |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in (*teachers, "blend", "baseline", "student"):
        if name not in rows:
            continue
        r = rows[name]
        a, b = (r.get("perplexity"), r.get("accuracy")) if lm else (r.get("accuracy"), r.get("ece"))
        lines.append(f"| {name} | {_fmt(a, '.4f')} | {_fmt(b, '.4f')} | "
                     f"{_fmt(r.get('params'), ',')} | {_fmt(r.get('latency_ms'), '.3f')} | "
                     f"{_fmt(weights.get(name), '.3f', '')} |")
    lines.append("")
    for name in teachers:
        r = rows.get(name, {})
        if "own_perplexity" in r:
            lines += [f"{name} reads its own tokenizer ({r['own_tokenizer']}): perplexity {r['own_perplexity']:.4f}, "
                      f"next-token accuracy {r['own_accuracy']:.4f} per token of its own, on the test split tokenized "
                      "its way (not comparable with the column).", ""]
    if gap is None:
        lines.append("Gap recovered: n/a (needs a baseline below the best teacher).")
    else:
        lines.append(f"Gap recovered: (student − baseline) / (best teacher − baseline) = "
                     f"({student:.4f} − {baseline:.4f}) / ({best:.4f} − {baseline:.4f}) = **{gap:.1%}** "
                     f"(best teacher: {best_name}).")
    best, epochs = metrics.get("best_epoch") or {}, metrics.get("epochs") or {}
    trained = [f"{name} at its best validation epoch, {best[name] + 1} of {epochs[name]}"
               for name in ("student", "baseline") if best.get(name) is not None and epochs.get(name)]
    if trained:
        lines.append("Reported: " + "; ".join(trained) + " (the baseline trains on the labeled rows for as many "
                     "optimizer steps as the student).")
    params = metrics.get("params", {})
    if params.get("student") and params.get("teachers"):
        smallest = min(params["teachers"].values())
        lines.append(f"Student size: {params['student']:,} params, {params['student'] / smallest:.3f}× "
                     f"the smallest teacher ({smallest:,}).")
    cut = metrics.get("student_init")
    if cut:  # student.init: where its weights started
        lines.append(f"Student cut from {cut['teacher']}: layers {cut['layers']} of its {cut['teacher_layers']}, "
                     f"{cut['params']:,} of its {cut['teacher_params']:,} params "
                     f"({cut['params'] / cut['teacher_params']:.3f}×), weights copied, then trained.")
    verdict = metrics.get("verdict")
    if verdict:  # the same lines the run printed last (distill_ray/evaluation/verdict.py)
        lines += ["", "## Verdict", "", *(f"- {line}" for line in verdict["lines"])]
    lines += _per_class_lines(metrics)
    lines += _data_lines(metrics.get("data") or {})
    lines += ["", "## Plots", ""]
    if not plots:
        lines += [f"Not drawn: matplotlib is not installed (`{install_hint('matplotlib')}`).", ""]
    else:
        lines += [f"![validation accuracy per epoch]({VAL_ACCURACY_PLOT})", "",
                  f"![teacher weights over steps]({TEACHER_WEIGHTS_PLOT})", "",
                  f"![temperature, alpha and open fraction over steps]({SCHEDULE_PLOT})", ""]
        if not lm:
            lines += [f"![reliability diagram]({RELIABILITY_PLOT})", ""]
    timings = metrics.get("timings") or {}
    if timings:
        lines += ["## Timings", "", "| phase | seconds |", "|---|---:|"]
        lines += [f"| {phase} | {seconds:.2f} |" for phase, seconds in timings.items()]
        lines += [f"| total | {sum(timings.values()):.2f} |", ""]
    return "\n".join(lines)


def is_long_tailed(counts: Sequence[int]) -> bool:
    """Whether the train rows per class are imbalanced: the most frequent class has at least
    ``LONG_TAIL_RATIO`` times the rows of the rarest (a class without rows counts as that)."""
    counts = [int(n) for n in counts]
    return len(counts) > 1 and max(counts) > 0 and max(counts) >= LONG_TAIL_RATIO * min(counts)


def _per_class_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The report's per-class section, for long-tailed data or a run that asks for a long-tail term:
    each class's train rows and every model's test recall, and their mean, the balanced accuracy."""
    recall = metrics.get("per_class_recall") or {}
    data, terms = metrics.get("data") or {}, metrics.get("long_tail") or {}
    counts = list(data.get("class_counts") or [])
    off = {"class_weights": "none", "class_temperature": 1.0, "logit_adjustment": 0.0, "imbalance": None}
    asked = {k: v for k, v in terms.items() if k in off and v != off[k]}
    if not recall or not (asked or is_long_tailed(counts)):
        return []
    models = [n for n in (*metrics.get("teachers", {}), "blend", "baseline", "student") if n in recall]
    balanced = metrics.get("balanced_accuracy") or {}
    names = list(data.get("class_names") or [])
    width = len(recall[models[0]])
    lines = ["", "## Per class", "",
             "Recall of each class on the test split (of its rows, the share predicted as it); the balanced "
             "accuracy is their mean, each class counted once however many rows it has."]
    if counts and min(counts) > 0:
        lines.append(f"Train rows per class (labeled): {max(counts):,} to {min(counts):,}, "
                     f"{max(counts) / min(counts):.1f}× apart.")
    if asked:
        lines.append("Long-tail settings: " + ", ".join(
            f"`{'data.long_tail.' if k == 'imbalance' else 'loss.'}{k}` = {v}" for k, v in asked.items())
            + (" (the baseline trains with the logit adjustment too)." if "logit_adjustment" in asked else "."))
    header = f"| class | train rows | {' | '.join(models)} |"
    lines += ["", header, "|---|---:|" + "---:|" * len(models)]
    if width <= MAX_CLASSES_SHOWN:
        for c in range(width):
            label = names[c] if c < len(names) else str(c)
            train = f"{counts[c]:,}" if c < len(counts) else "-"
            lines.append(f"| {label} | {train} | " + " | ".join(_fmt(recall[m][c], ".4f") for m in models) + " |")
    else:
        lines.append(f"| ({width} classes: each one's recall is in metrics.json, per_class_recall) | | "
                     + " | ".join("" for _ in models) + " |")
    lines.append("| **balanced accuracy** | | " + " | ".join(_fmt(balanced.get(m), ".4f") for m in models) + " |")
    return lines


def _data_lines(data: Mapping[str, Any]) -> list[str]:
    """The report's data section: where the rows came from, every feature column, and every column
    left out with why (the run's data line shortens the features; here they are all)."""
    if not data:
        return []
    rows, labeled = data.get("rows") or {}, (data.get("labeled") or {}).get("train")
    counts = " / ".join(f"{rows[s]:,} {s}" for s in SPLITS if s in rows)
    lines = ["", "## Data", "",
             f"{data.get('format')} ({data.get('kind')}) from `{data.get('source')}`: {counts} rows"
             + (f", {labeled:,} train rows labeled." if labeled is not None else ".")]
    if data.get("transfer_rows"):
        lines += ["", f"Transfer set: {data['transfer_rows']:,} train rows made from the train rows by "
                      f"`data.transfer` = {data.get('transfer')} (KD only; never in validation or test)."]
    features = data.get("feature_fields") or []
    if features:
        lines += ["", f"Feature columns ({len(features)}): {', '.join(f'`{f}`' for f in features)}."]
    left_out = data.get("left_out") or {}
    if left_out:
        lines += ["", "| column left out | why |", "|---|---|", *(f"| `{c}` | {why} |" for c, why in left_out.items())]
    return lines


def write_report(run_dir: str | Path, metrics: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                 baseline_history: Sequence[Mapping[str, Any]] | None, rows: Mapping[str, Mapping[str, Any]],
                 reliability: Mapping[str, tuple[np.ndarray, np.ndarray]], config_name: str | None = None) -> Path:
    """Write the four plots and ``report.md`` into ``run_dir``; returns the path of ``report.md``.
    Without the plots extra (matplotlib) the report keeps its numbers and says how to get the plots:
    a finished run is not lost over a figure.

    ``rows``: per model (each teacher, ``blend``, ``baseline``, ``student``) a dict with
    ``accuracy``, ``ece`` and, where known, ``params`` and ``latency_ms`` (as ``run_experiment``
    builds them). ``reliability``: per model, test-split probabilities [N, C] and labels [N].
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = available("matplotlib")
    if plots:
        plot_val_accuracy(run_dir / VAL_ACCURACY_PLOT, history, baseline_history)
        plot_teacher_weights(run_dir / TEACHER_WEIGHTS_PLOT, history)
        plot_schedule(run_dir / SCHEDULE_PLOT, history)
        if reliability:  # calibration of class probabilities: classification only
            plot_reliability(run_dir / RELIABILITY_PLOT, reliability)
    else:
        print(f"report: plots not drawn (matplotlib is not installed: {install_hint('matplotlib')})")
    path = run_dir / "report.md"
    path.write_text(report_markdown(metrics, rows, config_name, plots=plots))
    return path
