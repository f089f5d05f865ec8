"""The quality table: which parts of the distillation recipe earn their keep, over seeds.

One skeleton runs both tables: the rows of the config's task (``classifier_ablation`` for a classifier,
``lm_ablation`` for a causal language model, each saying what its rows change), every row at every seed
(``train.seed, train.seed + 1, ...``) on Ray Train with a progress line each and ``runs.json`` rewritten
after every run, then each row's figures as mean ± std over seeds, and the table written as
``ablation.json`` and ``ablation.md`` with what was run, where and how long. A run is named by its row,
seed and a digest of its config, so a changed config never reuses a stale run.
"""

from __future__ import annotations

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
from typing import Any, Callable, Sequence

import numpy as np
import torch

from distill_ray.config import ExperimentConfig, config_to_dict, load_config


@dataclass(frozen=True)
class AblationTable:
    """What one task's table plugs into the skeleton (``classifier_ablation.TABLE``, ``lm_ablation.TABLE``)."""

    prepare: Callable[[ExperimentConfig, Sequence[str]], Any]
    """Teachers and caches, once for every row: (config, rows) -> what the rows share."""
    announce: Callable[[Any], str]
    """The line printed once prepared."""
    run_row: Callable[[str, Any, int, Path], dict[str, Any]]
    """(row, prepared, seed, Ray Train storage) -> the run's figures."""
    progress: Callable[[dict[str, Any], bool], str]
    """A run's figures (and whether it was reused) for its progress line."""
    row_width: int
    tabulate: Callable[[list[dict], Any, Sequence[str]], dict[str, Any]]
    """(runs, prepared, rows) -> the table (what ablation.json holds, less what ``write_table`` adds)."""
    test_rows: Callable[[Any], int]
    markdown: Callable[[dict[str, Any]], str]
    row_config: Callable[[str, Any, int], ExperimentConfig] | None = None
    """(row, prepared, seed) -> the row's config, for a table that reuses the runs in runs.json under
    the same run name; None: every run is trained."""


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
    table = _table_of(cfg)
    prep = table.prepare(cfg, rows)
    print(table.announce(prep), flush=True)
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    runs = run_rows_over_seeds(table, prep, rows, seed_list, out_dir)
    return write_table(table.tabulate(runs, prep, rows), cfg, prep, table.test_rows(prep), seed_list, runs, command,
                       wall, out_dir, table.markdown)


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


def _table_of(cfg: ExperimentConfig) -> AblationTable:
    if cfg.data.task == "causal_lm":
        from distill_ray.evaluation.lm_ablation import TABLE
    else:
        from distill_ray.evaluation.classifier_ablation import TABLE
    return TABLE


# --- which rows -----------------------------------------------------------------------------------

def valid_rows(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The rows an ablation of ``cfg`` can run (all of them by default): the classifier rows, the causal-LM
    rows, or for a language model on plain text (no prompts) the two without responses or POCL."""
    from distill_ray.evaluation.classifier_ablation import ROWS
    from distill_ray.evaluation.lm_ablation import LM_ROWS
    from distill_ray.evaluation.scoring import is_instruction_data

    if cfg.data.task != "causal_lm":
        return ROWS
    return LM_ROWS if is_instruction_data(cfg) else ("scratch", "token_kd")


def check_rows(rows: Sequence[str], cfg: ExperimentConfig) -> None:
    """ValueError naming the rows ``cfg``'s task has no use for and the rows it has; ConfigError (the key
    and why) for a row whose variant of ``cfg`` is not valid."""
    from distill_ray.evaluation.classifier_ablation import ROWS
    from distill_ray.evaluation.lm_ablation import LM_ROWS, lm_variant

    valid = valid_rows(cfg)
    bad = [r for r in rows if r not in valid]
    if not bad:
        if cfg.data.task == "causal_lm":  # each row's config checked now, not after the caches are built
            for row in rows:
                lm_variant(cfg, "mixed" if "seq_kd" in row else "off", row.endswith("+pocl"))
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


# --- running the rows -----------------------------------------------------------------------------

def prepare_teachers_timed(cfg: ExperimentConfig):
    """(data, teacher directories, timings so far): the teachers trained once (reused) for every row."""
    from distill_ray.pipeline import load_data, prepare_teachers

    start = time.perf_counter()
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data)
    return data, dirs, {"teachers": round(time.perf_counter() - start, 2)}


def run_name(row: str, cfg: ExperimentConfig, seed: int) -> str:
    """A run's name: its row, seed and a digest of its config."""
    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{row.replace('+', '_')}-seed{seed}-{digest}"


