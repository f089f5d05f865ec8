"""Ray Jobs entrypoint that retrains every stale version of a registered student and registers each
result as the name's ``challenger`` (promote it with ``distill-ray registry promote NAME`` once it
has earned it). Meant to run on a schedule:

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/retrain_stale.py quickstart --tracking-uri sqlite:////shared/runs/mlflow.db

A version is stale when a teacher's weights or the data changed since it was trained (``distill-ray
registry status NAME``); each is retrained from the config it was trained from, the same path
``distill-ray run`` takes (teachers -> soft-target cache -> student), into RUN_ROOT/NAME-retrain-vN-DIGEST,
and registered with the tag ``distill.retrained_from=N`` (so the next scheduled run leaves it be).
Exit status: 0 when every stale version was retrained (or none was stale), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/retrain_stale.py", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="registered model name")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///RUN_ROOT/mlflow.db)")
    parser.add_argument("--run-root", default="runs", help="RUN_ROOT of the default store (default runs)")
    parser.add_argument("--all", action="store_true", help="every version, not only those holding an alias")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--dry-run", action="store_true", help="name what would be retrained, train nothing")
    args = parser.parse_args(argv)

    from distill_ray.registry.status import RETRAINED_FROM, needs_retraining, retrain_name, version_config
    from distill_ray.registry.store import CHALLENGER, register, tracking_uri_for

    uri = tracking_uri_for(args.run_root, args.tracking_uri)
    try:
        stale = needs_retraining(args.name, uri, args.all)
    except ValueError as err:
        print(f"jobs/retrain_stale.py: {err}", file=sys.stderr)
        return 2
    if not stale:
        print(f"{args.name}: nothing stale to retrain")
        return 0
    plans = []
    for status in stale:
        cfg = version_config(status.version, uri)
        if cfg is None:
            print(f"jobs/retrain_stale.py: {args.name} v{status.version.version} has no config this release reads; "
                  f"retrain it by hand", file=sys.stderr)
            return 2
        plans.append((status, replace(cfg, name=retrain_name(cfg, status))))
    for status, cfg in plans:
        print(f"{args.name} v{status.version.version} is stale:\n  " + "\n  ".join(status.changes)
              + f"\n  -> retraining as {cfg.run_path()}")
    if args.dry_run:
        return 0

    from distill_ray.pipeline import connect_ray, run_experiment

    connect_ray(args.address)
    for status, cfg in plans:
        run_experiment(cfg)
        number = register(cfg.run_path() / "student", args.name, tracking_uri=uri, alias=CHALLENGER,
                          extra_tags={RETRAINED_FROM: str(status.version.version)})
        print(f"{args.name}: version {number} (challenger) retrained from version {status.version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
