"""Self-distillation measured: the scratch baseline, the self_ema student and born-again generations, per seed.

    python jobs/self_distill_compare.py jobs/configs/self_distill.yaml --seeds 2 --generations 3

Per seed, two `distill-ray run`s of the config in fresh processes (train.seed = seed): as written (its
self_ema teacher; the run's baseline is the scratch student: the same student from the labels alone,
as many optimizer steps, its best validation epoch), and as born-again networks (the teacher's
source previous_generation, train.generations = N, no KD warm-up: generation 1 learns from the labels,
each later one from the frozen one before). Runs land in --out (default runs/self_distill/); one
already finished is read, not rerun. Prints a Markdown table of test accuracies and writes it to
--out/self_distill.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _run(config: Path, name: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """One `distill-ray run` (skipped when its metrics.json is there); its metrics."""
    metrics = out / name / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "distill_ray", "run", str(config), "--set", f"name={name}",
               "--set", f"run_dir={out}", "--set", f"train.seed={seed}"]
        for item in overrides:
            cmd += ["--set", item]
        log = out / f"{name}.log"
        with log.open("w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if code != 0 or not metrics.is_file():
            raise SystemExit(f"{name} failed ({code}); whole log: {log}")
    return json.loads(metrics.read_text())


def _ms(values: list[float]) -> str:
    return f"{values[0]:.4f}" if len(values) == 1 else \
        f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/self_distill"))
    opts = parser.parse_args()
    out, config = opts.out.resolve(), opts.config.resolve()
    out.mkdir(parents=True, exist_ok=True)
    columns = ["scratch", "self_ema", *(f"born-again gen{k}" for k in range(1, opts.generations + 1))]
    rows: dict[str, list[float]] = {c: [] for c in columns}
    for seed in range(opts.seeds):
        ema = _run(config, f"ema-s{seed}", seed, out, ["train.baseline=true"])
        born = _run(config, f"born_again-s{seed}", seed, out, [
            "teachers.0.source=previous_generation", f"train.generations={opts.generations}",
            "loss.kd_warmup_epochs=0", "train.baseline=false"])
        rows["scratch"].append(ema["baseline"])
        rows["self_ema"].append(ema["student"])
        for g in born["generations"]:
            rows[f"born-again gen{g['generation']}"].append(g["student"])
        print(f"seed {seed}: " + ", ".join(f"{c} {rows[c][-1]:.4f}" for c in columns), flush=True)
    lines = ["| student | test accuracy | − scratch (points, per seed) |", "|---|---:|---|"]
    for c in columns:
        diffs = [100 * (a - b) for a, b in zip(rows[c], rows["scratch"])]
        per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
        lines.append(f"| {c} | {_ms(rows[c])} | {statistics.mean(diffs):+.2f} ({per_seed}) |")
    table = "\n".join(lines)
    (out / "self_distill.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
