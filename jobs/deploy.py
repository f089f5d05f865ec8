"""Ray Jobs entrypoint that deploys a student with Ray Serve and returns (the app keeps serving).

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/deploy.py --path models:/quickstart@champion --config jobs/configs/quickstart.yaml

``--path`` is a run directory, a student directory or a registered version (``models:/NAME@champion``).
Serve binds the config's ``serve.host`` (127.0.0.1 unless told otherwise). Bad input exits 2.
"""

from __future__ import annotations

import argparse
import sys

from distill_ray.config import ConfigError, ServeConfig, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/deploy.py", description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="run dir, student dir, or models:/NAME@ALIAS")
    parser.add_argument("--config", help="experiment YAML whose serve: section configures the deployment")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--address", default="auto",
                        help="Ray address (default: RAY_ADDRESS, else the Ray running on this machine: the app "
                             "outlives this script only in a Ray that does)")
    args = parser.parse_args(argv)
    try:
        serve_cfg = load_config(args.config, args.overrides).serve if args.config else ServeConfig()
    except ConfigError as err:
        print(f"jobs/deploy.py: config error: {err}", file=sys.stderr)
        return 2

    from distill_ray.pipeline import connect_ray
    from distill_ray.serving import StudentLoadError, resolve_student_dir, start_serve

    try:
        student_dir = resolve_student_dir(args.path)  # fail before touching Ray
    except StudentLoadError as err:
        print(f"jobs/deploy.py: {err}", file=sys.stderr)
        return 2
    connect_ray(args.address)
    url = start_serve(student_dir, host=args.host, port=args.port, serve_config=serve_cfg, blocking=False)
    print(f"deployed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
