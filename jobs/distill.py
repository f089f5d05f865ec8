"""Ray Jobs entrypoint for the main job: teachers -> soft-target cache -> student -> test -> RUN_DIR.

Run it on this machine (joins a Ray already running here, else starts a local one)::

    python jobs/distill.py --config jobs/configs/laptop.yaml

or submit it to a cluster (the dashboard address; the job's driver runs on the head node)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/distill.py --config jobs/configs/cluster_gpu.yaml --set train.epochs=4

``--working-dir .`` uploads this checkout (files .gitignore excludes stay behind), so the driver
and every worker import the same ``distill_ray``. Inside a job Ray sets RAY_ADDRESS, and the
script joins that cluster. Re-submitting with the same config (same ``name`` and ``run_dir``)
resumes the student from its latest checkpoint. A bad config exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `python jobs/distill.py` puts jobs/ on sys.path, not the checkout: add the checkout (or the
# uploaded working_dir) so the code that runs is the code that was submitted.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "distill_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from distill_ray.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/distill.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (jobs/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, e.g. --set train.epochs=4; repeatable")
    parser.add_argument("--address", default=None,
                        help="Ray address (default: RAY_ADDRESS, a Ray running here, or a new local Ray)")
    parser.add_argument("--retrain-teachers", action="store_true", help="train recipe teachers even if saved")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"jobs/distill.py: config error: {err}", file=sys.stderr)
        return 2

    from distill_ray.pipeline import connect_ray, run_experiment

    connect_ray(args.address)
    metrics = run_experiment(cfg, retrain_teachers=args.retrain_teachers)
    print(f"\nrun directory: {cfg.run_path().resolve()}")
    print("metrics: " + json.dumps({"student": metrics["student"], "blend": metrics["blend"],
                                    "teachers": metrics["teachers"]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