def train_row(cfg: ExperimentConfig, inputs, storage: Path, name: str):
    """One row's student trained on Ray Train and loaded back: (student, history, seconds of training)."""
    from distill_ray.train.loop import load_trained_student, run_training

    start = time.perf_counter()
    result = run_training(cfg, inputs, str(storage), name)
    seconds = time.perf_counter() - start
    student, history, _ = load_trained_student(cfg, inputs, result.checkpoint)
    return student, history, seconds


def best_epoch(history: list[dict]) -> dict[str, Any]:
    """The history's record of the best epoch (the last epoch's if none is named; {} without epochs)."""
    epochs = [r for r in history if r.get("kind") == "epoch"]
    return next((r for r in epochs if r["epoch"] == epochs[-1].get("best_epoch")), epochs[-1]) if epochs else {}


def run_rows_over_seeds(table: AblationTable, prep: Any, rows: Sequence[str], seed_list: list[int],
                        out_dir: Path) -> list[dict]:
    """Every row at every seed, in order, a progress line each, runs.json rewritten after each run. A
    table that reuses runs keeps runs.json's earlier runs of rows or seeds not asked for this time,
    for a later run that asks."""
    runs_file = out_dir / "runs.json"
    earlier = {r.get("run_name"): r for r in json.loads(runs_file.read_text())} \
        if table.row_config is not None and runs_file.is_file() else {}
    runs, total, done = [], len(rows) * len(seed_list), 0
    for row in rows:
        for seed in seed_list:
            done += 1
            name = run_name(row, table.row_config(row, prep, seed), seed) if table.row_config is not None else None
            reused = name in earlier
            run = earlier[name] if reused else table.run_row(row, prep, seed, out_dir / "ray_results")
            runs.append(run)
            print(f"ablation [{done}/{total}] {row:<{table.row_width}} seed {seed}: {table.progress(run, reused)}",
                  flush=True)
            kept = [r for n, r in earlier.items() if n not in {run["run_name"] for run in runs}]
            runs_file.write_text(json.dumps(runs + kept, indent=2))
    return runs


# --- the table ------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def seed_spread(runs: list[dict], key: str) -> dict[str, Any] | None:
    """``key``'s mean ± std over the runs' seeds and its value per seed; None where a run lacks it."""
    values = [r.get(key) for r in runs]
    if not runs or any(v is None for v in values):
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "per_seed": {r["seed"]: r[key] for r in runs}}


def mean_weights(runs: list[dict]) -> dict[str, float]:
    """Each teacher's final blend weight, averaged over the runs' seeds."""
    return {name: mean_std([r["teacher_weights"][name] for r in runs])[0]
            for name in (runs[0]["teacher_weights"] if runs else {})}


def machine_info() -> dict[str, Any]:
    import ray

    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads": torch.get_num_threads()}


def write_table(result: dict[str, Any], cfg: ExperimentConfig, prep, num_test: int, seed_list: list[int],
                runs: list[dict], command: str | None, wall: float, out_dir: Path,
                markdown: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Both tables' common tail: what was run, where and how long, then ablation.json and ablation.md."""
    from distill_ray.models import build_student, num_params

    student = build_student(cfg.student, prep.info.input_shape, prep.info.num_classes)
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


def markdown_header(result: dict[str, Any], title: str, test_split: str) -> list[str]:
    """The lines every table opens with: title, command, machine, seeds, ``test_split`` and wall time."""
    m = result["machine"]
    return [f"# Ablation: {title}", "",
            f"Command: `{result['command']}`", "",
            f"Machine: {m['cpu_cores']} CPU cores, {m['platform']}, Python {m['python']}, torch {m['torch']}, "
            f"ray {m['ray']}. Seeds: {', '.join(map(str, result['seeds']))} (train.seed). "
            f"Test split: {test_split} "
            f"Wall time: {result['wall_seconds'] / 60:.1f} min.", ""]


def weights_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{n} {w:.3f}" for n, w in weights.items()) or "-"


def percent(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
