"""The quality table over seeds: scratch, single-teacher KD, blends, curricula, a broken teacher.

    python jobs/ablation.py --config jobs/configs/quickstart.yaml --seeds 3 [--set k=v] [--out DIR]

Writes ablation.md and ablation.json into --out (default: <run_dir>/<name>-ablation).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from distill_ray.evaluation.ablation import ablation_main
from distill_ray.evaluation.classifier_ablation import ROWS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. jobs/configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (train.seed, train.seed + 1, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path; repeatable")
    parser.add_argument("--out", default=None, help="output directory (default: <run_dir>/<name>-ablation)")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of: {','.join(ROWS)}")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    command = " ".join(shlex.quote(a) for a in ["python", "jobs/ablation.py", *(argv if argv is not None else sys.argv[1:])])
    ablation_main(args.config, args.overrides, seeds=args.seeds, address=args.address, out_dir=args.out, rows=rows,
                  command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
