"""Student vs baseline vs best teacher over seeds, for configs as a new user writes them, per variant.

    python jobs/first_try.py jobs/configs/firsttry/*.yaml --seeds 2 \
        --variant defaults: --variant no_transfer:data.transfer=none --variant search:--search=8

Each (config, variant, seed) is one `distill-ray run` in a fresh process (train.seed = seed), with its
own baseline (the same student from the labels alone, as many optimizer steps, its best validation
epoch). A variant is `NAME:` followed by comma-separated `key=value` overrides, or `--search=N`.
Runs land in --out (default runs/first_try/CONFIG-VARIANT-sSEED); one already finished is read, not
rerun (--existing tabulates only those). Prints a Markdown table (mean ± std over seeds) and writes it to --out/first_try.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    args = []
    for item in filter(None, rest.split(",")):  # --flag=value passes as a flag, key=value as --set
        args += item.split("=", 1) if item.startswith("--") else ["--set", item]
    return name, args


def _one(config: Path, variant: str, args: list[str], seed: int, out: Path) -> dict:
    name = f"{config.stem}-{variant}-s{seed}"
    metrics = out / name / "metrics.json"
    if not metrics.is_file():
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "distill_ray", "run", str(config), "--set", f"name={name}", "--set",
               f"run_dir={out}", "--set", f"train.seed={seed}", "--set", "train.baseline=true", *args]
        log = out / f"{name}.log"
        with log.open("w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if code != 0 or not metrics.is_file():
            last = next((line for line in reversed(log.read_text().splitlines()) if line.strip()), "")
            raise SystemExit(f"{name} failed ({code}): {last.strip()} (whole log: {log})")
        print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
    return json.loads(metrics.read_text())


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only-seeds", type=int, nargs="+", help="run these seeds instead of 0..--seeds-1 "
                        "(a second seed whose first ran earlier; the table then covers these alone)")
    parser.add_argument("--out", type=Path, default=Path("runs/first_try"))
    parser.add_argument("--existing", action="store_true", help="only tabulate runs already in --out")
    opts = parser.parse_args()
    variants = [_variant(v) for v in (opts.variant or ["defaults:"])]
    opts.out.mkdir(parents=True, exist_ok=True)
    lines = ["| data | variant | student | baseline | best teacher | student − baseline (points, per seed) | "
             "gap recovered | transfer rows |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for config in opts.configs:
        for variant, args in variants:
            seeds = [s for s in (opts.only_seeds or range(opts.seeds)) if not opts.existing or
                     (opts.out / f"{config.stem}-{variant}-s{s}" / "metrics.json").is_file()]
            if not seeds:
                continue
            runs = [_one(config.resolve(), variant, args, seed, opts.out.resolve()) for seed in seeds]
            student = [m["student"] for m in runs]
            if any(m["baseline"] is None for m in runs):  # a variant run with train.baseline=false
                lines.append(f"| {config.stem} | {variant} | {_ms(student)} | - | - | - | - | "
                             f"{runs[0]['data'].get('transfer_rows', 0):,} |")
                print(lines[-1], flush=True)
                continue
            baseline = [m["baseline"] for m in runs]
            teacher = [max(v for v in m["teachers"].values() if v is not None) for m in runs]
            diffs = [100 * (s - b) for s, b in zip(student, baseline)]
            gaps = [(s - b) / (t - b) for s, b, t in zip(student, baseline, teacher) if t > b]
            lines.append(f"| {config.stem} | {variant} | {_ms(student)} | {_ms(baseline)} | {_ms(teacher)} | "
                         f"{statistics.mean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)}) | "
                         f"{100 * statistics.mean(gaps):.1f}% | {runs[0]['data'].get('transfer_rows', 0):,} |"
                         if gaps else f"| {config.stem} | {variant} | {_ms(student)} | {_ms(baseline)} | "
                         f"{_ms(teacher)} | {statistics.mean(diffs):+.2f} | - | - |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    (opts.out / "first_try.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
