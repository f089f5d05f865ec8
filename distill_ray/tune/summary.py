"""What a sweep leaves to read: the trial table, the metric-against-parameters plot and
``sweep_summary.md`` (with the evolved schedule of a PBT winner)."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

from distill_ray.config import ExperimentConfig
from distill_ray.extras import available, install_hint
from distill_ray.evaluation.report import pyplot
from distill_ray.tune.space import RANGE_KINDS, SearchSpace, plain_value

SUMMARY_FILE = "sweep_summary.md"


def trial_table(cfg: ExperimentConfig, space: SearchSpace, grid) -> list[dict]:
    """One row per trial: id, sampled values, last reported metric, epochs done, status; best first."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        rows.append({"trial_id": metrics.get("trial_id") or Path(result.path).name,
                     "params": {k: plain_value(config.get(k)) for k, _, _ in space.params},
                     "metric": metrics.get(cfg.tune.metric), "epochs": metrics.get("epoch"),
                     "checkpoint_path": metrics.get("checkpoint_path"),
                     "status": "error" if result.error else "done", "path": result.path,
                     "error": _error_line(result.error)})
    sign = -1 if cfg.tune.mode == "max" else 1
    scored = [r for r in rows if isinstance(r["metric"], (int, float)) and not math.isnan(r["metric"])]
    scored.sort(key=lambda r: sign * r["metric"])
    return scored + [r for r in rows if r not in scored]


def trials_text(cfg: ExperimentConfig, space: SearchSpace, rows: list[dict]) -> str:
    """The trial table as the terminal shows it at the end of a sweep: best first, columns aligned."""
    keys = [k for k, _, _ in space.params]
    head = ["rank", "trial", *keys, cfg.tune.metric, "epochs", "status"]
    body = [[str(i), str(r["trial_id"]), *(_fmt(r["params"][k]) for k in keys),
             _fmt(r["metric"]) if r["metric"] is not None else "-",
             str(r["epochs"] if r["epochs"] is not None else "-"), r["status"]] for i, r in enumerate(rows, 1)]
    widths = [max(len(row[c]) for row in [head, *body]) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *body])


def _error_line(error) -> str | None:
    """The line of a failed trial's error that says why (Tune wraps it in its own lines and a traceback)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1] if lines else repr(error))


def plot_sweep(rows: list[dict], space: SearchSpace, metric: str, path: Path) -> Path | None:
    """Metric against temperature and alpha (when searched; else the first two numeric params).
    None when there is nothing to plot, or without matplotlib (the plots extra: it prints how to get it)."""
    if not available("matplotlib"):
        print(f"sweep: metric plot not drawn (matplotlib is not installed: {install_hint('matplotlib')})")
        return None
    plt = pyplot()
    numeric = [k for k, kind, _ in space.params if kind in RANGE_KINDS
               or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in _args(space, k))]
    preferred = [k for k in ("loss.temperature", "loss.alpha") if k in numeric]
    keys = (preferred + [k for k in numeric if k not in preferred])[:2]
    done = [r for r in rows if r["metric"] is not None]
    if not keys or not done:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r["params"][key] for r in done]
        ax.scatter(xs, [r["metric"] for r in done], c=[r["epochs"] or 0 for r in done], cmap="viridis")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if dict((k, kind) for k, kind, _ in space.params)[key] == "loguniform":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial (colour: epochs run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _args(space: SearchSpace, key: str) -> tuple:
    return next(a for k, _, a in space.params if k == key)


def write_summary(cfg: ExperimentConfig, space: SearchSpace, rows: list[dict], sweep_dir: Path,
                  plot_path: Path | None, registered: str, schedule: list[dict] | None = None) -> Path:
    """``sweep_summary.md``: the trial table, best first; for PBT also the winner's evolved schedule."""
    import ray

    keys = [k for k, _, _ in space.params]
    lines = [f"# Sweep `{cfg.name}`", "",
             f"Space `{cfg.tune.space}` ({space.description.strip() or 'no description'}); "
             f"{len(rows)} trials, search {cfg.tune.search}, scheduler {cfg.tune.scheduler}, "
             f"metric `{cfg.tune.metric}` ({cfg.tune.mode}, last reported epoch).", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.system()}, Ray {ray.__version__}.", "",
             "| rank | trial | " + " | ".join(keys) + f" | {cfg.tune.metric} | epochs | status |",
             "|---" * (len(keys) + 5) + "|"]
    for i, r in enumerate(rows, 1):
        values = " | ".join(_fmt(r["params"][k]) for k in keys)
        lines.append(f"| {i} | {r['trial_id']} | {values} | {_fmt(r['metric'])} | {r['epochs']} | {r['status']} |")
    lines += ["", f"Winner: trial `{rows[0]['trial_id']}`, exported to `best/student/` and registered as "
                  f"`{registered}` (MLflow Model Registry).", ""]
    if schedule:
        lines += _schedule_lines(schedule, cfg.tune.metric)
    if plot_path:
        lines.append(f"![metric against searched values]({plot_path.name})")
    path = sweep_dir / SUMMARY_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _schedule_lines(schedule: list[dict], metric: str) -> list[str]:
    lines = ["## The winner's evolved schedule (PBT)", "",
             "Values in the table above are each trial's last ones. The winning student was trained under "
             "these, epoch by epoch; epochs before an exploit were trained by the trial it cloned.", "",
             f"| epoch | temperature | alpha | {metric} |", "|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {_fmt(r['temperature'])} | {_fmt(r['alpha'])} | {_fmt(r[metric])} |"
              for r in schedule]
    return lines + [""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
