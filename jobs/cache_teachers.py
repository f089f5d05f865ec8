"""Ray Jobs entrypoint for the first two phases only: train the recipe teachers and cache their
soft targets (Parquet shards), so later `jobs/distill.py` runs and Tune trials just read them.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/cache_teachers.py --config jobs/configs/cluster_gpu.yaml

Locally: ``python jobs/cache_teachers.py --config jobs/configs/laptop.yaml``. A bad config exits
with status 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "distill_ray" / "__init__.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from distill_ray.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/cache_teachers.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (jobs/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, e.g. --set teachers.cnn.num_gpus=0.5")
    parser.add_argument("--address", default=None,
                        help="Ray address (default: RAY_ADDRESS, a Ray running here, or a new local Ray)")
    parser.add_argument("--retrain-teachers", action="store_true", help="train recipe teachers even if saved")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the soft-target cache even if valid")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"jobs/cache_teachers.py: config error: {err}", file=sys.stderr)
        return 2

    from distill_ray.pipeline import build_cache, connect_ray, load_data, prepare_teachers

    connect_ray(args.address)
    data = load_data(cfg)
    dirs = prepare_teachers(cfg, data, retrain=args.retrain_teachers)
    targets = build_cache(cfg, data, dirs, rebuild=args.rebuild)
    for name, path in dirs.items():
        print(f"teacher {name}: {path}")
    print(f"soft targets: {targets.directory}")
    print(f"run directory: {cfg.run_path().resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
